"""Ids and labels vs independent references, on the real Vision-Flan sample.

References: raw SentencePiece (emulating the slow LlamaTokenizer(legacy=False) LLaVA used)
for ids, and LLaVA's preprocess_v1 / preprocess_plain length arithmetic ported literally
(`llava_reference_labels`) for labels. Two LLaMA-style tokenizers are trained from the
sample's text: "vicuna-like" (a round tokenized standalone starts "▁", "USER" = one token
more than after "</s>", the case LLaVA's -1 correction was written for) and "flat" (both 1).
"""
import json
import os
import re
import types

import pytest

from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vflan_jax.data import conversation as conv, skips, sources, synthetic
from vflan_jax.data.skips import BadRecord
from vflan_jax.data.tokenize import (
    expanded_length,
    llava_reference_labels,
    tokenize_example,
    tokenizer_image_token,
    truncate,
)


@pytest.fixture(scope="module")
def sample_examples(vflan_sample_dir):
    return (sources.read_examples(vflan_sample_dir / "llava_format.json")
            + sources.read_examples(vflan_sample_dir / "raw_format.json"))


def _texts(examples):
    return [text for e in examples for _, text in e.turns]


@pytest.fixture(scope="module")
def vicuna_like(sample_examples, tmp_path_factory):
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("tok_vicuna_like")
    synthetic.build_tokenizer(d, _texts(sample_examples) + ["ok.</s>USER: fine"] * 50, include_template=False)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def flat(sample_examples, tmp_path_factory):
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("tok_flat")
    synthetic.build_tokenizer(d, _texts(sample_examples))
    return AutoTokenizer.from_pretrained(d)


class SlowLlama:
    """The slow SentencePiece LlamaTokenizer(legacy=False) behaviour, from raw sentencepiece:
    special tokens split the text; the first piece gets SentencePiece's dummy "▁" prefix,
    pieces after a special token get none."""

    def __init__(self, model_file):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = open(model_file, "rb").read()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        m = pb.ModelProto()
        m.ParseFromString(proto)
        m.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

    def encode(self, text):   # with BOS, no EOS
        ids = [1]
        for i, piece in enumerate(re.split(r"(<s>|</s>|<unk>)", text)):
            if piece in ("<s>", "</s>", "<unk>"):
                ids.append(self.sp.piece_to_id(piece))
            elif piece:
                ids += (self.sp if i == 0 else self.sp_no_prefix).encode(piece)
        return ids

    def image_token(self, text):   # LLaVA's tokenizer_image_token on top of it
        chunks = [self.encode(c) for c in text.split("<image>")]
        ids = [1]
        for k, c in enumerate(chunks):
            ids += ([IMAGE_PLACEHOLDER] if k else []) + c[1:]
        return ids


@pytest.fixture(scope="module")
def slow(flat):
    return SlowLlama(os.path.join(flat.name_or_path, "tokenizer.model"))


def test_tokenizer_is_llava_like(flat):
    assert type(flat).__name__ == "LlamaTokenizer" and flat.legacy is False
    assert (flat.unk_token_id, flat.bos_token_id, flat.eos_token_id, flat.pad_token_id) == (0, 1, 2, 0)
    assert len(flat) <= 1024
    ids = flat("hello").input_ids
    assert ids[0] == 1 and ids[-1] != 2


def test_ids_equal_slow_sentencepiece_tokenizer(flat, slow, sample_examples):
    for text in _texts(sample_examples):
        for variant in (text, text + "</s>USER: again " + text, "\n" + text, "</s>" + text, text + "</s> x"):
            assert flat(variant).input_ids == slow.encode(variant), variant[:60]
    # The one known difference (documented in tokenize.py): text that BEGINS with whitespace.
    assert slow.encode(" yes")[:2] == [1, slow.sp.piece_to_id("▁")]
    assert flat(" yes").input_ids[1] != slow.sp.piece_to_id("▁")


@pytest.mark.parametrize("text", [
    "<image>\nWhat is this?",                 # front
    "Look here: <image>\nand answer.",        # middle
    "What is shown?\n<image>",                # end
    "<image>",                                # only the image
    "a <image>\nb <image>\nc",               # two images
])
def test_tokenizer_image_token(flat, slow, text):
    ids = tokenizer_image_token(text, flat)
    assert ids == slow.image_token(text)
    assert ids.count(IMAGE_PLACEHOLDER) == text.count("<image>") and ids.count(1) == 1 and ids[0] == 1
    if text.startswith("<image>"):
        assert ids[:2] == [1, IMAGE_PLACEHOLDER]
    if text.endswith("<image>"):
        assert ids[-1] == IMAGE_PLACEHOLDER


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("tok_name", ["vicuna_like", "flat"])
def test_real_sample_matches_llava_reference(request, sample_examples, slow, template, tok_name):
    tok = request.getfixturevalue(tok_name)
    mismatches = []
    for e in sample_examples:
        ids, labels = tokenize_example(e, tok, template)
        text = conv.render(conv.preprocess_multimodal(e.turns), template)
        if tok_name == "flat":
            assert ids == slow.image_token(text), e.id
        assert ids.count(IMAGE_PLACEHOLDER) == 1 and len(labels) == len(ids)
        reference = llava_reference_labels(text, ids, tok, template)
        if reference is None:
            mismatches.append(e.id)
        else:
            assert labels == reference, e.id
        answer = e.turns[1][1] + ("</s>" if template == "vicuna_v1" else "\n")
        assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == answer, e.id
    # Single-turn records have one round, where LLaVA's arithmetic is exact: no mismatch at all.
    assert mismatches == [] and len(sample_examples) == 136


def _multi_turn(examples, k):
    rounds = 2 + k % 2
    turns = []
    for j in range(rounds):
        human, answer = examples[k + j].turns
        text = human[1] if j == 0 else human[1].replace("<image>", "").strip()
        turns += [("human", text), ("gpt", answer[1])]
    return sources.Example(f"multi{k}", "multi", examples[k].image, tuple(turns), "multi.json", k)


def _supervised_runs(labels):
    runs, run = [], []
    for x in labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            run.append(x)
        elif run:
            runs, run = runs + [run], []
    return runs


def test_multi_turn_labels(sample_examples, vicuna_like, flat):
    examples = [_multi_turn(sample_examples, k) for k in range(0, 96, 3)]
    for e in examples:
        answers = [text + "</s>" for role, text in e.turns if role == "gpt"]
        for tok in (vicuna_like, flat):
            ids, labels = tokenize_example(e, tok, "vicuna_v1")
            assert [tok.decode(run) for run in _supervised_runs(labels)] == answers, e.id
            assert sum(1 for x in labels if x == tok.eos_token_id) == len(answers)
            text = conv.render(conv.preprocess_multimodal(e.turns), "vicuna_v1")
            if tok is vicuna_like:   # LLaVA's own rule (-1 per later round) is right for this vocabulary
                assert llava_reference_labels(text, ids, tok) == labels, e.id
            else:                    # ... and wrong for the flat one, where no correction is needed
                assert llava_reference_labels(text, ids, tok) is None
                assert llava_reference_labels(text, ids, tok, round_fix=False) == labels, e.id


def test_plain_template_labels(sample_examples, flat):
    e = sample_examples[0]
    ids, labels = tokenize_example(e, flat, "plain")
    assert ids[:2] == [1, IMAGE_PLACEHOLDER] and labels[:2] == [IGNORE_INDEX] * 2
    assert labels[2:] == ids[2:]                          # the whole caption + "\n" is supervised
    assert ids[2:] == flat(e.turns[1][1] + "\n").input_ids[1:]


def test_bad_template_use_is_malformed(sample_examples, flat):
    e = _multi_turn(sample_examples, 0)
    with pytest.raises(BadRecord) as info:
        tokenize_example(e, flat, "plain")
    assert info.value.reason == skips.MALFORMED and "multi.json" in str(info.value) and "multi0" in str(info.value)


class PairTokenizer:
    """Every two characters are one token, so a span boundary at an odd offset is inside a token."""
    bos_token_id = 1

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[1] + [1000 + 3 * sum(map(ord, text[i:i + 2])) + len(text[i:i + 2])
                                                      for i in range(0, len(text), 2)])


class BosOnlyTokenizer:
    bos_token_id = 1

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[1])


def test_misaligned_and_no_supervised():
    # chunk after <image> = "\nQ ASSISTANT: A</s>"; the answer (with its separator space) starts at 13.
    odd = sources.Example("odd", "T", "a.png", (("human", "<image>\nQ"), ("gpt", "A")), "f.json", 0)
    with pytest.raises(BadRecord) as info:
        tokenize_example(odd, PairTokenizer(), "vicuna_v1")
    assert info.value.reason == skips.MISALIGNED and "f.json" in str(info.value) and "'odd'" in str(info.value)
    even = sources.Example("even", "T", "a.png", (("human", "<image>\nQx"), ("gpt", "A")), "f.json", 0)
    ids, labels = tokenize_example(even, PairTokenizer(), "vicuna_v1")
    assert [x for x in labels if x != IGNORE_INDEX] == PairTokenizer()(" A</s>").input_ids[1:]
    with pytest.raises(BadRecord) as info:
        tokenize_example(even, BosOnlyTokenizer(), "vicuna_v1")
    assert info.value.reason == skips.NO_SUPERVISED


def test_truncate_never_splits_an_image():
    ids = [1, 5, 6, IMAGE_PLACEHOLDER, 7, 8, 9]
    labels = [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    assert expanded_length(ids, 10) == 16
    assert truncate(ids, labels, 16, 10) == (ids, labels)            # fits exactly
    assert truncate(ids, labels, 15, 10) == (ids[:6], labels[:6])
    assert truncate(ids, labels, 13, 10) == (ids[:4], labels[:4])    # image ends exactly at 13
    for max_length in (3, 4, 12):                                    # cut would fall inside the image
        assert truncate(ids, labels, max_length, 10) == (ids[:3], labels[:3])


def test_truncate_errors_name_the_record():
    e = sources.Example("long", "T", "a.png", (("human", "<image>"), ("gpt", "a")), "f.json", 3)
    ids = [1, IMAGE_PLACEHOLDER, 7, 8]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    with pytest.raises(BadRecord) as info:
        truncate(ids, labels, 576, 576, example=e)                   # the answer is cut off
    assert info.value.reason == skips.TOO_LONG and "f.json" in str(info.value) and "long" in str(info.value)
    with pytest.raises(BadRecord) as info:
        truncate(ids, [IGNORE_INDEX] * 4, 10_000, 576)
    assert info.value.reason == skips.NO_SUPERVISED


def test_skips_counted_over_a_mixed_batch(sample_examples, flat):
    counter = skips.SkipCounter()
    good = 0
    image_in_answer = sources.Example("x", "T", "a.png", (("human", "q"), ("gpt", "<image>")), "f.json", 0)
    for e in sample_examples[:20] + [image_in_answer]:
        try:
            ids, labels = truncate(*tokenize_example(e, flat, "vicuna_v1"), max_length=576 + 80, tokens_per_image=576,
                                   example=e)
            good += 1
        except BadRecord as err:
            skips.skip_or_raise(err, counter)
    assert counter.by_reason[skips.MISALIGNED] == 1 and counter.by_reason[skips.TOO_LONG] > 0   # <image> in answer
    assert good > 0 and good + counter.total == 21
    assert json.loads(json.dumps(counter.as_dict()))["total"] == counter.total
