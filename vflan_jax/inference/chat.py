"""Multi-turn chat about one image in the vicuna_v1 template (LLaVA's serve/cli.py behaviour):
the image goes into the first user turn, earlier answers stay in the prompt closed by "</s>".

    "{SYS} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
"""
from __future__ import annotations

import json
from typing import Iterable, TextIO

from vflan_jax.constants import IMAGE_TOKEN
from vflan_jax.data.conversation import GPT, HUMAN, VICUNA_V1, render

EXIT_WORDS = ("exit", "quit")


def chat_prompt(turns: list[tuple[str, str]], question: str) -> str:
    """The prompt for the next answer, given earlier (role, text) turns."""
    return render(turns + [(HUMAN, question)], VICUNA_V1) + VICUNA_V1.roles[1] + ":"


def chat(generator, image, config, lines: Iterable[str], out: TextIO, first_question: str | None = None,
         as_json: bool = False, echo: bool = False) -> list[tuple[str, str]]:
    """Answer each line until EOF or 'exit'. Text mode writes a USER: prompt before each read (echo:
    also the line read, for piped input, so `out` reads as the conversation) and ASSISTANT: answers;
    as_json writes one JSON object per answer and nothing else."""
    if generator.conv_template != "vicuna_v1":
        raise ValueError(f"--interactive keeps the conversation in the vicuna_v1 template, "
                         f"not {generator.conv_template!r}")
    user, assistant = VICUNA_V1.roles
    if not as_json:
        about = f"about {image}" if image is not None else "without an image"
        out.write(f"Chat {about}: type a question after {user}:, 'exit' or Ctrl-D to quit.\n")
    turns: list[tuple[str, str]] = []
    given = [first_question] if first_question else []
    lines = iter(lines)
    while True:
        if not as_json:
            out.write(f"{user}: ")
            out.flush()
        from_argument = bool(given)  # --prompt: never typed, so always shown
        line = given.pop() if given else next(lines, None)
        if line is None:  # EOF
            if not as_json:
                out.write("\n")
            break
        question = line.strip()
        if not as_json and (echo or from_argument):
            out.write(question + "\n")
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
            out.write(f"{assistant}: {result.text}\n")
        out.flush()
    return turns
