"""Token ids with one image placeholder per image, and labels (-100 = no loss).

Ids are exactly LLaVA's `tokenizer_image_token` (docs/REFERENCE.md §3.4): the text is split on
"<image>", each chunk is tokenized on its own (each with its BOS; one leading BOS kept)
and IMAGE_PLACEHOLDER (-200) stands between chunks.

Labels are derived BY CONSTRUCTION from the character spans that `conversation.py`
marks as supervised (each answer + its "</s>"; plain: caption + "\\n"): a span boundary
at character p of a chunk is at token k iff tokenizing chunk[:p] gives exactly the first
k tokens of the chunk, so a boundary is either exact or the record is rejected
(BadRecord MISALIGNED). SentencePiece glues a word's leading space onto the word ("▁Yes"),
so the space between "ASSISTANT:" and the answer is carried by the answer's first token
and counts as supervised, as in LLaVA (whose instruction length drops the trailing "▁").
`llava_reference_labels` is a literal port of LLaVA's length arithmetic
(preprocess_v1 / preprocess_plain), kept only as an independent reference for tests.

Tokenizer class. transformers 5.x has ONE `LlamaTokenizer` (`LlamaTokenizerFast` is an
alias), backed by `tokenizers` (BPE + byte fallback converted from tokenizer.model;
Metaspace pre-tokenizer with prepend_scheme "first" when legacy=False, i.e. no "▁" is
prepended to text that follows a special token such as "</s>"). Its ids equal those of the
slow SentencePiece `LlamaTokenizer(legacy=False)` that LLaVA used (`use_fast=False`) for
every text except one that BEGINS with whitespace: the slow tokenizer still prepends "▁"
(" a" -> "▁", "▁a"), v5 does not ("▁a"). LLaVA strings never begin with whitespace (the
first chunk starts with the system prompt or is empty, later chunks start with "\\n" or
the caption), so ids match; tests/data/test_tokenize.py checks this against raw
sentencepiece. Any tokenizer works whose `tokenizer(text).input_ids` adds at most a
leading BOS (no EOS: add_eos_token=False, as LLaVA).
"""
from __future__ import annotations

from typing import Sequence

from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN
from vflan_jax.data import skips
from vflan_jax.data.conversation import Template, get_template, preprocess_multimodal, render_with_spans
from vflan_jax.data.skips import BadRecord


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _image_chunks(text: str, tokenizer):
    """LLaVA's tokenizer_image_token, also returning where each chunk starts (chars and tokens)."""
    chunks = text.split(IMAGE_TOKEN)
    encoded = [_encode(tokenizer, c) for c in chunks]
    bos = tokenizer.bos_token_id
    lead = 1 if encoded[0] and bos is not None and encoded[0][0] == bos else 0
    ids = encoded[0][:lead]
    pieces = []   # (char_start, chunk_text, token_start, chunk_ids without its BOS)
    char = 0
    for k, (chunk, chunk_ids) in enumerate(zip(chunks, encoded, strict=True)):
        if k:
            ids.append(IMAGE_PLACEHOLDER)
            char += len(IMAGE_TOKEN)
        pieces.append((char, chunk, len(ids), chunk_ids[lead:]))
        ids.extend(chunk_ids[lead:])
        char += len(chunk)
    return ids, lead, pieces


def tokenizer_image_token(text: str, tokenizer) -> list[int]:
    """Ids of `text` with IMAGE_PLACEHOLDER for every "<image>" (LLaVA mm_utils.tokenizer_image_token)."""
    return _image_chunks(text, tokenizer)[0]


def tokenize_example(example, tokenizer, template: str | Template) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one `sources.Example`; raises BadRecord(MALFORMED|MISALIGNED|NO_SUPERVISED)."""
    where = dict(record_id=example.id, source=example.source, task_name=example.task_name)
    try:
        text, spans = render_with_spans(preprocess_multimodal(example.turns), get_template(template))
    except ValueError as e:
        raise BadRecord(skips.MALFORMED, str(e), **where) from None
    ids, lead, pieces = _image_chunks(text, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        while start > 0 and text[start - 1] == " ":   # the separator space rides on the answer's first token
            start -= 1
        for char0, chunk, tok0, chunk_ids in pieces:
            lo, hi = max(start, char0), min(end, char0 + len(chunk))
            if lo >= hi:
                continue
            if (lo, hi) != (start, end):
                raise BadRecord(skips.MISALIGNED, f"supervised text {text[start:end]!r} contains {IMAGE_TOKEN}",
                                **where)
            try:
                a = _token_boundary(tokenizer, chunk, lo - char0, chunk_ids, lead)
                b = _token_boundary(tokenizer, chunk, hi - char0, chunk_ids, lead)
            except BadRecord as e:
                raise e.with_context(**where) from None
            labels[tok0 + a: tok0 + b] = ids[tok0 + a: tok0 + b]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecord(skips.NO_SUPERVISED, "no token of the answers survives tokenization", **where)
    return ids, labels


def _token_boundary(tokenizer, chunk: str, p: int, chunk_ids: list[int], lead: int) -> int:
    """Number of chunk tokens covering chunk[:p]; BadRecord(MISALIGNED) if p falls inside a token."""
    if p == 0:
        return 0
    if p == len(chunk):
        return len(chunk_ids)
    prefix = _encode(tokenizer, chunk[:p])[lead:]
    if chunk_ids[:len(prefix)] != prefix:
        raise BadRecord(skips.MISALIGNED,
                        f"character {p} of {chunk[max(0, p - 20):p + 20]!r} is inside a token")
    return len(prefix)


def expanded_length(input_ids: Sequence[int], tokens_per_image: int) -> int:
    """Sequence length after each IMAGE_PLACEHOLDER becomes `tokens_per_image` positions."""
    n_images = sum(1 for t in input_ids if t == IMAGE_PLACEHOLDER)
    return len(input_ids) + n_images * (tokens_per_image - 1)


def truncate(input_ids: Sequence[int], labels: Sequence[int], max_length: int, tokens_per_image: int,
             example=None) -> tuple[list[int], list[int]]:
    """Keep the longest prefix whose EXPANDED length (an image costs tokens_per_image) is <= max_length.

    An image is never cut in half: if it does not fit entirely, the cut falls before it.
    A record left with no supervised token raises BadRecord(TOO_LONG): the cause is length,
    which NO_SUPERVISED (an answer that never had a token) would hide.
    """
    used, cut = 0, len(input_ids)
    for i, token in enumerate(input_ids):
        cost = tokens_per_image if token == IMAGE_PLACEHOLDER else 1
        if used + cost > max_length:
            cut = i
            break
        used += cost
    ids, kept = list(input_ids[:cut]), list(labels[:cut])
    if not any(label != IGNORE_INDEX for label in kept):
        where = {} if example is None else dict(record_id=example.id, source=example.source,
                                                  task_name=example.task_name)
        full = expanded_length(input_ids, tokens_per_image)
        if cut == len(input_ids):
            raise BadRecord(skips.NO_SUPERVISED, "no supervised token", **where)
        raise BadRecord(skips.TOO_LONG, f"{full} positions (images expanded to {tokens_per_image}); "
                        f"no supervised token in the first {max_length}", **where)
    return ids, kept


# ----------------------------------------------------------------------------- reference (tests only)

def llava_reference_labels(conversation: str, input_ids: Sequence[int], tokenizer,
                           template: str | Template = "vicuna_v1",
                           model_max_length: int | None = None,
                           round_fix: bool | None = None) -> list[int] | None:
    """LLaVA's label arithmetic ported literally (train.py preprocess_v1 / preprocess_plain).

    `conversation` is the rendered string, `input_ids` its tokenizer_image_token ids.
    Returns the labels, or None where LLaVA prints "WARNING: tokenization mismatch" (and
    silently masks the whole sample). `round_fix` forces LLaVA's "-1 for rounds i >= 1"
    correction on/off; None applies LLaVA's own condition (not tokenizer.legacy and
    tokenizers >= 0.14). The correction presumes that a round tokenized standalone ("▁USER")
    is one token longer than after "</s>" ("USER"); that is a property of the vocabulary.
    """
    t = get_template(template)
    target = list(input_ids)
    if t.style == "plain":
        tokenized_len = len(tokenizer_image_token(IMAGE_TOKEN, tokenizer))   # BOS + image = 2
        target[:tokenized_len] = [IGNORE_INDEX] * len(target[:tokenized_len])
        return target
    max_len = tokenizer.model_max_length if model_max_length is None else model_max_length
    sep = t.sep + t.roles[1] + ": "
    total_len = sum(1 for x in target if x != tokenizer.pad_token_id)
    rounds = conversation.split(t.sep2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        if round_fix is None:
            round_fix = not getattr(tokenizer, "legacy", True) and _tokenizers_at_least_0_14()
        if i != 0 and round_fix:
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len:cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    if cur_len < max_len and cur_len != total_len:
        return None
    return target


def _tokenizers_at_least_0_14() -> bool:
    import tokenizers
    major, minor = (int(x) for x in tokenizers.__version__.split(".")[:2])
    return (major, minor) >= (0, 14)
