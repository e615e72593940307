"""The resumable run loop: answers appended per batch, reruns ask only what is missing."""
import json

from vflan_jax.eval.benchmark import Question
from vflan_jax.eval.runner import run_questions


def _questions(n):
    # Two questions may share an id (LLaVA's MME file does): the prompt tells them apart.
    return [Question(i // 2, f"question {i}?", image=None) for i in range(n)]


def test_resume_after_interruption(tmp_path):
    path = str(tmp_path / "answers.jsonl")
    asked = []

    def generate(prompts, images):
        asked.extend(prompts)
        return [f" answer to {p} " for p in prompts]

    first = run_questions(_questions(10)[:5], path, generate, batch_size=2, model_id="m")
    assert len(first) == 5 and first[0]["text"] == "answer to question 0?"
    assert set(first[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    with open(path, "a") as f:                        # a write cut off by a crash
        f.write('{"question_id": 9, "prom')
    asked.clear()
    everything = run_questions(_questions(10), path, generate, batch_size=4, model_id="m")
    assert asked == [f"question {i}?" for i in range(5, 10)]
    assert [a["prompt"] for a in everything] == [f"question {i}?" for i in range(10)]
    assert [json.loads(line)["answer_id"] for line in open(path)][:5] == [a["answer_id"] for a in first]
    asked.clear()
    run_questions(_questions(10), path, generate, batch_size=4, model_id="m")
    assert asked == []
