"""Offline Vision-Flan-like task suite + a LLaMA-style tokenizer, for the demo and the tests.

Every task draws real visual content with PIL (shapes, colours, counts, positions, text)
and has its own expert-style instruction, like Vision-Flan's 187 tasks. Some task types
are held out entirely (heldout.json) so the demo can measure generalisation to unseen
tasks; they recombine skills the training tasks teach (colour + shape, counting + colour,
the multiple-choice format + colour). Answers are one word / number / "(b) word", so
exact-match accuracy is meaningful.

    python -m vflan_jax.data.synthetic --out /tmp/vflan_synth      # suite + tokenizer/

Deterministic for a given (seed, sizes); re-running with the same arguments reuses the files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import types
from typing import Callable, Iterable

from PIL import Image, ImageDraw, ImageFont

from vflan_jax.data.conversation import VICUNA_V1

SUITE_VERSION = 2
DATASET = "Synthetic"
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (150, 60, 190), "orange": (245, 140, 30)}
WORDS = ("cat", "sun", "box", "tree", "moon", "fish", "bird", "star", "car", "book", "lamp", "door")
BACKGROUND = (245, 245, 245)
# Held out from training, as Vision-Flan holds out tasks: two trained skills asked with wordings
# never seen in training (instruction generalisation, which the demo's tiny model can reach) and
# one composition of two trained skills (harder; a tiny model stays near chance).
HELDOUT_TASKS = ("shape_naming", "color_naming", "color_of_shape")


# ----------------------------------------------------------------------------- drawing

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class _Canvas:
    """An image with a 3x3 grid of free cells, so objects never overlap."""

    def __init__(self, rng: random.Random, size: int):
        self.rng, self.size = rng, size
        self.image = Image.new("RGB", (size, size), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.free = [(i, j) for i in range(3) for j in range(3)]
        rng.shuffle(self.free)

    def add(self, shape: str, color: str, cell=None, scale: float = 1.0) -> tuple[int, int]:
        cell = cell if cell is not None else self.free.pop()
        if cell in self.free:
            self.free.remove(cell)
        step = self.size / 3
        jitter = step * 0.08
        cx = (cell[0] + 0.5) * step + self.rng.uniform(-jitter, jitter)
        cy = (cell[1] + 0.5) * step + self.rng.uniform(-jitter, jitter)
        _draw_shape(self.draw, shape, color, cx, cy, step * 0.32 * scale)
        return cell


def _options(rng: random.Random, answer: str, pool: Iterable[str], n: int = 3) -> tuple[str, str]:
    """Vision-Flan-style "\\nOptions: (a) X (b) Y (c) Z" block and the "(b) Y" answer."""
    choices = [answer] + rng.sample([p for p in pool if p != answer], n - 1)
    rng.shuffle(choices)
    letters = "abcdefgh"
    block = "\nOptions: " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
    return block, f"({letters[choices.index(answer)]}) {answer}"


# ----------------------------------------------------------------------------- tasks
# Each task: rng, canvas -> (instruction, answer). The canvas is drawn on in place.

def _shape_recognition(rng, c):
    shape = rng.choice(SHAPES)
    c.add(shape, rng.choice(list(COLORS)), scale=2.2, cell=(1, 1))
    return "Identify the geometric shape shown in the image. Answer with one word.", shape


def _color_recognition(rng, c):
    color = rng.choice(list(COLORS))
    c.add(rng.choice(SHAPES), color, scale=2.2, cell=(1, 1))
    return "What is the color of the object in the image? Answer with one word.", color


def _counting(rng, c):
    n, shape, color = rng.randint(1, 6), rng.choice(SHAPES), rng.choice(list(COLORS))
    for _ in range(n):
        c.add(shape, color)
    return "Count the objects in the picture and answer with a number.", str(n)


def _spatial_position(rng, c):
    where = rng.choice(("left", "right", "top", "bottom"))
    cell = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}[where]
    c.add(rng.choice(SHAPES), rng.choice(list(COLORS)), cell=cell, scale=1.3)
    return "In which part of the image is the object: left, right, top or bottom?", where


def _existence(rng, c):
    objects = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(1, 3))]
    for shape, color in objects:
        c.add(shape, color)
    if rng.random() < 0.5:
        shape, color = rng.choice(objects)
    else:
        absent = [(s, k) for s in SHAPES for k in COLORS if (s, k) not in objects]
        shape, color = rng.choice(absent)
    answer = "yes" if (shape, color) in objects else "no"
    return f"Answer yes or no. Is there a {color} {shape} in the image?", answer


def _multiple_choice_shape(rng, c):
    shape = rng.choice(SHAPES)
    c.add(shape, rng.choice(list(COLORS)), scale=2.2, cell=(1, 1))
    block, answer = _options(rng, shape, SHAPES)
    return "Which geometric shape appears in the image?" + block, answer


def _ocr_word(rng, c):
    word = rng.choice(WORDS)
    font = ImageFont.load_default(size=max(8, c.size // 4))
    box = c.draw.textbbox((0, 0), word, font=font)
    x = (c.size - (box[2] - box[0])) / 2 - box[0]
    y = (c.size - (box[3] - box[1])) / 2 - box[1]
    c.draw.text((x, y), word, fill=(0, 0, 0), font=font)
    return "Read the word written in the image and type it exactly.", word


def _size_comparison(rng, c):
    shape = rng.choice(SHAPES)
    big, small = rng.sample(list(COLORS), 2)
    cells = rng.sample([(0, 1), (2, 1)], 2)
    c.add(shape, big, cell=cells[0], scale=1.4)
    c.add(shape, small, cell=cells[1], scale=0.6)
    return f"Two {shape}s are shown. What is the color of the larger one?", big


def _odd_one_out(rng, c):
    common, odd = rng.sample(list(COLORS), 2)
    shape, n = rng.choice(SHAPES), rng.randint(3, 5)
    colors = [common] * (n - 1) + [odd]
    for color in colors:
        c.add(shape, color)
    return "All objects but one share a color. What color is the odd one out?", odd


def _short_description(rng, c):
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    c.add(shape, color, scale=2.2, cell=(1, 1))
    return "Describe the image in a short phrase.", f"a {color} {shape}"


def _count_comparison(rng, c):
    a, b = rng.sample(list(COLORS), 2)
    na, nb = rng.sample(range(1, 5), 2)
    shape = rng.choice(SHAPES)
    for color, n in ((a, na), (b, nb)):
        for _ in range(n):
            c.add(shape, color)
    return f"Are there more {a} objects or {b} objects? Answer with the color.", a if na > nb else b


def _color_on_left(rng, c):
    left, right = rng.sample(list(COLORS), 2)
    c.add(rng.choice(SHAPES), left, cell=(0, 1), scale=1.2)
    c.add(rng.choice(SHAPES), right, cell=(2, 1), scale=1.2)
    return "What is the color of the object on the left side of the image?", left


def _shape_naming(rng, c):        # held out: shape recognition, new wording
    shape = rng.choice(SHAPES)
    c.add(shape, rng.choice(list(COLORS)), scale=2.2, cell=(1, 1))
    return "Which shape is drawn here? Reply with its name only.", shape


def _color_naming(rng, c):        # held out: colour recognition, new wording
    color = rng.choice(list(COLORS))
    c.add(rng.choice(SHAPES), color, scale=2.2, cell=(1, 1))
    return "Name the color this figure is painted in, using a single word.", color


def _color_of_shape(rng, c):      # held out: colour + shape recognition combined
    shapes = rng.sample(SHAPES, rng.randint(2, 3))
    colors = rng.sample(list(COLORS), len(shapes))
    for shape, color in zip(shapes, colors, strict=True):
        c.add(shape, color, scale=1.2)
    i = rng.randrange(len(shapes))
    return f"Look at the {shapes[i]} in the image. What color is it?", colors[i]


def _count_by_color(rng, c):      # counting restricted to one colour
    a, b = rng.sample(list(COLORS), 2)
    na, nb = rng.randint(1, 4), rng.randint(1, 4)
    for color, n in ((a, na), (b, nb)):
        for _ in range(n):
            c.add(rng.choice(SHAPES), color)
    return f"How many {a} objects are in the image? Answer with a number.", str(na)


def _multiple_choice_color(rng, c):   # multiple-choice format applied to colour
    color = rng.choice(list(COLORS))
    c.add(rng.choice(SHAPES), color, scale=2.2, cell=(1, 1))
    block, answer = _options(rng, color, COLORS)
    return "Select the color of the object in the image." + block, answer


TASKS: dict[str, Callable] = {
    "shape_recognition": _shape_recognition, "color_recognition": _color_recognition,
    "counting": _counting, "spatial_position": _spatial_position, "existence": _existence,
    "multiple_choice_shape": _multiple_choice_shape, "ocr_word": _ocr_word,
    "size_comparison": _size_comparison, "odd_one_out": _odd_one_out,
    "short_description": _short_description, "count_comparison": _count_comparison,
    "color_on_left": _color_on_left,
    "color_of_shape": _color_of_shape, "count_by_color": _count_by_color,
    "shape_naming": _shape_naming, "color_naming": _color_naming,
    "multiple_choice_color": _multiple_choice_color,
}
TRAIN_TASKS = tuple(t for t in TASKS if t not in HELDOUT_TASKS)


def task_name(task: str) -> str:
    return f"{DATASET}+{task}"     # Vision-Flan style "<Dataset>+<task>"


# ----------------------------------------------------------------------------- suite files

def _instances(task: str, split: str, n: int, size: int, seed: int, image_dir: str) -> list[dict]:
    rng = random.Random(f"{seed}:{task}:{split}")
    records = []
    for i in range(n):
        canvas = _Canvas(rng, size)
        instruction, answer = TASKS[task](rng, canvas)
        image = f"{split}_{task}_{i:04d}.png"
        canvas.image.save(os.path.join(image_dir, image))
        # The release puts <image> before or after the instruction; preprocess_multimodal moves it.
        human = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
        records.append({"id": f"synthetic_{split}_{task}_{i}", "image": image, "task_name": task_name(task),
                        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]})
    return records


def _chat(n: int, size: int, seed: int, image_dir: str) -> list[dict]:
    """LLaVA-Instruct-like multi-turn conversations (2-3 rounds), without task_name as in LLaVA's files."""
    rng = random.Random(f"{seed}:chat")
    records = []
    for i in range(n):
        canvas = _Canvas(rng, size)
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        where = rng.choice(("left", "right", "top", "bottom"))
        canvas.add(shape, color, cell={"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}[where],
                   scale=1.3)
        image = f"chat_{i:04d}.png"
        canvas.image.save(os.path.join(image_dir, image))
        qa = [("What do you see in this picture?", f"I see a {color} {shape}."),
              ("What color is it?", f"The {shape} is {color}."),
              ("Where is it located?", f"It is in the {where} part of the image.")]
        rounds = qa[:rng.randint(2, 3)]
        conv = [{"from": "human", "value": "<image>\n" + rounds[0][0]}, {"from": "gpt", "value": rounds[0][1]}]
        for q, a in rounds[1:]:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"chat_{i}", "image": image, "conversations": conv})
    return records


def write_task_suite(out_dir: str | os.PathLike, instances_per_task: int = 24, image_size: int = 64,
                     seed: int = 0, chat_instances: int = 24) -> types.SimpleNamespace:
    """Write images/, train.json, val.json (seen tasks, fresh instances), heldout.json (unseen tasks), chat.json."""
    out_dir = os.fspath(out_dir)
    params = dict(version=SUITE_VERSION, n=instances_per_task, size=image_size, seed=seed, chat=chat_instances)
    suite = _suite_paths(out_dir)
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest) and _read_json(manifest).get("params") == params:
        return suite
    os.makedirs(suite.image_folder, exist_ok=True)
    n_val = max(2, instances_per_task // 4)
    splits = {
        suite.train_json: [r for t in TRAIN_TASKS for r in _instances(t, "train", instances_per_task, image_size,
                                                                        seed, suite.image_folder)],
        suite.val_json: [r for t in TRAIN_TASKS for r in _instances(t, "val", n_val, image_size, seed,
                                                                      suite.image_folder)],
        suite.heldout_json: [r for t in HELDOUT_TASKS for r in _instances(t, "heldout", instances_per_task,
                                                                            image_size, seed, suite.image_folder)],
        suite.chat_json: _chat(chat_instances, image_size, seed, suite.image_folder),
    }
    for path, records in splits.items():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    with open(manifest, "w") as f:
        json.dump({"params": params, "train_tasks": [task_name(t) for t in TRAIN_TASKS],
                   "heldout_tasks": [task_name(t) for t in HELDOUT_TASKS],
                   "counts": {os.path.basename(p): len(r) for p, r in splits.items()}}, f, indent=1)
    return suite


def _suite_paths(out_dir: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        root=out_dir, image_folder=os.path.join(out_dir, "images"),
        train_json=os.path.join(out_dir, "train.json"), val_json=os.path.join(out_dir, "val.json"),
        heldout_json=os.path.join(out_dir, "heldout.json"), chat_json=os.path.join(out_dir, "chat.json"),
        tokenizer_dir=os.path.join(out_dir, "tokenizer"))


def suite_texts(suite: types.SimpleNamespace) -> list[str]:
    """Every conversation text of the suite (the tokenizer's training corpus)."""
    texts = []
    for path in (suite.train_json, suite.val_json, suite.heldout_json, suite.chat_json):
        texts += [turn["value"] for record in _read_json(path) for turn in record["conversations"]]
    return texts


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- tokenizer

def template_texts() -> list[str]:
    """Strings the vicuna_v1 template produces, so its words become single tokens."""
    return [VICUNA_V1.system + " USER: <image>\nWhat is this? ASSISTANT: Yes.</s>USER: Why? ASSISTANT: No</s>"]


def build_tokenizer(out_dir: str | os.PathLike, corpus_texts: Iterable[str], vocab_size: int = 1024,
                    include_template: bool = True) -> str:
    """Train a LLaMA-style SentencePiece BPE model offline and save it as an HF tokenizer directory.

    Like LLaMA: unk 0 "<unk>", bos 1 "<s>", eos 2 "</s>", byte_fallback, split digits,
    identity normalisation, no whitespace collapsing, dummy prefix. Loaded by
    `AutoTokenizer.from_pretrained(out_dir)` as `LlamaTokenizer` with legacy=False,
    add_bos_token=True, add_eos_token=False and pad = unk (as LLaVA sets). The vocabulary
    has at most `vocab_size` entries (fewer when the corpus is too small for more).
    """
    out_dir = os.fspath(out_dir)
    texts = list(corpus_texts) + (template_texts() * 50 if include_template else [])
    fingerprint = hashlib.sha256(json.dumps([SUITE_VERSION, vocab_size, texts]).encode()).hexdigest()
    stamp = os.path.join(out_dir, "corpus.sha256")
    if os.path.exists(stamp) and open(stamp).read() == fingerprint:
        return out_dir
    import sentencepiece as spm  # imported here: a cached call needs neither
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
              "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    _write_config(out_dir, config)
    # Save once through transformers so tokenizer.json exists (fast, conversion-free reloads).
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    _write_config(out_dir, {**_read_json(os.path.join(out_dir, "tokenizer_config.json")), **config})
    with open(stamp, "w") as f:
        f.write(fingerprint)
    return out_dir


def _write_config(out_dir, config):
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--instances_per_task", type=int, default=24)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=1024)
    args = parser.parse_args(argv)
    suite = write_task_suite(args.out, args.instances_per_task, args.image_size, args.seed)
    build_tokenizer(suite.tokenizer_dir, suite_texts(suite), args.vocab_size)
    print(json.dumps(_read_json(os.path.join(args.out, "manifest.json"))["counts"]),
          f"tokenizer: {suite.tokenizer_dir}")


if __name__ == "__main__":
    main()
