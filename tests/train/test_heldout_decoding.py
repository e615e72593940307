"""The trainer's held-out evaluation decodes records with the training pipeline's settings:
a config that sets exif_transpose, max_pixels or strict evaluates on the images it trains on."""
import json
import types

import numpy as np
import pytest
from PIL import Image

from vflan_jax.data import image, pipeline, synthetic
from vflan_jax.train.config import base_config
from vflan_jax.train.evaluate import build_evaluators

TPI, IMG_ID, SIZE = 4, 7, 16
MODEL = types.SimpleNamespace(tokens_per_image=TPI, image_token_id=IMG_ID,
                              vision=types.SimpleNamespace(image_size=SIZE))


def record(rid, task, img):
    return {"id": rid, "task_name": task, "image": img,
            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a"}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("exif_data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, shown rotated by 90 degrees
    Image.fromarray(rng.integers(0, 256, (12, 30, 3), np.uint8)).save(root / "images/rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(root / "images/big.png")
    records = [record("s0", "seen", "rotated.jpg"), record("u0", "unseen", "rotated.jpg"),
               record("u1", "unseen", "big.png"), record("u2", "unseen", "missing.png")]
    (root / "train.json").write_text(json.dumps(records))
    tok_dir = synthetic.build_tokenizer(root / "tokenizer", ["What is shown? a"] * 20, vocab_size=300)
    from transformers import AutoTokenizer
    return root, AutoTokenizer.from_pretrained(tok_dir)


def train_config(root, **data):
    cfg = base_config()
    cfg.global_batch_size = 1
    cfg.eval_max_examples = 8
    d = cfg.data
    d.sources.train = pipeline.source_config(str(root / "train.json"), str(root / "images"))
    d.heldout_tasks = ["unseen"]
    d.max_length = 512
    d.packing = "pad_to_longest"
    d.shuffle, d.num_epochs, d.prefetch, d.read_threads = False, 1, 0, 1
    for key, value in data.items():
        d[key] = value
    return cfg


def pipeline_and_evaluator(cfg, tok):
    ds, info = pipeline.build_train_pipeline(cfg.data, tok, image_token_id=IMG_ID, tokens_per_image=TPI,
                                             image_size=SIZE, per_host_batch_size=1, process_index=0,
                                             process_count=1)
    return ds, build_evaluators(cfg, info, tok, MODEL)["heldout"]


def test_heldout_images_decoded_like_training(data):
    root, tok = data
    cfg = train_config(root, exif_transpose=True, max_pixels=1000)
    ds, evaluator = pipeline_and_evaluator(cfg, tok)
    trained = next(iter(ds))["pixel_values"][0, 0]  # s0: the only training record
    elements = {e["record_id"]: e for e in evaluator._decoded()}
    assert np.array_equal(elements["u0"]["pixel_values"][0], trained)
    upright = image.load_pixels(root / "images/rotated.jpg", image_size=SIZE, exif_transpose=True)
    assert np.array_equal(trained, upright)
    assert not np.array_equal(trained, image.load_pixels(root / "images/rotated.jpg", image_size=SIZE))
    # max_pixels: 40x40 = 1600 > 1000 is skipped in evaluation as it would be in training, not evaluated
    assert "u1" not in elements and evaluator.skipped.total == 2  # big.png and missing.png


def test_strict_config_stops_on_a_bad_heldout_record(data):
    root, tok = data
    _, evaluator = pipeline_and_evaluator(train_config(root, strict=True), tok)
    with pytest.raises(pipeline.BadRecordError, match="missing.png"):
        evaluator._decoded()
