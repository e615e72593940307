"""`python -m vflan_jax.aot` as users run it: compiles the trainer's programs for simulated CPU
devices (and a TPU topology when libtpu is installed) and reports their memory per device."""
import importlib.util
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.train.cli import REPO, env
from vflan_jax.train.program import needed_gib

TINY = ["--config", str(REPO / "configs/demo.py"), "--config.global_batch_size=8", "--config.data.max_length=128"]


def _aot(*args):
    e = env()
    e.pop("XLA_FLAGS")   # the command sets its own device count
    return subprocess.run([sys.executable, "-m", "vflan_jax.aot", *TINY, *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def on_8():
    proc = _aot("--topology", "cpu:8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def on_4_without_room():
    """4 devices with a budget far below what the step needs: exit 1 and a one-line reason."""
    return _aot("--topology", "cpu:4", "--json", "--device_memory_gib=0.001")


@pytest.mark.slow
def test_state_per_device_halves_from_4_to_8_devices(on_8, on_4_without_room):
    on_4 = json.loads(on_4_without_room.stdout)
    assert (on_4["devices"], on_8["devices"]) == (4, 8)
    for part in ("parameters", "optimizer_state"):
        ratio = on_8[part] / on_4[part]
        # above 1/2 only by the replicated leaves (norms, biases, position tables: ~6% of this tiny model)
        assert 0.5 <= ratio < 0.55, (part, ratio)


@pytest.mark.slow
def test_compiler_arguments_are_the_state_and_batch_shards(on_8):
    # The compiler's own argument bytes equal our per-device shard count of state + batch.
    B, L, size = 8, 128, 56
    K = L // (16 + 1)   # demo's tiny model: 16 tokens per image, K image slots per row
    batch = (5 * B * L * 4 + B * K * 3 * size * size * 4 + B * K) / 8
    step = on_8["train_step"]
    rng_and_step = 3 * 4
    assert step["arguments"] == pytest.approx(on_8["parameters"] + on_8["optimizer_state"] + batch + rng_and_step,
                                              rel=0.01)
    assert step["aliased"] > 0.9 * (on_8["parameters"] + on_8["optimizer_state"])   # the state is donated
    assert on_8["fits"] is True and 0 < on_8["headroom"] < 1
    assert on_8["peak"] >= step["arguments"] + step["temporaries"] - step["aliased"]


@pytest.mark.slow
def test_a_config_that_does_not_fit_says_so_in_one_line(on_4_without_room):
    proc = on_4_without_room
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("does not fit: needs")]
    assert len(line) == 1, proc.stderr[-2000:]
    assert "global_batch_size" in line[0] and "model.remat_policy" in line[0]


@pytest.mark.slow
def test_unknown_topology_is_bad_input():
    proc = _aot("--topology", "cpu:x")
    assert proc.returncode == 2 and "cpu:N" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_a_tpu_topology_without_libtpu_says_how_to_install_it():
    proc = _aot("--topology", "v5p:2x2x2")
    assert proc.returncode == 2 and "requirements-tpu.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_the_tpu_compilers_out_of_memory_message_is_read():
    # verbatim from a v5p compile of the 13B state constructor (docs/PERFORMANCE.md, memory at scale)
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 109.68G of 95.74G hbm. Exceeded hbm capacity by 13.94G.")
    assert needed_gib(Exception(message)) == pytest.approx(109.68)
    assert needed_gib(Exception("HLO temporaries (512.00M) exceeds available HBM (95.74G)")) == pytest.approx(0.5)
    assert needed_gib(Exception("something else")) is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt); CI does not install it")
def test_tiny_config_compiles_for_a_v5p_slice():
    proc = _aot("--topology", "v5p:2x2x2", "--json", "--config.model.attention_impl=blockwise")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["devices"] == 8 and "TPU" in report["device_kind"]
    assert report["device_memory_gib"] == pytest.approx(95.74)
    assert math.isclose(report["headroom"], 1 - report["peak"] / (95.74 * 1024 ** 3))
    assert np.isfinite(report["train_step"]["temporaries"])


def test_the_trainer_stops_on_out_of_memory_naming_the_fields():
    # the trainer's compile is its fit check: TrainProgram turns the error into one line (exit 1)
    import jax

    from vflan_jax.parallel import make_mesh
    from vflan_jax.train.program import DoesNotFit, TrainProgram

    def compile_that_runs_out(*_):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
                                         "Used 109.68G of 95.74G hbm.")

    holder = types.SimpleNamespace(mesh=make_mesh((1, -1, 1)), rules=())
    with pytest.raises(DoesNotFit) as info:
        TrainProgram._in_context(holder, compile_that_runs_out)
    message = str(info.value)
    assert message.startswith("does not fit in device memory: needs 109.68 GiB per device")
    for field in ("global_batch_size", "grad_accum_steps", "model.remat_policy", "mesh", "data.max_length"):
        assert field in message
    with pytest.raises(jax.errors.JaxRuntimeError):   # other runtime errors pass through unchanged
        TrainProgram._in_context(holder, lambda: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: x")))


def test_config_sharding_overrides_reach_the_compiled_programs(monkeypatch):
    import jax

    from configs.demo import get_config
    from vflan_jax import aot
    from vflan_jax.train import program
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices; see tests/conftest.py")
    seen = {}

    def record(*args, rules, **kw):
        seen["rules"] = rules
        raise ValueError("stop before compiling")
    monkeypatch.setattr(program, "build_program", record)
    cfg = get_config()
    cfg.sharding_overrides.embed = "data,fsdp"
    with pytest.raises(aot.BadInput, match="stop before compiling"):
        aot.measure(cfg, "cpu:8")
    assert dict(seen["rules"])["embed"] == ("data", "fsdp")
