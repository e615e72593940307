"""LLaVA's stage-1 projector file (`mm_projector.bin`, keys model.mm_projector.{0,2}.{weight,bias}),
as a tensor source with the same interface as CheckpointFiles.

The .bin is a torch pickle: it is read with `torch.load(weights_only=True)`, which refuses
arbitrary objects, and it is small (21M parameters for 7B). A .safetensors with the same keys
is read without torch.
"""
from __future__ import annotations

import pathlib

import numpy as np

from vflan_jax.convert.errors import ConversionError
from vflan_jax.convert.safetensors_reader import CheckpointFiles


class InMemoryTensors:
    """{key: array} loaded from one small file."""

    def __init__(self, path: pathlib.Path, arrays: dict[str, np.ndarray]):
        self.path, self.arrays = path, arrays

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def keys(self):
        return self.arrays.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.arrays[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self.arrays[key].dtype

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        a = self.arrays[key]
        return a if rows is None or a.ndim == 0 else a[rows]

    def describe(self, key: str) -> str:
        return f"tensor {key!r} in {self.path}"


def _torch_to_numpy(name: str, value, path) -> np.ndarray:
    import torch
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16; go through ml_dtypes bit for bit
        import ml_dtypes
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def open_projector_file(path: str | pathlib.Path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: projector file not found")
    if path.suffix == ".safetensors":
        return CheckpointFiles(path)
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise ConversionError(f"{path}: cannot read the projector checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    return InMemoryTensors(path, {k: _torch_to_numpy(k, v, path) for k, v in state.items()})
