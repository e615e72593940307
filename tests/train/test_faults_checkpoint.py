"""Checkpoint faults met in place (issue 11): a save that can never finish, a signal during a hang,
and each kind of damage to the newest checkpoint. Every case that could hang runs in a
subprocess under a timeout, so a regression fails the test instead of hanging the suite."""
import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.cli import REPO, env
from vflan_jax.checkpoint import BROKEN_DIR, CheckpointError, TrainCheckpointer


def run_python(code: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env(1), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_save_orbax_would_wait_on_forever_fails_within_the_bound(tmp_path):
    # The folder is replaced by a file after step 1. Orbax's background thread fails to create
    # the step directory and its save then waits forever for the signal that thread never sends
    # (reproduced with the unbounded checkpointer). The writability probe is switched off here, so
    # only the time bound can end it.
    proc = run_python(f"""
        import os, shutil, grain, jax.numpy as jnp
        from vflan_jax.checkpoint import CheckpointError, TrainCheckpointer
        ck = TrainCheckpointer({str(tmp_path)!r}, timeout_s=5)
        it = iter(grain.MapDataset.range(8).to_iter_dataset())
        ck.save(1, {{"w": jnp.ones(4)}}, it, {{"step": 1}})
        ck.wait()
        shutil.rmtree(ck.directory)
        open(ck.directory, "w").close()
        ck._check_writable = lambda *context: None
        try:
            ck.save(2, {{"w": jnp.ones(4)}}, it, {{"step": 2}})
            ck.wait()
            print("NO ERROR")
        except CheckpointError as e:
            print("CheckpointError:", e)
        os._exit(0)   # Orbax's stuck thread would keep a normal exit waiting
    """)
    assert "CheckpointError:" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "did not finish within 5 s" in proc.stdout and str(tmp_path / "checkpoints") in proc.stdout


def test_the_probe_names_an_unwritable_folder_before_orbax_sees_it(tmp_path):
    ck = TrainCheckpointer(str(tmp_path))
    shutil.rmtree(ck.directory)
    open(ck.directory, "w").close()   # as root, chmod would not stop a write; a file in its place does
    with pytest.raises(CheckpointError, match="checkpoint directory .*checkpoints cannot be written"):
        ck.save(1, {"w": jnp.ones(2)}, iter(grain.MapDataset.range(4).to_iter_dataset()), {})


@pytest.mark.slow
def test_a_second_signal_exits_at_once_even_while_stuck(tmp_path):
    proc = run_python("""
        import os, signal, time
        from vflan_jax.train.stopping import StopSignal
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(120)   # a step or a save that never returns
    """, timeout=120)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "second signal (SIGTERM)" in proc.stderr


@pytest.mark.slow
def test_after_a_signal_a_stuck_run_exits_within_stop_timeout(tmp_path):
    proc = run_python("""
        import os, signal, time
        from vflan_jax.train.stopping import StopSignal
        stop = StopSignal(timeout_s=2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(120)
    """, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stop_timeout_s" in proc.stderr


# ----------------------------------------------------------------------------- damaged newest checkpoint

def _truncate_largest_tensor_file(step_dir):
    files = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
    with open(files[-1], "r+b") as f:
        f.truncate(os.path.getsize(files[-1]) // 2)
    return "state"


def _empty_metadata(step_dir):
    open(os.path.join(step_dir, "state", "_METADATA"), "w").close()
    return os.path.join("state", "_METADATA")


def _torn_iterator_json(step_dir):
    path = glob.glob(os.path.join(step_dir, "data_iter", "*.json"))[0]
    with open(path, "r+b") as f:
        f.truncate(5)
    return os.path.join("data_iter", os.path.basename(path))


DAMAGE = {"truncated tensor file": _truncate_largest_tensor_file, "empty _METADATA": _empty_metadata,
          "truncated data_iter JSON": _torn_iterator_json}


def _two_checkpoints(workdir):
    """Steps 1 and 2 of a small random state and a data iterator (positions 1 and 2)."""
    ck = TrainCheckpointer(str(workdir), async_save=True)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    rng = np.random.default_rng(0)
    states = {}
    for step in (1, 2):
        next(it)
        states[step] = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                        "b": jnp.asarray(rng.normal(size=(300,)), jnp.float32)}
        ck.save(step, states[step], it, {"step": step})
    ck.wait()
    ck.close()
    return states


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_broken_newest_checkpoint_is_named_and_the_older_one_restored(tmp_path, damage, caplog):
    states = _two_checkpoints(tmp_path)
    broken_part = DAMAGE[damage](str(tmp_path / "checkpoints" / "2"))
    ck = TrainCheckpointer(str(tmp_path))
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    with caplog.at_level(logging.ERROR):
        step, state, meta = ck.restore_newest(_abstract(states[2]), it)
    assert step == 1 and meta == {"step": 1}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, states[1])
    assert next(it) == 1   # the iterator is where step 1 left it
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "CHECKPOINT STEP 2 IS BROKEN" in message and broken_part in message, message
    assert ck.latest_step() == 1 and os.listdir(tmp_path / BROKEN_DIR)[0].startswith("2.")
    ck.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_broken_newest_checkpoint_stops_the_resume_when_configured(tmp_path, damage):
    states = _two_checkpoints(tmp_path)
    broken_part = DAMAGE[damage](str(tmp_path / "checkpoints" / "2"))
    ck = TrainCheckpointer(str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        ck.restore_newest(_abstract(states[2]), iter(grain.MapDataset.range(100).to_iter_dataset()), fallback=False)
    assert "step 2 is broken" in str(info.value) and broken_part in str(info.value)
    assert "resume_fallback" in str(info.value)
    assert ck.latest_step() == 2   # nothing moved
    ck.close()
