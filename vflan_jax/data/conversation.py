"""Conversation templates, exactly as LLaVA-1.5 renders them (docs/REFERENCE.md §3.1-3.3).

`render_with_spans` returns the training string together with the character spans
(start, end) of every supervised segment, so tokenization can derive labels by
construction instead of by per-round length arithmetic:
- vicuna_v1: each assistant answer plus its closing "</s>";
- plain: the caption plus its trailing "\\n".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from vflan_jax.constants import IMAGE_TOKEN

HUMAN, GPT = "human", "gpt"

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]   # (user, assistant)
    sep: str                 # after a user turn (vicuna) / after the caption (plain)
    sep2: str                # after an assistant turn (vicuna)
    style: str               # "two" (LLaVA SeparatorStyle.TWO) or "plain"


VICUNA_V1 = Template(
    name="vicuna_v1",
    system=("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>", style="two")

PLAIN = Template(name="plain", system="", roles=("", ""), sep="\n", sep2="", style="plain")

TEMPLATES: dict[str, Template] = {t.name: t for t in (VICUNA_V1, PLAIN)}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}") from None


def preprocess_multimodal(turns: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """LLaVA's preprocess_multimodal: in every turn holding <image>, move it to the front + newline."""
    out = []
    for role, text in turns:
        if IMAGE_TOKEN in text:
            text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append((role, text))
    return tuple(out)


def render(turns: Sequence[tuple[str, str]], template: str | Template) -> str:
    """The training string (turns already passed through `preprocess_multimodal`)."""
    return render_with_spans(turns, template)[0]


def render_with_spans(turns: Sequence[tuple[str, str]],
                      template: str | Template) -> tuple[str, tuple[Span, ...]]:
    """(training string, character spans of the supervised segments). ValueError if the turns don't fit."""
    t = get_template(template)
    if t.style == "plain":
        return _render_plain(turns, t)
    parts, spans, length = [t.system + t.sep], [], len(t.system + t.sep)
    for i, (role, text) in enumerate(turns):
        if role != (HUMAN, GPT)[i % 2]:
            raise ValueError(f"turn {i} has role {role!r}; turns must alternate human, gpt")
        head = t.roles[i % 2] + ": "
        if role == GPT:
            # Supervised: the answer and the sep2 ("</s>") that closes it, nothing of "ASSISTANT: ".
            start = length + len(head)
            spans.append((start, start + len(text) + len(t.sep2)))
        piece = head + text + (t.sep if role == HUMAN else t.sep2)
        parts.append(piece)
        length += len(piece)
    return "".join(parts), tuple(spans)


def _render_plain(turns, t: Template) -> tuple[str, tuple[Span, ...]]:
    # LLaVA's preprocess_plain: exactly (human, caption); the human text is replaced by "<image>".
    if len(turns) != 2 or IMAGE_TOKEN not in turns[0][1]:
        raise ValueError(f"the plain template needs exactly 2 turns with {IMAGE_TOKEN} in the first, "
                         f"got {len(turns)} turns")
    caption = turns[1][1]
    text = IMAGE_TOKEN + caption + t.sep
    return text, ((len(IMAGE_TOKEN), len(text)),)


def render_prompt(question: str, template: str | Template, with_image: bool = True) -> str:
    """The inference prompt: "{SYS} USER: <image>\\n{question} ASSISTANT:" (no trailing space)."""
    t = get_template(template)
    if with_image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    if with_image:
        question = preprocess_multimodal([(HUMAN, question)])[0][1]
    if t.style == "plain":
        return IMAGE_TOKEN if with_image else ""
    return t.system + t.sep + t.roles[0] + ": " + question + t.sep + t.roles[1] + ":"
