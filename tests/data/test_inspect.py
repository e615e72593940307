"""The inspect CLI end to end (subprocess) on the real Vision-Flan sample."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vflan_jax.data import image

pytestmark = pytest.mark.slow   # every test runs the CLI in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vflan_jax.data.inspect", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_inspect_real_sample(vflan_sample_dir, synthetic_suite, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"id": "gone", "image": "does_not_exist.jpg", "task_name": "Bad+t",
         "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "noanswer", "image": "x.jpg", "task_name": "Bad+t",
         "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": ""}]}]))
    out, pix = tmp_path / "seen.jsonl", tmp_path / "pix"
    proc = run_cli("--data", vflan_sample_dir / "llava_format.json", "--data", vflan_sample_dir / "raw_format.json",
                   "--data", bad, "--image_folder", vflan_sample_dir / "images",
                   "--tokenizer", synthetic_suite.tokenizer_dir, "--template", "vicuna_v1", "--max_length", 2048,
                   "--out", out, "--pixels_out", pix, "--image_size", 32, "--image_aspect", "pad")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    n_llava = len(json.load(open(vflan_sample_dir / "llava_format.json")))
    n_raw = len(json.load(open(vflan_sample_dir / "raw_format.json")))
    assert len(lines) == n_llava + n_raw + 2
    assert [row["line"] for row in lines] == list(range(1, len(lines) + 1))
    ok = [row for row in lines if row["status"] == "ok"]
    assert len(ok) == n_llava + n_raw
    assert {row["id"]: row["status"] for row in lines[-2:]} == {"gone": "missing_image", "noanswer": "empty_answer"}
    for row in ok:
        assert len(row["input_ids"]) == len(row["labels"])
        assert row["input_ids"].count(-200) == 1 and row["labels"][row["input_ids"].index(-200)] == -100
        assert any(x != -100 for x in row["labels"])
        assert all(x in (-100, i) for x, i in zip(row["labels"], row["input_ids"], strict=True))
    # pixels: one file per ok line, equal to the library's own preprocessing of that image
    assert len(os.listdir(pix)) == len(ok)
    first = ok[0]
    rec = json.load(open(vflan_sample_dir / "llava_format.json"))[0]
    assert first["id"] == rec["id"]
    arr = np.load(pix / f"{first['line']}.npy")
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, image.load_pixels(vflan_sample_dir / "images" / rec["image"], image_size=32))
    # terminal: spans marked, counts per task and per reason
    assert "[[" in proc.stdout and "]]" in proc.stdout
    assert "missing_image" in proc.stdout and "empty_answer" in proc.stdout and "Bad+t" in proc.stdout


def test_inspect_limit(vflan_sample_dir, synthetic_suite, tmp_path):
    out = tmp_path / "seen.jsonl"
    proc = run_cli("--data", vflan_sample_dir / "llava_format.json", "--image_folder", vflan_sample_dir / "images",
                   "--tokenizer", synthetic_suite.tokenizer_dir, "--template", "plain", "--max_length", 2048,
                   "--out", out, "--limit", 5, "--image_size", 16, "--image_aspect", "square")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert len(lines) == 5
    # plain template: BOS, image, caption ... (docs/REFERENCE.md §3.2)
    assert all(row["input_ids"][1] == -200 and row["labels"][:2] == [-100, -100] for row in lines)
