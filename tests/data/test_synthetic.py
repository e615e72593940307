"""The offline task suite: splits, answers that the pictures really show, determinism, tokenizer."""
import collections
import json
import os
import re

import numpy as np
from PIL import Image

from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.data import skips, sources, synthetic
from vflan_jax.data.tokenize import tokenize_example


def _records(path):
    with open(path) as f:
        return json.load(f)


def _answer(r):
    return r["conversations"][1]["value"]


def _pixels(suite, r):
    return np.asarray(Image.open(os.path.join(suite.image_folder, r["image"])))


def _components(img):
    """Number of coloured blobs (4-connected non-background regions)."""
    from scipy import ndimage
    mask = np.abs(img.astype(int) - synthetic.BACKGROUND).sum(-1) > 60
    return ndimage.label(mask)[1]


def test_splits_and_tasks(synthetic_suite):
    train, val, heldout = (_records(p) for p in (synthetic_suite.train_json, synthetic_suite.val_json,
                                                 synthetic_suite.heldout_json))
    train_tasks = {r["task_name"] for r in train}
    heldout_tasks = {r["task_name"] for r in heldout}
    assert len(train_tasks) >= 12 and len(heldout_tasks) >= 2 and not train_tasks & heldout_tasks
    assert {r["task_name"] for r in val} == train_tasks
    assert collections.Counter(r["task_name"] for r in train) == {t: 12 for t in train_tasks}
    # Each task has its own instruction wording; answers are short enough for exact match.
    words = "|".join(list(synthetic.COLORS) + list(synthetic.SHAPES))
    wording = collections.defaultdict(set)   # task -> instructions with colour/shape words blanked
    for r in train + heldout:
        instruction = r["conversations"][0]["value"].replace("<image>", "").strip().split("\nOptions:")[0]
        wording[r["task_name"]].add(re.sub(rf"\b({words})s?\b", "X", instruction))
        assert len(_answer(r).split()) <= 3 and _answer(r) == _answer(r).strip()
    assert all(len(w) == 1 for w in wording.values())
    assert len({w.pop() for w in wording.values()}) == len(wording)
    ids = [r["id"] for r in train + val + heldout]
    assert len(ids) == len(set(ids))


def test_multiple_choice_answers_are_listed_options(synthetic_suite):
    mc = [r for p in (synthetic_suite.train_json, synthetic_suite.heldout_json) for r in _records(p)
          if "Options:" in r["conversations"][0]["value"]]
    assert {r["task_name"] for r in mc} == {"Synthetic+multiple_choice_shape", "Synthetic+multiple_choice_color"}
    for r in mc:
        options = dict(re.findall(r"\(([a-h])\) (\w+)", r["conversations"][0]["value"].split("Options:")[1]))
        letter, word = re.fullmatch(r"\(([a-h])\) (\w+)", _answer(r)).groups()
        assert options[letter] == word and len(options) == 3


def test_pictures_show_the_answers(synthetic_suite):
    by_task = collections.defaultdict(list)
    for p in (synthetic_suite.train_json, synthetic_suite.heldout_json):
        for r in _records(p):
            by_task[r["task_name"].split("+")[1]].append(r)
    for r in by_task["counting"]:
        assert _components(_pixels(synthetic_suite, r)) == int(_answer(r)), r["id"]
    for r in by_task["color_recognition"]:
        img = _pixels(synthetic_suite, r).reshape(-1, 3)
        colours = collections.Counter(map(tuple, img)).most_common(2)
        assert colours[1][0] == synthetic.COLORS[_answer(r)], r["id"]
    for r in by_task["spatial_position"]:
        ys, xs = np.nonzero(np.abs(_pixels(synthetic_suite, r).astype(int) - synthetic.BACKGROUND).sum(-1) > 60)
        cx, cy, mid = xs.mean(), ys.mean(), 32
        side = {"left": cx < mid - 8, "right": cx > mid + 8, "top": cy < mid - 8, "bottom": cy > mid + 8}
        assert side[_answer(r)], r["id"]
    for r in by_task["count_by_color"]:
        img = _pixels(synthetic_suite, r)
        colour = re.search(r"How many (\w+) objects", r["conversations"][0]["value"]).group(1)
        only = np.where((img == synthetic.COLORS[colour]).all(-1, keepdims=True), img, synthetic.BACKGROUND)
        assert _components(only.astype(np.uint8)) == int(_answer(r)), r["id"]
    for r in by_task["ocr_word"]:
        img = _pixels(synthetic_suite, r)
        assert (img < 100).all(-1).sum() > 20   # dark text pixels are drawn
    for r in by_task["existence"]:
        assert _answer(r) in ("yes", "no")
    assert {_answer(r) for r in by_task["existence"]} == {"yes", "no"}


def test_images_are_rgb_of_the_requested_size(synthetic_suite):
    for r in _records(synthetic_suite.train_json)[::7] + _records(synthetic_suite.chat_json):
        with Image.open(os.path.join(synthetic_suite.image_folder, r["image"])) as im:
            assert (im.mode, im.size) == ("RGB", (64, 64))


def test_readers_and_tokenizer_accept_the_whole_suite(synthetic_suite):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(synthetic_suite.tokenizer_dir)
    assert type(tok).__name__ == "LlamaTokenizer" and len(tok) <= 1024 and tok.legacy is False
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    pieces = tok.convert_ids_to_tokens(tok("USER: What ASSISTANT:").input_ids)
    assert pieces[1:] == ["▁USER", ":", "▁What", "▁ASSISTANT", ":"]
    counter = skips.SkipCounter()
    examples = (sources.read_examples(synthetic_suite.train_json, on_bad=counter)
                + sources.read_examples(synthetic_suite.heldout_json, on_bad=counter)
                + sources.read_examples(synthetic_suite.chat_json, default_task="llava_chat", on_bad=counter))
    assert counter.total == 0
    chat = [e for e in examples if e.task_name == "llava_chat"]
    assert chat and {len(e.turns) // 2 for e in chat} == {2, 3}
    for e in examples:
        ids, labels = tokenize_example(e, tok, "vicuna_v1")
        answers = [t + "</s>" for r, t in e.turns if r == "gpt"]
        runs = "".join("x" if y != IGNORE_INDEX else " " for y in labels).split()   # contiguous supervised runs
        assert len(runs) == len(answers) == ids.count(tok.eos_token_id)
        supervised = [y for y in labels if y != IGNORE_INDEX]
        assert tok.decode(supervised).replace("</s> ", "</s>") == "".join(answers), e.id


def test_deterministic_and_cached(synthetic_suite, tmp_path):
    again = synthetic.write_task_suite(tmp_path / "again", instances_per_task=12, image_size=64, seed=0,
                                       chat_instances=12)
    for name in ("train_json", "heldout_json", "chat_json", "val_json"):
        assert open(getattr(again, name)).read() == open(getattr(synthetic_suite, name)).read()
    some = sorted(os.listdir(again.image_folder))[::40]
    for f in some:
        assert open(os.path.join(again.image_folder, f), "rb").read() == \
            open(os.path.join(synthetic_suite.image_folder, f), "rb").read()
    before = os.path.getmtime(again.train_json)
    synthetic.write_task_suite(tmp_path / "again", instances_per_task=12, image_size=64, seed=0, chat_instances=12)
    assert os.path.getmtime(again.train_json) == before            # cache hit: nothing rewritten
    other = synthetic.write_task_suite(tmp_path / "other", instances_per_task=12, image_size=64, seed=1,
                                       chat_instances=12)
    assert open(other.train_json).read() != open(again.train_json).read()


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--instances_per_task", "2", "--image_size", "32"])
    assert "train.json" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "cli" / "tokenizer" / "tokenizer.json")
    assert len(_records(tmp_path / "cli" / "train.json")) == 2 * len(synthetic.TRAIN_TASKS)
