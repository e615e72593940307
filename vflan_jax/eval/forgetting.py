"""Catastrophic-forgetting suite (docs/REFERENCE.md §5.7): CIFAR-10, CIFAR-100, MNIST, miniImageNet classification
asked as free-form questions; CF = mean accuracy over the datasets present.

Data layout: D/<dataset>/<class_name>/*.png|jpg with <dataset> one of cifar10, cifar100, mnist,
miniimagenet (case, '-' and '_' ignored), or for cifar10, cifar100 and mnist a prepared TFDS
dataset D/<dataset>/<version>/ (D is then TFDS's data_dir; the test split is read with
tfds.data_source, class names from its metadata; data/tfds_source.py). Class folder names are the
labels ('_' read as a space; MNIST folders "7" or "7 - seven"). Optional
D/<dataset>/class_names.json {"<folder or TFDS label name>": ["name", ...]} gives names/synonyms
(needed when folders are WordNet ids, as in miniImageNet).

Matching: the normalised prediction contains a normalised class name or synonym as whole words
(plural s/es allowed). With --judge_config, a yes/no LLM judge also decides each answer, as the
Vision-Flan paper did with Vicuna-1.5-13B (its judge prompt is unpublished; ours is below).
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import re

from vflan_jax.data.tfds_source import TFDSClassification, is_prepared_tfds
from vflan_jax.eval.benchmark import SHORT_ANSWER_SUFFIX, BenchmarkError, Question, Result, pct, record_key
from vflan_jax.eval.judge import ReviewLog, review_key

NAME = "forgetting"
MAX_NEW_TOKENS = 128
DATASETS = ("cifar10", "cifar100", "mnist", "miniimagenet")
TFDS_NAMES = ("cifar10", "cifar100", "mnist")      # the TFDS builder names, also the folder names TFDS needs
TFDS_SPLIT = "test"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
OBJECT_PROMPT = "What is the object in the image?\n" + SHORT_ANSWER_SUFFIX
DIGIT_PROMPT = "What is the number in the image?\n" + SHORT_ANSWER_SUFFIX
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYNONYMS = {  # CIFAR class names whose everyday word differs
    "airplane": ["aeroplane", "plane", "aircraft", "jet", "airliner"], "automobile": ["car"],
    "ship": ["boat"], "truck": ["lorry"], "aquarium fish": ["fish"], "sweet pepper": ["pepper"],
    "maple tree": ["maple"], "oak tree": ["oak"], "palm tree": ["palm"], "pine tree": ["pine"],
    "willow tree": ["willow"], "pickup truck": ["pickup"], "lawn mower": ["lawnmower"],
}
JUDGE_PROMPT = ("Please judge whether a model's answer to an image classification question is correct.\n"
                "Question: {question}\nCorrect label: {label}\nModel answer: {prediction}\n"
                "Is the model answer correct, i.e. does it name the same thing as the correct label (a synonym "
                "or a more specific name counts as correct)? Answer with yes or no only.")
JUDGE_MAX_TOKENS = 8


def _canonical(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


def dataset_dirs(data_dir: str) -> dict[str, str]:
    found = {}
    if os.path.isdir(data_dir):
        for entry in sorted(os.listdir(data_dir)):
            if _canonical(entry) in DATASETS and os.path.isdir(os.path.join(data_dir, entry)):
                found[_canonical(entry)] = os.path.join(data_dir, entry)
    if not found:
        raise BenchmarkError(f"forgetting: expected {data_dir}/<dataset>/<class_name>/*.png|jpg with <dataset> among "
                             f"{', '.join(DATASETS)} (CIFAR-10, CIFAR-100, MNIST, miniImageNet); none found")
    return dict(sorted(found.items(), key=lambda kv: DATASETS.index(kv[0])))


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def class_names(dataset: str, folder: str, extra: dict) -> list[str]:
    """Accepted names for a class folder: its own name, class_names.json entries, built-in synonyms."""
    if dataset == "mnist":
        m = re.match(r"^\s*(\d)\b", folder)
        if not m:
            raise BenchmarkError(f"forgetting: MNIST class folder {folder!r} should start with its digit")
        return [m.group(1), DIGIT_WORDS[int(m.group(1))]]
    names = list(extra.get(folder, [])) or [folder.replace("_", " ")]
    names += [s for n in names for s in SYNONYMS.get(normalise(n), [])]
    return [normalise(n) for n in names if normalise(n)]


def matches(prediction: str, names: list[str]) -> bool:
    text = normalise(prediction)
    return any(re.search(rf"(?<![a-z0-9]){re.escape(n)}(?:s|es)?(?![a-z0-9])", text) for n in names)


def _extra_names(root: str) -> dict:
    path = os.path.join(root, "class_names.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _folder_streams(dataset: str, root: str, extra: dict, prompt: str) -> list[list[Question]]:
    streams = []
    for folder in sorted(os.listdir(root)):
        class_dir = os.path.join(root, folder)
        if not os.path.isdir(class_dir):
            continue
        names = class_names(dataset, folder, extra)
        images = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTS))
        streams.append([Question(f"{dataset}/{folder}/{f}", prompt, image=os.path.join(class_dir, f),
                                 metadata={"dataset": dataset, "label": names[0], "names": names})
                        for f in images])
    return streams


def _tfds_streams(dataset: str, data_dir: str, extra: dict, prompt: str) -> list[list[Question]]:
    data = TFDSClassification(dataset, TFDS_SPLIT, data_dir)
    meta = data.class_names
    if dataset != "mnist" and all(n == str(i) for i, n in enumerate(meta)) and not set(meta) <= set(extra):
        raise BenchmarkError(f"forgetting: TFDS {dataset} in {data_dir} has no class names in its metadata (labels "
                             f"are 0..{len(meta) - 1}); give {os.path.join(data_dir, dataset, 'class_names.json')} "
                             '{"0": ["name", ...], ...}')
    by_label = collections.defaultdict(list)
    for i, label in enumerate(data.labels()):
        by_label[label].append(i)
    streams = []
    for label in sorted(by_label):
        names = class_names(dataset, meta[label], extra)
        streams.append([Question(f"{dataset}/tfds/{TFDS_SPLIT}/{i}", prompt,
                                 image_fn=functools.partial(data.pil_image, i),
                                 metadata={"dataset": dataset, "label": names[0], "names": names})
                        for i in by_label[label]])
    return streams


def load_questions(data_dir: str) -> list[Question]:
    """Round-robin over datasets and classes, so a --limit prefix is a balanced sample."""
    streams = []
    for dataset, root in dataset_dirs(data_dir).items():
        extra = _extra_names(root)
        prompt = DIGIT_PROMPT if dataset == "mnist" else OBJECT_PROMPT
        if dataset in TFDS_NAMES and os.path.basename(root) == dataset and is_prepared_tfds(root):
            streams += _tfds_streams(dataset, data_dir, extra, prompt)
        else:
            streams += _folder_streams(dataset, root, extra, prompt)
    interleaved = [q for group in itertools.zip_longest(*streams) for q in group if q is not None]
    if not interleaved:
        raise BenchmarkError(f"forgetting: no images found under {data_dir}/<dataset>/<class_name>/")
    return interleaved


def judge_verdict(content: str) -> bool | None:
    words = normalise(content).split()
    return {"yes": True, "no": False}.get(words[0]) if words else None


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    questions = load_questions(data_dir)
    by_key = {record_key(a): a for a in answers}
    answered = [(q, by_key[q.key]["text"]) for q in questions if q.key in by_key]
    match = collections.defaultdict(list)
    for q, text in answered:
        match[q.metadata["dataset"]].append(matches(text, q.metadata["names"]))
    per_dataset = {d: {"match_acc": pct(sum(v), len(v)), "n": len(v)} for d, v in match.items()}
    notes = [f"{len(questions) - len(answered)} of {len(questions)} images unanswered"] if len(answered) < len(
        questions) else []
    key_metric = "match_acc"
    files = {}
    if judge is not None:
        cache = ReviewLog(os.path.join(out_dir, "forgetting_judge_cache.jsonl"))
        temperature, max_tokens = judge.resolve(0.0, JUDGE_MAX_TOKENS)

        def review(messages):
            content = judge.chat(messages, temperature, max_tokens)
            return {"content": content, "verdict": judge_verdict(content)}

        items = []
        for q, text in answered:
            messages = [{"role": "user", "content": JUDGE_PROMPT.format(question=q.prompt, label=q.metadata["label"],
                                                                        prediction=text)}]
            items.append((review_key(judge, q.key, text, messages, temperature, max_tokens), messages))
        verdicts = collections.defaultdict(list)
        for (q, _), record in zip(answered, cache.review_all(items, review, desc="judge forgetting"), strict=True):
            verdicts[q.metadata["dataset"]].append(record["verdict"])
        for d, v in verdicts.items():
            per_dataset[d]["judge_acc"] = pct(sum(x is True for x in v), len(v))
            per_dataset[d]["judge_unparseable"] = sum(x is None for x in v)
        notes.append(cache.note())
        unparseable = sum(m["judge_unparseable"] for m in per_dataset.values())
        if unparseable:
            notes.append(f"{unparseable} judge outputs neither yes nor no, counted wrong")
        key_metric, files = "judge_acc", {"judge_cache": cache.path}
    average = sum(m[key_metric] for m in per_dataset.values()) / len(per_dataset) if per_dataset else None
    if len(per_dataset) < len(DATASETS):
        notes.append(f"datasets scored: {sorted(per_dataset)} (CF averages {len(DATASETS)})")
    return Result(NAME, f"CF: mean {key_metric} over datasets (%)", average,
                  {"average": average, "metric": key_metric, "datasets": per_dataset},
                  {d: m[key_metric] for d, m in per_dataset.items()}, "accuracy (%)", len(questions),
                  len(answered), notes, files)
