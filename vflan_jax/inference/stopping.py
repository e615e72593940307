"""Turning a row's generated ids into (text, ids): cut after EOS, or at the first stop string.

Stop strings are matched on decoded text (not token ids) because one string tokenizes
differently in different contexts. The returned ids end with the token that completed the
stop string; the text ends just before it (vLLM's default, so answers carry no marker).
"""
from __future__ import annotations

from typing import Sequence


def cut_after_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[:i + 1])
    return list(ids)


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Character index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1


def has_stop(tokenizer, ids: Sequence[int], stop_strings: Sequence[str]) -> bool:
    return bool(stop_strings) and first_stop(decode_text(tokenizer, ids), stop_strings) >= 0


def finalize(tokenizer, ids: Sequence[int], eos_ids: Sequence[int],
             stop_strings: Sequence[str]) -> tuple[str, list[int]]:
    """(text as LLaVA returns it: decode(skip_special_tokens=True).strip(), generated ids)."""
    ids = cut_after_eos(ids, eos_ids)
    text = decode_text(tokenizer, ids)
    if stop_strings and first_stop(text, stop_strings) >= 0:
        # Shortest prefix that already contains a stop string: later tokens were generated
        # only because stop strings are checked every few steps.
        k = next(k for k in range(1, len(ids) + 1) if has_stop(tokenizer, ids[:k], stop_strings))
        ids = ids[:k]
        text = decode_text(tokenizer, ids)
        text = text[:first_stop(text, stop_strings)]
    return text.strip(), [int(t) for t in ids]
