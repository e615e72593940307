"""What every benchmark module shares: a question to ask, the scored result, the errors.

A benchmark module exposes NAME, MAX_NEW_TOKENS, load_questions(data_dir) -> [Question] and
evaluate(answers, data_dir, out_dir, judge) -> Result. Answers are LLaVA answer-file records
({question_id, prompt, text, answer_id, model_id, metadata}).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any, Callable

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."          # docs/REFERENCE.md §5.0
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
    """Missing or malformed benchmark files; the message names what is expected and where."""


@dataclasses.dataclass
class Question:
    question_id: Any                 # as in the benchmark's question file (LLaVA's ids are int or str)
    prompt: str                      # the user message after "<image>\n", suffix included
    image: str | None = None         # image path, or None when image_b64 holds the image
    image_b64: str | None = None     # MMBench ships images inline
    fixed_answer: str | None = None   # answered without the model (MMMU's questions it cannot ask)
    image_fn: Callable[[], Any] | None = None   # a reader's lazy image (TFDS records, MMMU's parquet)
    record_prompt: str | None = None  # what LLaVA writes as "prompt" in its answer file (default: prompt)
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def logged_prompt(self) -> str:
        return self.prompt if self.record_prompt is None else self.record_prompt

    @property
    def key(self) -> str:
        return answer_key(self.question_id, self.logged_prompt)

    def load_image(self):
        if self.image_fn is not None:
            return self.image_fn()
        if self.image_b64 is not None:
            from PIL import Image
            return Image.open(io.BytesIO(base64.b64decode(self.image_b64))).convert("RGB")
        return self.image


def answer_key(question_id, prompt: str) -> str:
    # WHY both: LLaVA's MME file gives the two questions of an image the same question_id.
    return json.dumps([str(question_id), prompt])


def record_key(record: dict) -> str:
    return answer_key(record["question_id"], record.get("prompt", ""))


def with_suffix(text: str, suffix: str) -> str:
    """LLaVA's question files already carry the suffix; add it only when missing."""
    return text if text.rstrip().endswith(suffix) else text + "\n" + suffix


@dataclasses.dataclass
class Result:
    benchmark: str
    headline_name: str
    headline: float | None            # None: pending (e.g. judge not configured)
    metrics: dict
    bars: dict[str, float]            # what report.png plots
    bar_axis: str = "score"
    n_questions: int = 0
    n_answered: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def require_file(path: str, benchmark: str, what: str) -> str:
    if not os.path.isfile(path):
        raise BenchmarkError(f"{benchmark}: expected {path} ({what}); not found")
    return path


def require_dir(path: str, benchmark: str, what: str) -> str:
    if not os.path.isdir(path):
        raise BenchmarkError(f"{benchmark}: expected directory {path} ({what}); not found")
    return path


def files_with_images(data_dir: str, benchmark: str, files: dict[str, tuple[str, str]], images: bool) -> dict:
    """{name: path} for files {name: (file name, what it is)} that must exist in data_dir, plus
    data_dir/images, required only when images are read (run, not score)."""
    found = {name: require_file(os.path.join(data_dir, file), benchmark, what) for name, (file, what) in files.items()}
    found["images"] = os.path.join(data_dir, "images")
    if images:
        require_dir(found["images"], benchmark, "images")
    return found


def pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0
