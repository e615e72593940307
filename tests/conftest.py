"""Test-wide set-up: 8 simulated CPU devices, offline hub, parsed absl flags, and one
persistent XLA compilation cache for the session.

Must run before anything imports jax, which is why it sets the environment at import.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest
from absl import flags  # pure Python: imports no jax, so it may come before the environment below

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The trainer, eval and generate CLIs are tested as subprocesses that compile the same tiny
# programs again and again (compilation is most of a run); the children inherit this cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vflan_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# Grain's worker processes read absl flags; pytest never parses them.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SAMPLE_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "vision_flan_sample"


@pytest.fixture(scope="session")
def vflan_sample_dir():
    """The real Vision-Flan instances shipped beside the repository (read-only); skip when absent."""
    path = pathlib.Path(os.environ.get("VFLAN_SAMPLE_DIR", SAMPLE_DIR))
    if not (path / "llava_format.json").exists():
        pytest.skip(f"real Vision-Flan sample not found at {path}")
    return path
