"""Multi-turn chat about one image in the vicuna_v1 template (LLaVA's serve/cli.py behaviour):
the image goes into the first user turn, earlier answers stay in the prompt closed by "</s>".

    "{SYS} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
"""
from __future__ import annotations

import itertools
import json
from typing import Iterable, TextIO

from vflan_jax.data.conversation import GPT, HUMAN, IMAGE_TOKEN, VICUNA_V1, render

EXIT_WORDS = ("exit", "quit")


def chat_prompt(turns: list[tuple[str, str]], question: str) -> str:
    """The prompt for the next answer, given earlier (role, text) turns."""
    return render(turns + [(HUMAN, question)], VICUNA_V1) + VICUNA_V1.roles[1] + ":"


def chat(generator, image, config, lines: Iterable[str], out: TextIO, first_question: str | None = None,
         as_json: bool = False) -> list[tuple[str, str]]:
    """Answer each line until EOF or 'exit'; prints one answer (or JSON object) per question."""
    if generator.conv_template != "vicuna_v1":
        raise ValueError(f"--interactive keeps the conversation in the vicuna_v1 template, "
                         f"not {generator.conv_template!r}")
    turns: list[tuple[str, str]] = []
    questions = itertools.chain([first_question] if first_question else [], lines)
    for line in questions:
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            break
        if image is not None and not turns:
            question = IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()
        prompt = chat_prompt(turns, question)
        result = generator._generate_texts([prompt], [image], config)[0]
        turns += [(HUMAN, question), (GPT, result.text)]
        if as_json:
            out.write(json.dumps({"text": result.text, "token_ids": result.token_ids}, ensure_ascii=False) + "\n")
        else:
            out.write(f"ASSISTANT: {result.text}\n")
        out.flush()
    return turns
