"""Image classification datasets read through TFDS without TensorFlow: tfds.data_source(name,
split, data_dir) over prepared array_record files, class names from the dataset's metadata.

Two users: the forgetting suite (eval/forgetting.py reads D/<dataset>/<version>/ as TFDS) and training
(`TFDSInstructions` maps each image + label to a one-turn instruction Example with the image's
PNG bytes, a Grain random-access source the data pipeline decodes like prepared shards; a source
`pipeline.tfds_source_config(name, split, data_dir)` enters the mixture through mixture.open_source,
with its index from `TFDSInstructions.index()`).
tensorflow-datasets is optional: pip install 'vflan_jax[tfds]'.
"""
from __future__ import annotations

import io
import os
import re

import numpy as np

INSTALL_HINT = ("reading TFDS datasets needs tensorflow-datasets (TensorFlow is not needed): "
                "pip install 'vflan_jax[tfds]' (tensorflow-datasets==4.9.10 importlib_resources==7.1.0)")
VERSION_DIR = re.compile(r"\d+\.\d+\.\d+")


class TFDSUnavailable(ValueError):
    """tensorflow-datasets missing, or a split that cannot be read; the message says which and how to fix it."""


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise TFDSUnavailable(INSTALL_HINT) from None
    return tfds


def is_prepared_tfds(path: str) -> bool:
    """A TFDS dataset folder: <data_dir>/<name>/ holding version folders such as 3.0.2/."""
    return os.path.isdir(path) and any(VERSION_DIR.fullmatch(e) and os.path.isdir(os.path.join(path, e))
                                       for e in os.listdir(path))


class TFDSClassification:
    """Random access to (HxWx3 uint8 image, label index) of a TFDS classification split, with
    the class names the dataset's metadata gives (ClassLabel names)."""

    def __init__(self, name: str, split: str = "test", data_dir: str | None = None):
        tfds = import_tfds()
        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:     # tfds raises DatasetNotFoundError, AssertionError, ... for unprepared data
            raise TFDSUnavailable(f"TFDS {name} split {split!r} in {data_dir}: cannot be read "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.class_names = list(self.source.dataset_info.features["label"].names)

    def __reduce__(self):       # Grain's worker processes open the split again (readers do not pickle)
        return TFDSClassification, (self.name, self.split, self.data_dir)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        record = self.source[int(i)]
        image = np.asarray(record["image"])
        if image.ndim == 3 and image.shape[-1] == 1:          # MNIST: 28x28x1 grey -> RGB
            image = np.repeat(image, 3, axis=-1)
        return image, int(record["label"])

    def labels(self) -> list[int]:
        return [self[i][1] for i in range(len(self))]

    def pil_image(self, i: int):
        from PIL import Image
        return Image.fromarray(self[i][0]).convert("RGB")


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class TFDSInstructions:
    """A TFDS classification split as training Examples: human "<image>\\n{prompt}", gpt the class
    name; task_name f"tfds_{name}". Random access, so grain.MapDataset.source() takes it."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 prompt: str = "What is the object in the image?\nAnswer the question using a single word or phrase."):
        self.data = TFDSClassification(name, split, data_dir)
        self.prompt, self.task_name = prompt, f"tfds_{name}"

    def __len__(self) -> int:
        return len(self.data)

    def fields(self, i: int, label: int) -> tuple:
        """(id, task_name, image, turns) of record i, without its pixels (what the index hashes)."""
        from vflan_jax.constants import IMAGE_TOKEN
        from vflan_jax.data.sources import GPT, HUMAN
        answer = self.data.class_names[label].replace("_", " ")
        return (f"{self.task_name}/{self.data.split}/{int(i)}", self.task_name, f"{self.task_name}/{int(i)}.png",
                ((HUMAN, f"{IMAGE_TOKEN}\n{self.prompt}"), (GPT, answer)))

    def index(self):
        """The mixture's RecordIndex (record_index.py) over the split: reads every label once."""
        from vflan_jax.data.record_index import IndexBuilder
        builder = IndexBuilder()
        for i, label in enumerate(self.data.labels()):
            builder.add(*self.fields(i, label))
        return builder.build()

    def __getitem__(self, i: int):
        from vflan_jax.data.sources import Example
        image, label = self.data[i]
        return Example(*self.fields(i, label), source=f"tfds:{self.data.name}/{self.data.split}", index=int(i),
                       image_bytes=png_bytes(image))
