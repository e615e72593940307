"""Bad-record accounting over many passes (issue 11 items 2, 6, 7): each bad record counted once
per reason, truncations counted per task, and data that is mostly skips stopped with the counts
instead of being looped over forever."""
import json
import os
import random
import shutil
import threading

import pytest

from tests.data.test_pipeline import build, config
from vflan_jax.data import pipeline, skips


def _records(suite, tmp_path, n_good, n_missing, long_answers=0):
    folder = tmp_path / "images"
    folder.mkdir()
    good = json.load(open(suite.train_json))[:n_good]
    for r in good:
        shutil.copy(os.path.join(suite.image_folder, r["image"]), folder / r["image"])
    question = good[0]["conversations"][0]
    bad = [{**good[0], "id": f"missing_{i}", "image": f"nope_{i}.png"} for i in range(n_missing)]
    long_answer = {"from": "gpt", "value": "yes " + "word " * 300}
    long = [{**good[i], "id": f"long_{i}", "conversations": [question, long_answer]} for i in range(long_answers)]
    records = good + bad + long
    random.Random(0).shuffle(records)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(folder), good


def test_each_bad_record_counted_once_over_several_epochs(synthetic_suite, tokenizer, tmp_path):
    path, folder, good = _records(synthetic_suite, tmp_path, n_good=12, n_missing=3, long_answers=2)
    epochs = 4
    c = config(synthetic_suite, num_epochs=epochs)
    c.sources.train = pipeline.source_config(path, folder)
    ds, info = build(c, tokenizer)
    counter = pipeline.SkipCounter().merge(info.skipped)
    for batch in ds:
        counter.merge(pipeline.skips_of(batch))
    assert dict(counter.by_reason) == {skips.MISSING_IMAGE: 3}          # not 3 x 4 epochs
    assert counter.repeats[skips.MISSING_IMAGE] == 3 * (epochs - 1)     # the later passes, said as such
    assert sum(counter.truncated_by_task.values()) == 2                  # not 2 x 4
    assert set(counter.truncated_by_task) <= {r["task_name"] for r in good}
    report = counter.report()
    assert "skipped records: 3 (each counted once; met 9 more times" in report
    assert "truncated at max_length (answer cut): 2 records" in report
    # through the JSON a checkpoint stores, the once-per-record rule survives a resume
    restored = pipeline.SkipCounter.from_dict(json.loads(json.dumps(counter.state())))
    restored.merge(counter)
    assert restored.as_dict()["by_reason"] == counter.as_dict()["by_reason"]
    assert restored.as_dict()["truncated"] == counter.as_dict()["truncated"]


def test_data_with_no_usable_record_stops_naming_the_culprits(synthetic_suite, tokenizer, tmp_path):
    path, folder, _ = _records(synthetic_suite, tmp_path, n_good=5, n_missing=0)
    c = config(synthetic_suite)   # repeats forever: without the guard this loops at step 0
    c.sources.train = pipeline.source_config(path, str(tmp_path / "no_images_here"))
    (tmp_path / "no_images_here").mkdir()
    ds, _ = build(c, tokenizer)
    outcome = {}

    def first_batch():   # in a daemon thread: were the loop back, the test fails instead of hanging
        try:
            outcome["batch"] = next(iter(ds))
        except skips.TooManySkips as e:
            outcome["error"] = e
    thread = threading.Thread(target=first_batch, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the packer is still looping over skip markers"
    assert "error" in outcome, "a batch came out of data with no usable record"
    message = str(outcome["error"])
    assert "no usable record in a full pass over the data (5 records" in message
    assert "missing_image=5" in message and message.count("e.g. ") == 5 and "no_images_here" in message


def test_the_skip_rate_over_the_window_is_bounded():
    rng = random.Random(1)
    guard = skips.SkipRateGuard(max_fraction=0.5, window=100)
    for _ in range(1000):          # 30% skipped: never stops
        guard.observe(skips.MISSING_IMAGE if rng.random() < 0.3 else None, "m")
    with pytest.raises(skips.TooManySkips, match="of the last 100 records were skipped"):
        for i in range(100):       # then a region of 90% skips
            guard.observe(skips.UNREADABLE_IMAGE if i % 10 else None, f"record {i}")
    assert guard.seen < 1100


def test_the_skip_fraction_is_validated(synthetic_suite):
    c = config(synthetic_suite)
    c.max_skip_fraction = 0.0
    with pytest.raises(ValueError, match="max_skip_fraction"):
        pipeline.validate_data_config(c)
