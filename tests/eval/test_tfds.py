"""TFDS sources without TensorFlow (issue 14): the forgetting suite and a training source read through
the real tfds.data_source call under tfds.testing.mock_data (offline, generated records)."""
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from vflan_jax.data.tfds_source import TFDSInstructions, TFDSUnavailable, import_tfds
from vflan_jax.eval import forgetting
from vflan_jax.eval.benchmark import BenchmarkError

tfds = pytest.importorskip("tensorflow_datasets")

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N = 6


@pytest.fixture
def mock_tfds(monkeypatch):
    """Generated records; CIFAR-10's label names as a prepared dataset's metadata has them (mock
    data has only 0..9). MNIST's metadata names are its digits, as in the real dataset."""
    real = tfds.data_source

    def with_metadata(name, **kwargs):
        source = real(name, **kwargs)
        if name == "cifar10":
            source.dataset_info.features["label"].names = CIFAR10
        return source
    monkeypatch.setattr(tfds, "data_source", with_metadata)
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
        yield real


def _tfds_layout(root, *datasets):
    for name, version in datasets:
        os.makedirs(root / name / version)          # what TFDS prepares: <data_dir>/<name>/<version>/
    return str(root)


def test_forgetting_reads_tfds_test_splits(tmp_path, mock_tfds):
    data_dir = _tfds_layout(tmp_path, ("cifar10", "3.0.2"), ("mnist", "3.0.1"))
    reference = {n: mock_tfds(n, split="test", data_dir=data_dir) for n in ("cifar10", "mnist")}
    questions = forgetting.load_questions(data_dir)
    assert len(questions) == 2 * N
    for q in questions:
        dataset, _, split, index = q.question_id.split("/")
        record = reference[dataset][int(index)]
        label = int(record["label"])
        expected_name = CIFAR10[label] if dataset == "cifar10" else str(label)
        assert split == "test" and q.metadata["label"] == expected_name
        pixels = np.asarray(q.load_image())
        want = np.asarray(record["image"])
        assert pixels.shape[:2] == want.shape[:2] and (pixels[..., 0] == want[..., 0]).all()
    # a model that names CIFAR's classes right and gets every digit wrong
    answers = [{"question_id": q.question_id, "prompt": q.prompt,
                "text": q.metadata["label"] if q.metadata["dataset"] == "cifar10" else "a cat"} for q in questions]
    result = forgetting.evaluate(answers, data_dir, str(tmp_path / "out"))
    assert result.metrics["datasets"]["cifar10"]["match_acc"] == 100
    assert result.metrics["datasets"]["mnist"]["match_acc"] == 0 and result.headline == 50


def test_tfds_without_class_names_in_metadata_says_so(tmp_path):
    data_dir = _tfds_layout(tmp_path, ("cifar100", "3.0.2"))
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(BenchmarkError, match="no class names in its metadata.*class_names.json"):
            forgetting.load_questions(data_dir)


def test_training_source_through_grain(tmp_path, mock_tfds):
    import grain
    data_dir = _tfds_layout(tmp_path, ("cifar10", "3.0.2"))
    source = TFDSInstructions("cifar10", split="train", data_dir=data_dir)
    reference = mock_tfds("cifar10", split="train", data_dir=data_dir)
    dataset = grain.MapDataset.source(source).map(
        lambda ex: (ex.turns, np.asarray(Image.open(io.BytesIO(ex.image_bytes))), ex.task_name))
    assert len(dataset) == len(reference) == N
    for i in range(N):
        turns, pixels, task = dataset[i]
        assert turns[0] == ("human", "<image>\nWhat is the object in the image?\n"
                                     "Answer the question using a single word or phrase.")
        assert turns[1] == ("gpt", CIFAR10[int(reference[i]["label"])]) and task == "tfds_cifar10"
        np.testing.assert_array_equal(pixels, np.asarray(reference[i]["image"]))


def test_missing_tensorflow_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)       # as if not installed
    with pytest.raises(TFDSUnavailable, match=r"pip install 'vflan_jax\[tfds\]'"):
        import_tfds()
