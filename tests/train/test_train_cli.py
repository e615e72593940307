"""The trainer end to end: determinism, resume after SIGTERM or SIGKILL, 8 devices, init_from."""
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.train.cli import REPO, env, losses, run, train_args

pytestmark = pytest.mark.slow   # every test runs the trainer in a subprocess


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return tmp_path_factory.mktemp("suite") / "synthetic"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, suite):
    """An uninterrupted 6-step run on one device."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = run(train_args(workdir, suite))
    return workdir, losses(workdir), proc


def test_run_writes_what_the_docs_promise(reference):
    workdir, ref, proc = reference
    assert sorted(ref) == list(range(1, 7))
    for name in ("metrics.jsonl", "config.json", "model_config.json", "summary.json", "loss_curve.png",
                 "model/model_config.json"):
        assert (workdir / name).exists(), name
    assert list((workdir / "tensorboard").iterdir())
    assert "heldout tasks: exact-match accuracy" in proc.stdout
    assert "ETA" in proc.stdout


def test_two_identical_runs_give_identical_losses(tmp_path, suite, reference):
    run(train_args(tmp_path, suite, eval_max_examples=0, compilation_cache_dir="{workdir}/xla_cache"))
    assert losses(tmp_path) == reference[1]
    assert list((tmp_path / "xla_cache").iterdir()), "the configured compilation cache was not written"


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, suite, reference):
    # A step of this tiny model takes ~40 ms, so even a signal sent after step 3 can land after the
    # last step (6); such an attempt proves nothing about resuming and is retried in a fresh dir.
    for attempt in range(3):
        workdir = tmp_path / f"attempt{attempt}"
        args = train_args(workdir, suite, eval_max_examples=0)
        proc = subprocess.Popen(args, cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        stop_after = random.Random().randint(1, 3)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= stop_after:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 75, err[-3000:]
        stopped_at = max(losses(workdir))
        assert stopped_at >= stop_after
        if stopped_at < 6:
            break
    assert stopped_at < 6, "the signal landed after the last step in every attempt"
    run(args)  # the same command resumes
    assert losses(workdir) == reference[1], f"stopped at {stopped_at}"


def test_killed_during_async_saves_then_resume(tmp_path, suite, reference):
    """SIGKILL right after a step is logged, while its checkpoint is being written (one per step)."""
    args = train_args(tmp_path, suite, checkpoint_every_steps=1, eval_max_examples=0)
    for kill_after in (random.Random().randint(2, 4),):
        proc = subprocess.Popen(args, cwd=REPO, env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / "metrics.jsonl").exists() and max(losses(tmp_path), default=0) >= kill_after:
                proc.kill()
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    run(args)
    assert losses(tmp_path) == reference[1]


def test_eight_devices_give_the_losses_of_one(tmp_path, suite, reference):
    run(train_args(tmp_path, suite, eval_max_examples=0, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
        devices=8)
    got, ref = losses(tmp_path), reference[1]
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-4)


def test_init_from_chains_two_stages(tmp_path, suite, reference):
    stage1, ref = reference[0], reference[1]
    run(train_args(tmp_path, suite, steps=2, init_from=str(stage1), eval_max_examples=0,
                   **{"model.preset": "checkpoint", "optim.learning_rate": 1e-12}))
    stage2 = losses(tmp_path)
    # Stage 2 starts where stage 1 ended: its first loss (on stage 1's first batch) is far below
    # what stage 1 started from, and a vanishing learning rate leaves the parameters as they were.
    assert stage2[1] < ref[1] - 0.5
    from vflan_jax.checkpoint import load_any
    p1, _, _ = load_any(str(stage1 / "model"))
    p2, _, _ = load_any(str(tmp_path / "model"))
    import jax
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), p1, p2)


def test_two_jax_distributed_processes_give_the_losses_of_one(tmp_path, suite, reference):
    """Two hosts on localhost (one CPU device each, fsdp over both); each loads half the batch."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # One example per row: the global batch then holds the same examples for any number of hosts
    # (with packing each host packs its own share, so rows differ between topologies).
    one_host = tmp_path / "one_host"
    run(train_args(one_host, suite, eval_max_examples=0, **{"data.packing": "pad_to_longest"}))
    args = train_args(tmp_path / "two_hosts", suite, eval_max_examples=0, **{"data.packing": "pad_to_longest"})
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outputs = [p.communicate(timeout=500) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got, ref = losses(tmp_path / "two_hosts"), losses(one_host)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-4)


def test_nonfinite_loss_stops_naming_the_step_and_records(tmp_path, suite):
    proc = run(train_args(tmp_path, suite, eval_max_examples=0, **{"optim.learning_rate": 1e30,
                                                                    "optim.warmup_ratio": 0.0}), check=False)
    assert proc.returncode == 1
    assert "non-finite loss or gradient at step" in proc.stderr
    assert "'synthetic_train_" in proc.stderr.split("batch records:")[1]  # the offending batch's record ids
    assert "update not applied" in proc.stderr
