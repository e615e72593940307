"""Packing invariants: rows never split an example, targets never cross segments, image slots
match image tokens, positions restart, every example can be reconstructed from its row."""
import json

import grain
import numpy as np
import pytest

from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vflan_jax.data import packing

TPI = 4          # tokens per image
IMG_ID = 99      # image token id after expansion
SHAPE = (3, 2, 2)


def make_elements(n, seed=0, max_text=40, max_images=2):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(0, max_images + 1))
        t = int(rng.integers(3, max_text))
        ids = list(rng.integers(3, 50, t))
        for _ in range(m):
            ids.insert(int(rng.integers(1, len(ids))), IMAGE_PLACEHOLDER)
        ids = np.array([1] + ids, np.int32)
        labels = np.where(rng.random(len(ids)) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
        labels[ids == IMAGE_PLACEHOLDER] = IGNORE_INDEX
        labels[-1] = ids[-1]
        pixels = (np.arange(m, dtype=np.float32)[:, None, None, None] + 1000 * i) * np.ones(SHAPE, np.float32)
        out.append({"index": i, "input_ids": ids, "labels": labels, "pixel_values": pixels,
                    "task_id": i % 5, "task_name": f"t{i % 5}", "record_id": f"r{i}"})
    return out


def layout(B=4, L=64, K=3, E=None):
    return packing.BatchLayout(batch_size=B, max_length=L, max_images_per_row=K, image_shape=SHAPE,
                               tokens_per_image=TPI, image_token_id=IMG_ID, pad_id=0, max_examples_per_row=E)


def packed(elements, lay, **kw):
    src = grain.MapDataset.source(elements)
    return packing.BestFitPackIterDataset(src.to_iter_dataset(), lay, refetch=src.__getitem__, **kw)


def reference_expand(ids, labels):
    """Independent per-token loop (packing.expand_example uses np.repeat)."""
    out_ids, out_labels = [], []
    for t, label in zip(ids, labels, strict=True):
        if t == IMAGE_PLACEHOLDER:
            out_ids += [IMG_ID] * TPI
            out_labels += [IGNORE_INDEX] * TPI
        else:
            out_ids.append(int(t))
            out_labels.append(int(label))
    return out_ids, out_labels


def check_batch(batch, by_id, lay):
    B, L, K = lay.batch_size, lay.max_length, lay.max_images_per_row
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == np.int32
    assert batch["pixel_values"].shape == (B, K) + SHAPE and batch["image_mask"].shape == (B, K)
    seen = []
    for r in range(B):
        seg = batch["segment_ids"][r]
        n_seg = int(seg.max())
        # segments are contiguous 1..n from the start, then padding
        used = int((seg > 0).sum())
        np.testing.assert_array_equal(seg[:used] > 0, True)
        assert (seg[used:] == 0).all() and (np.diff(seg[:used]) >= 0).all()
        assert batch["image_mask"][r].tolist() == sorted(batch["image_mask"][r].tolist(), reverse=True)
        n_slots = int(batch["image_mask"][r].sum())
        assert int((batch["input_ids"][r] == IMG_ID).sum()) == n_slots * TPI
        assert not batch["pixel_values"][r, n_slots:].any()
        assert (batch["task_ids"][r][seg == 0] == -1).all() and (batch["targets"][r][seg == 0] == -100).all()
        slot = 0
        for s in range(1, n_seg + 1):
            pos = np.flatnonzero(seg == s)
            rid = batch["meta_record_ids"][r, s - 1]
            ex = by_id[rid]
            ids, labels = reference_expand(ex["input_ids"], ex["labels"])
            assert batch["input_ids"][r, pos].tolist() == ids
            # next-token targets inside the segment only; last position predicts nothing
            assert batch["targets"][r, pos].tolist() == labels[1:] + [-100]
            assert batch["positions"][r, pos].tolist() == list(range(len(ids)))
            assert (batch["task_ids"][r, pos] == ex["task_id"]).all()
            m = ex["pixel_values"].shape[0]
            np.testing.assert_array_equal(batch["pixel_values"][r, slot:slot + m], ex["pixel_values"])
            slot += m
            seen.append(rid)
        assert slot == n_slots
        assert (batch["meta_record_ids"][r, n_seg:] == "").all()
    return seen


@pytest.mark.parametrize("first_fit", [False, True])
def test_packed_rows_reconstruct_every_example_once(first_fit):
    elements = make_elements(200)
    lay = layout()
    by_id = {e["record_id"]: e for e in elements}
    seen = []
    for batch in packed(elements, lay, first_fit=first_fit):
        seen += check_batch(batch, by_id, lay)
        assert json.loads(batch["meta_skips"])["total"] == 0
    assert sorted(seen) == sorted(by_id)     # none lost, none twice


def test_image_slot_limit_and_example_limit():
    elements = make_elements(100, max_images=2, max_text=10)
    lay = layout(L=256, K=2, E=3)
    for batch in packed(elements, lay):
        assert batch["image_mask"].sum(1).max() <= 2
        assert batch["segment_ids"].max() <= 3


def test_too_long_is_counted_not_dropped_silently():
    elements = make_elements(20)
    long = dict(elements[0], index=20, record_id="long", input_ids=np.ones(100, np.int32),
                labels=np.ones(100, np.int32), pixel_values=np.zeros((0,) + SHAPE, np.float32), task_name="tl")
    skip = {"index": 21, "skip_reason": "missing_image", "task_name": "tm", "record_id": "x", "message": "m"}
    batches = list(packed(elements + [long, skip], layout()))
    total = {}
    for b in batches:
        for reason, n in json.loads(b["meta_skips"])["by_reason"].items():
            total[reason] = total.get(reason, 0) + n
    assert total == {"too_long": 1, "missing_image": 1}
    assert "long" not in np.concatenate([b["meta_record_ids"].ravel() for b in batches])


def test_resume_from_state_is_exact():
    elements = make_elements(300, seed=1)
    lay = layout()
    ds = packed(elements, lay)
    full = [b["input_ids"] for b in ds]
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # must be JSON (grain's Orbax handler)
    assert state["open_rows"]                         # the interesting case: part-filled rows pending
    it2 = iter(ds)
    it2.set_state(state)
    rest = [b["input_ids"] for b in it2]
    assert len(rest) == len(full) - 7
    for a, b in zip(full[7:], rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pad_to_longest():
    elements = make_elements(10)
    lay = layout(B=4, L=64, K=2, E=1)
    src = grain.MapDataset.source(elements).to_iter_dataset()
    batches = list(packing.PadToLongestBatchIterDataset(src, lay, multiple=16))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4]
    by_id = {e["record_id"]: e for e in elements}
    seen = []
    for b in batches:
        longest = max(packing.example_length(by_id[r], TPI) for r in b["meta_record_ids"][:, 0] if r)
        assert b["input_ids"].shape[1] == min(64, -(-longest // 16) * 16)
        assert b["segment_ids"].max() <= 1
        lay_b = packing.BatchLayout(batch_size=4, max_length=b["input_ids"].shape[1], max_images_per_row=2,
                                    image_shape=SHAPE, tokens_per_image=TPI, image_token_id=IMG_ID,
                                    max_examples_per_row=1)
        seen += check_batch(b, by_id, lay_b)
    assert sorted(seen) == sorted(by_id)


def test_packing_fills_rows_better_than_padding():
    elements = make_elements(400, seed=2, max_text=30, max_images=1)
    lay = layout(B=8, L=128, K=4)
    fill = np.mean([(b["segment_ids"] > 0).mean() for b in packed(elements, lay)][:-1])
    assert fill > 0.9
