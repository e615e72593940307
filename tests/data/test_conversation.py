"""Templates rendered exactly as docs/REFERENCE.md §3.1-3.3, and the supervised character spans."""
import pytest

from vflan_jax.data import conversation as conv

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
       "helpful, detailed, and polite answers to the user's questions.")


def test_vicuna_constants():
    t = conv.TEMPLATES["vicuna_v1"]
    assert (t.system, t.roles, t.sep, t.sep2) == (SYS, ("USER", "ASSISTANT"), " ", "</s>")


def test_two_round_render_and_spans():
    turns = [("human", "<image>\nQ1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2 two words")]
    text, spans = conv.render_with_spans(turns, "vicuna_v1")
    assert text == f"{SYS} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2 two words</s>"
    assert conv.render(turns, "vicuna_v1") == text
    assert [text[s:e] for s, e in spans] == ["A1</s>", "A2 two words</s>"]


def test_three_round_spans_cover_only_answers():
    turns = [("human", "<image>\nq"), ("gpt", "ASSISTANT: tricky"), ("human", "x"), ("gpt", "y"),
             ("human", "z"), ("gpt", "</s>w")]
    text, spans = conv.render_with_spans(turns, conv.VICUNA_V1)
    assert [text[s:e] for s, e in spans] == ["ASSISTANT: tricky</s>", "y</s>", "</s>w</s>"]
    gaps = zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)], strict=True)
    outside = "".join(text[a:b] for a, b in gaps)
    assert outside == f"{SYS} USER: <image>\nq ASSISTANT: USER: x ASSISTANT: USER: z ASSISTANT: "


def test_render_rejects_bad_roles():
    with pytest.raises(ValueError, match="alternate"):
        conv.render([("gpt", "a"), ("human", "b")], "vicuna_v1")


@pytest.mark.parametrize("text, expected", [
    ("Describe it.\n<image>", "<image>\nDescribe it."),
    ("<image>\nDescribe it.", "<image>\nDescribe it."),
    ("Left <image> right", "<image>\nLeft  right"),   # LLaVA removes the tag and strips, no space repair
    ("<image>", "<image>"),
    ("  two <image><image> tags ", "<image>\ntwo  tags"),
    ("no image here ", "no image here "),
])
def test_preprocess_multimodal(text, expected):
    assert conv.preprocess_multimodal([("human", text), ("gpt", "a")]) == (("human", expected), ("gpt", "a"))


def test_plain_template():
    text, spans = conv.render_with_spans([("human", "Describe.\n<image>"), ("gpt", "a red circle")], "plain")
    assert text == "<image>a red circle\n"
    assert [text[s:e] for s, e in spans] == ["a red circle\n"]
    with pytest.raises(ValueError, match="exactly 2 turns"):
        conv.render([("human", "<image>"), ("gpt", "a"), ("human", "b"), ("gpt", "c")], "plain")
    with pytest.raises(ValueError, match="<image>"):
        conv.render([("human", "no image"), ("gpt", "a")], "plain")


def test_render_prompt():
    assert conv.render_prompt("What is this?", "vicuna_v1") == f"{SYS} USER: <image>\nWhat is this? ASSISTANT:"
    assert conv.render_prompt("What is this? <image>", "vicuna_v1") == f"{SYS} USER: <image>\nWhat is this? ASSISTANT:"
    assert conv.render_prompt("Hi", "vicuna_v1", with_image=False) == f"{SYS} USER: Hi ASSISTANT:"
    assert conv.render_prompt("ignored", "plain") == "<image>"


def test_unknown_template():
    with pytest.raises(ValueError, match=r"unknown conversation template 'llama3'.*plain.*vicuna_v1"):
        conv.get_template("llama3")
