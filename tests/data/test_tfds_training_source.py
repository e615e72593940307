"""A TFDS classification split as a training source of the mixture (issue 14): through the real
tfds.data_source call under tfds.testing.mock_data (offline, generated records), next to a JSON
source: its task in the batches, the class name as the supervised answer, caps and held-out
tasks, per-host shares and a resumable iterator."""
import os
import sys

import numpy as np
import pytest

from tests.data.test_pipeline import IMG_ID, TPI, build, config, record_ids
from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.data import pipeline

tfds = pytest.importorskip("tensorflow_datasets")

N, TASK = 6, "tfds_cifar10"


@pytest.fixture
def cifar(tmp_path):
    """(data_dir, the split as TFDS gives it) under mock data."""
    data_dir = tmp_path / "tfds"
    os.makedirs(data_dir / "cifar10" / "3.0.2")          # what TFDS prepares: <data_dir>/<name>/<version>/
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
        yield str(data_dir), tfds.data_source("cifar10", split="train", data_dir=str(data_dir))


def mixed(suite, data_dir, **tfds_kw):
    c = config(suite)
    c.sources.train.subset = 16                           # a few JSON records beside the TFDS split
    c.sources.cifar = pipeline.tfds_source_config("cifar10", split="train", data_dir=data_dir, **tfds_kw)
    return c


def segments(batch, task_names):
    """(record id, task name, supervised target ids) of every example in a batch."""
    out = []
    for r, ids in enumerate(batch["meta_record_ids"]):
        for s, rid in enumerate(ids):
            if rid:
                where = batch["segment_ids"][r] == s + 1
                targets = batch["targets"][r][where]
                out.append((rid, task_names[batch["task_ids"][r][where][0]], targets[targets != IGNORE_INDEX]))
    return out


def test_tfds_split_trains_beside_json(synthetic_suite, tokenizer, cifar):
    data_dir, reference = cifar
    c = mixed(synthetic_suite, data_dir)
    c.num_epochs = 1
    ds, info = build(c, tokenizer)
    assert TASK in info.task_names and info.counts["cifar"] == {TASK: {"available": N, "selected": N}}
    batches = list(ds)
    seen = [s for b in batches for s in segments(b, info.task_names)]
    names = reference.dataset_info.features["label"].names
    answers = {f"{TASK}/train/{i}": names[int(reference[i]["label"])] for i in range(N)}
    tfds_seen = {rid: (task, tokenizer.decode(t)) for rid, task, t in seen if rid.startswith(TASK)}
    assert tfds_seen == {rid: (TASK, answer + "</s>") for rid, answer in answers.items()}
    assert len(seen) == N + 16 and {task for _, task, _ in seen} - {TASK}      # the JSON source is there too
    for b in batches:                                                            # every example has its image
        assert (b["input_ids"] == IMG_ID).sum() == b["image_mask"].sum() * TPI
    shares = [set(record_ids(build(c, tokenizer, process_index=i, process_count=2)[0])) for i in range(2)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(record_ids(batches))


def test_caps_and_heldout_apply(synthetic_suite, tokenizer, cifar):
    data_dir, _ = cifar
    _, info = build(mixed(synthetic_suite, data_dir, max_per_task=2), tokenizer)
    assert info.counts["cifar"][TASK] == {"available": N, "selected": 2}
    c = mixed(synthetic_suite, data_dir)
    c.heldout_tasks = (TASK,)
    _, info = build(c, tokenizer)
    assert TASK not in info.task_names and info.counts["cifar"][TASK]["selected"] == 0
    assert {e.task_name for e in info.mixture.heldout_examples} == {TASK}


def test_iterator_state_round_trips(synthetic_suite, tokenizer, cifar):
    data_dir, _ = cifar

    def make():
        c = mixed(synthetic_suite, data_dir, weight=1.0)
        c.sources.train.weight = 1.0                      # mixed by weight: an infinite stream
        return build(c, tokenizer, B=2)[0]

    it = iter(make())
    for _ in range(3):
        next(it)
    state = it.get_state()
    reference = [next(it) for _ in range(4)]
    it2 = iter(make())
    it2.set_state(state)
    for a, b in zip(reference, [next(it2) for _ in range(4)], strict=True):
        for key in ("input_ids", "targets", "segment_ids", "pixel_values", "task_ids", "meta_record_ids"):
            np.testing.assert_array_equal(a[key], b[key])


def test_config_errors_and_install_hint(synthetic_suite, tokenizer, cifar, monkeypatch):
    data_dir, _ = cifar
    c = mixed(synthetic_suite, data_dir)
    c.sources.cifar.paths = (synthetic_suite.train_json,)
    with pytest.raises(ValueError, match=r"sources\.cifar\.tfds: give one of"):
        build(c, tokenizer)
    c = mixed(synthetic_suite, data_dir)
    c.sources.cifar.tfds_data_dir = data_dir + "/nowhere"
    with pytest.raises(ValueError, match=r"sources\.cifar\.tfds_data_dir"):
        build(c, tokenizer)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)       # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'vflan_jax\[tfds\]'"):
        build(mixed(synthetic_suite, data_dir), tokenizer)
