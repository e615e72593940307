"""The Grain pipeline end to end on the synthetic suite: epochs, hosts, determinism, bad-record
accounting, strict mode, config errors, and exact resume through Orbax with worker processes."""
import collections
import json
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vflan_jax.data import pipeline

TPI, IMG_ID, SIZE = 4, 7, 16


def config(suite, **kw):
    c = pipeline.default_data_config()
    c.sources.train = pipeline.source_config(suite.train_json, suite.image_folder)
    c.max_length = 192
    c.prefetch = 0
    c.read_threads = 1
    for k, v in kw.items():
        c[k] = v
    return c


def build(c, tok, B=4, **kw):
    return pipeline.build_train_pipeline(c, tok, image_token_id=IMG_ID, tokens_per_image=TPI, image_size=SIZE,
                                         per_host_batch_size=B, **{"process_index": 0, "process_count": 1, **kw})


def record_ids(batches):
    return [r for b in batches for r in b["meta_record_ids"].ravel() if r]


def train_ids(suite):
    return sorted(r["id"] for r in json.load(open(suite.train_json)))


def test_one_epoch_sees_every_example_once(synthetic_suite, tokenizer):
    ds, info = build(config(synthetic_suite, num_epochs=1), tokenizer)
    batches = list(ds)
    assert sorted(record_ids(batches)) == train_ids(synthetic_suite)
    assert info.task_names == sorted(info.counts["train"])
    b = batches[0]
    assert set(pipeline.device_part(b)) == {"input_ids", "targets", "segment_ids", "positions", "pixel_values",
                                            "image_mask", "task_ids"}
    assert b["pixel_values"].shape[2:] == (3, SIZE, SIZE)
    # task ids point at the record's task
    names = {r["id"]: r["task_name"] for r in json.load(open(synthetic_suite.train_json))}
    for r in range(b["input_ids"].shape[0]):
        for s, rid in enumerate(b["meta_record_ids"][r]):
            if rid:
                assert {info.task_names[t] for t in b["task_ids"][r][b["segment_ids"][r] == s + 1]} == {names[rid]}
    assert (b["input_ids"] == IMG_ID).sum() == b["image_mask"].sum() * TPI


def test_deterministic_and_seeded(synthetic_suite, tokenizer):
    def first(seed):
        ds, _ = build(config(synthetic_suite, seed=seed), tokenizer)
        it = iter(ds)
        return [next(it)["input_ids"] for _ in range(3)]
    a, b, c = first(1), first(1), first(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_hosts_read_disjoint_shares(synthetic_suite, tokenizer):
    shares = [record_ids(build(config(synthetic_suite, num_epochs=1), tokenizer, process_index=i,
                               process_count=2)[0]) for i in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == train_ids(synthetic_suite)


def test_pad_to_longest_mode(synthetic_suite, tokenizer):
    ds, _ = build(config(synthetic_suite, num_epochs=1, packing="pad_to_longest", pad_to_multiple=32), tokenizer)
    batches = list(ds)
    assert all(b["input_ids"].shape[1] % 32 == 0 and b["segment_ids"].max() <= 1 for b in batches)
    assert sorted(record_ids(batches)) == train_ids(synthetic_suite)


def test_weighted_mix_of_two_sources(synthetic_suite, tokenizer):
    c = config(synthetic_suite)
    c.sources.train.weight = 3.0
    c.sources.chat = pipeline.source_config(synthetic_suite.chat_json, synthetic_suite.image_folder,
                                            default_task="llava_chat", weight=1.0)
    ds, info = build(c, tokenizer, B=8)
    it = iter(ds)
    tasks = collections.Counter()
    for _ in range(6):
        b = next(it)
        tasks.update(info.task_names[t] == "llava_chat" for t in
                     [b["task_ids"][r][b["segment_ids"][r] == s][0] for r in range(8)
                      for s in range(1, b["segment_ids"][r].max() + 1)])
    assert 0.1 < tasks[True] / sum(tasks.values()) < 0.45   # weight 1/4


# ----------------------------------------------------------------------------- bad records

def bad_suite(suite, tmp_path):
    """A copy of some suite records plus one record of every bad kind."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = json.load(open(suite.train_json))[:20]
    for r in good:
        shutil.copy(os.path.join(suite.image_folder, r["image"]), folder / r["image"])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "outside.png").write_bytes((folder / good[0]["image"]).read_bytes())

    def rec(rid, image, q="<image>\nWhat?", a="yes", task="Bad+task"):
        return {"id": rid, "image": image, "task_name": task,
                "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    bad = [rec("missing", "nope.png"), rec("unreadable", "broken.png"), rec("escape", "../outside.png"),
           rec("too_long", good[1]["image"], q="<image>\n" + "word " * 400),
           rec("empty", good[2]["image"], a="  "),
           {"id": "malformed", "image": good[3]["image"], "task_name": "Bad+task",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(good + bad))
    return str(path), str(folder)


EXPECTED_SKIPS = {"missing_image": 1, "unreadable_image": 1, "path_outside_folder": 1, "too_long": 1,
                  "empty_answer": 1, "malformed_conversation": 1}


def total_skips(info, batches):
    counter = pipeline.SkipCounter().merge(info.skipped)
    for b in batches:
        counter.merge(pipeline.skips_of(b))
    return counter


def test_every_bad_record_kind_is_counted(synthetic_suite, tokenizer, tmp_path):
    path, folder = bad_suite(synthetic_suite, tmp_path)
    c = config(synthetic_suite, num_epochs=1)
    c.sources.train = pipeline.source_config(path, folder)
    ds, info = build(c, tokenizer)
    batches = list(ds)
    counter = total_skips(info, batches)
    assert dict(counter.by_reason) == EXPECTED_SKIPS
    assert counter.as_dict()["by_task"] == {"Bad+task": EXPECTED_SKIPS}
    assert len(record_ids(batches)) == 20


def test_strict_mode_names_file_and_record(synthetic_suite, tokenizer, tmp_path):
    path, folder = bad_suite(synthetic_suite, tmp_path)
    records = json.load(open(path))
    keep = [r for r in records if r["id"] not in {"unreadable", "escape", "too_long", "empty", "malformed"}]
    (tmp_path / "decode_bad.json").write_text(json.dumps(keep))   # one bad record: "missing"
    c = config(synthetic_suite, num_epochs=1, strict=True)
    c.sources.train = pipeline.source_config(str(tmp_path / "decode_bad.json"), folder)
    ds, _ = build(c, tokenizer)
    with pytest.raises(pipeline.BadRecordError) as e:
        list(ds)
    assert "decode_bad.json" in str(e.value) and "'missing'" in str(e.value) and "nope.png" in str(e.value)
    c.sources.train = pipeline.source_config(path, folder)
    with pytest.raises(Exception, match="empty"):
        build(c, tokenizer)


def test_config_errors_name_the_field(synthetic_suite, tokenizer):
    cases = [("packing", "zigzag", "packing"), ("max_length", 0, "max_length"),
             ("image_aspect", "crop", "image_aspect"), ("template", "chatml", "template")]
    for field, value, needle in cases:
        with pytest.raises(ValueError, match=needle):
            build(config(synthetic_suite, **{field: value}), tokenizer)
    c = config(synthetic_suite)
    c.sources.train.paths = ["/nonexistent.json"]
    with pytest.raises(ValueError, match=r"sources\.train\.paths"):
        build(c, tokenizer)
    c = config(synthetic_suite)
    c.sources.train.budget_tasks = 3
    with pytest.raises(ValueError, match=r"sources\.train\.budget_tasks"):
        build(c, tokenizer)
    with pytest.raises(ValueError, match="sources"):
        build(pipeline.default_data_config(), tokenizer)


# ----------------------------------------------------------------------------- resume

@pytest.mark.slow   # Grain's worker processes
def test_resume_through_orbax_with_worker_processes(synthetic_suite, tokenizer, tmp_path):
    path, folder = bad_suite(synthetic_suite, tmp_path)
    records = json.load(open(path)) + json.load(open(synthetic_suite.train_json))[20:60]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    for r in records[26:]:
        shutil.copy(os.path.join(synthetic_suite.image_folder, r["image"]), os.path.join(folder, r["image"]))

    def make():
        c = config(synthetic_suite, num_workers=2, worker_buffer_size=2, prefetch=2, seed=7)
        c.sources.train = pipeline.source_config(str(data), folder)
        return build(c, tokenizer, B=2)

    ds, info = make()
    # uninterrupted reference run: 2 epochs' worth of batches (the stream repeats forever)
    n_total, n_first = 40, 13
    it = iter(ds)
    reference = [next(it) for _ in range(n_total)]
    it.close()

    it = iter(ds)
    first = [next(it) for _ in range(n_first)]
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(n_first, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    it.close()

    ds2, _ = make()
    it2 = iter(ds2)
    ocp.CheckpointManager(tmp_path / "ckpt").restore(
        n_first, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2)))
    rest = [next(it2) for _ in range(n_total - n_first)]
    it2.close()

    for a, b in zip(reference, first + rest, strict=True):
        for key in ("input_ids", "targets", "segment_ids", "positions", "pixel_values", "image_mask",
                    "task_ids", "meta_record_ids"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["meta_skips"] == b["meta_skips"]
    # skip counts across the interruption equal the uninterrupted ones (and are right)
    decode_time = {k: v for k, v in EXPECTED_SKIPS.items() if k not in ("empty_answer", "malformed_conversation")}
    resumed = total_skips(info, first + rest).by_reason
    epochs = len(record_ids(reference)) // 60   # 60 usable records per epoch
    assert epochs >= 1
    assert resumed == total_skips(info, reference).by_reason
    repeats = total_skips(info, first + rest).repeats
    for reason, n in decode_time.items():   # each bad record counted once; later passes are repeats
        assert resumed[reason] == n and repeats[reason] >= n * (epochs - 1)
