"""The batched, resumable generation loop.

Answers go to an append-only JSONL in LLaVA's answer format, one batch at a time; a rerun reads
it back and asks only the questions not yet answered, so an interrupted evaluation continues
where it stopped (a half-written last line is cut off and re-asked).
"""
from __future__ import annotations

import time
import uuid
from typing import Callable, Sequence

from tqdm import tqdm

from vflan_jax.eval.benchmark import Question, record_key
from vflan_jax.eval.jsonl import append_jsonl, read_log

# (prompts, images) -> answer texts, in order
GenerateFn = Callable[[list[str], list], list[str]]


def answered_keys(answer_file: str) -> set[str]:
    return {record_key(r) for r in read_log(answer_file)}


def pending(questions: Sequence[Question], answer_file: str) -> list[Question]:
    done = answered_keys(answer_file)
    return [q for q in questions if q.key not in done]


def answer_record(q: Question, text: str, model_id: str) -> dict:
    """LLaVA's model_vqa*.py answer line (shortuuid there; any unique id works for the scripts)."""
    return {"question_id": q.question_id, "prompt": q.logged_prompt, "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


def run_questions(questions: Sequence[Question], answer_file: str, generate: GenerateFn, *, batch_size: int,
                  model_id: str, desc: str = "eval") -> list[dict]:
    """Answer every question not yet in answer_file (those with a fixed_answer without asking the
    model); returns all answer records of the file."""
    todo = pending(questions, answer_file)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=desc, unit="q", smoothing=0.1)
    start = time.time()
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        asked = [q for q in batch if q.fixed_answer is None]
        generated = list(generate([q.prompt for q in asked], [q.load_image() for q in asked])) if asked else []
        if len(generated) != len(asked):
            raise RuntimeError(f"generator returned {len(generated)} answers for {len(asked)} prompts")
        answers = iter(generated)
        texts = [q.fixed_answer if q.fixed_answer is not None else next(answers) for q in batch]
        append_jsonl(answer_file, [answer_record(q, t.strip(), model_id) for q, t in zip(batch, texts, strict=True)])
        bar.update(len(batch))
    bar.close()
    if todo:
        elapsed = time.time() - start
        print(f"{desc}: answered {len(todo)} questions in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} q/s)")
    return read_log(answer_file)
