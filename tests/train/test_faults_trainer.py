"""The trainer as users run it, meeting bad data and checkpoint faults (issue 11): counts of
bad and truncated records in every report, resume past a broken newest checkpoint, a checkpoint
folder that stops taking writes mid-run, and data with no usable record. Each run is a
subprocess under a timeout: a hang fails the test instead of the suite."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.train.cli import REPO, env, losses, run, train_args
from vflan_jax.data import skips
from vflan_jax.data.synthetic import write_task_suite

pytestmark = pytest.mark.slow   # every test runs the trainer in a subprocess

INSTANCES = 6   # as tests/train/cli.py's train_args


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """The suite's images and 4 of its training records, plus records that fail in known ways."""
    suite = write_task_suite(tmp_path_factory.mktemp("suite") / "synthetic", instances_per_task=INSTANCES)
    good = json.load(open(suite.train_json))[:4]
    task = good[0]["task_name"]

    def variant(rid, **fields):
        return {**good[0], "id": rid, **fields}
    question = good[0]["conversations"][0]
    bad = [variant("missing_1", image="nope_1.png"), variant("missing_2", image="nope_2.png"),
           variant("empty", conversations=[question, {"from": "gpt", "value": "  "}]),
           variant("malformed", conversations=[question, question]),
           variant("long", conversations=[question, {"from": "gpt", "value": "yes " + "word " * 150}])]
    path = os.path.join(suite.root, "bad.json")
    with open(path, "w") as f:
        json.dump(good + bad, f)
    return suite, str(path), task


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, bad_data):
    """4 steps over the bad file (several passes over its 7 readable records), checkpoints at 2 and 4."""
    suite, path, task = bad_data
    workdir = tmp_path_factory.mktemp("first")
    proc = run(train_args(workdir, suite.root, steps=4, eval_max_examples=0, checkpoint_every_steps=2,
                          **{"data.sources.train.paths": f"({path!r},)"}))
    return workdir, proc, task


def test_bad_and_truncated_records_are_counted_once_in_every_report(first_run):
    workdir, proc, task = first_run
    summary = json.load(open(workdir / "summary.json"))["skipped"]
    expected = {skips.MISSING_IMAGE: 2, skips.EMPTY_ANSWER: 1, skips.MALFORMED: 1}
    assert summary["by_reason"] == expected              # read-time and decode-time, each record once
    assert summary["by_task"] == {task: expected}
    assert summary["repeats"][skips.MISSING_IMAGE] >= 2  # seen again on later passes, not counted again
    assert summary["truncated"] == {"total": 1, "by_task": {task: 1}}
    last = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"skipped"' in line][-1]
    assert last["skipped"]["by_reason"] == expected and last["skipped"]["truncated"]["total"] == 1
    assert "skipped records: 4 (each counted once; met" in proc.stdout
    assert "truncated at max_length (answer cut): 1 records" in proc.stdout


def test_resume_passes_a_broken_checkpoint_and_an_unwritable_folder_ends_the_run(tmp_path, bad_data, first_run):
    suite, path, _ = bad_data
    workdir = first_run[0]
    workdir_b = tmp_path / "w"
    shutil.copytree(workdir, workdir_b)
    open(workdir_b / "checkpoints" / "4" / "state" / "_METADATA", "w").close()   # newest step damaged
    (workdir_b / "metrics.jsonl").unlink()   # so that the steps polled below are this run's
    args = train_args(workdir_b, suite.root, steps=60, eval_max_examples=0, checkpoint_every_steps=2,
                      **{"data.sources.train.paths": f"({path!r},)"})
    proc = subprocess.Popen(args, cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (workdir_b / "metrics.jsonl").exists() and max(losses(workdir_b), default=0) >= 4:
                # As root, chmod would not stop writes: a file takes the folder's place (renamed away
                # at once, so that a save in flight cannot race the removal).
                os.rename(workdir_b / "checkpoints", workdir_b / "checkpoints.gone")
                open(workdir_b / "checkpoints", "w").close()
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    log = err + open(workdir_b / "train.log").read()
    assert "CHECKPOINT STEP 4 IS BROKEN" in log and "_METADATA is empty" in log, err[-3000:]
    assert (workdir_b / "metrics.jsonl").exists(), err[-3000:]
    first, resumed = losses(workdir), losses(workdir_b)
    # Resumed from step 2 exactly: step 3's loss (params after step 2, the batch after step 2's
    # data position) is the first run's. Later steps differ: the schedule spans 60 steps here.
    assert min(resumed) == 3 and resumed[3] == first[3]
    assert proc.returncode == 1, err[-3000:]
    assert f"checkpoint directory {workdir_b / 'checkpoints'} cannot be written" in err
    assert max(resumed) < 60


def test_no_usable_record_stops_with_the_counts_instead_of_looping(tmp_path, bad_data):
    suite, _, _ = bad_data
    (tmp_path / "empty").mkdir()
    proc = run(train_args(tmp_path / "w", suite.root, eval_max_examples=0,
                          **{"data.sources.train.image_folder": str(tmp_path / "empty")}), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no usable record in a full pass over the data" in proc.stderr
    assert "missing_image=" in proc.stderr and proc.stderr.count("e.g. ") >= 3   # the first culprits
