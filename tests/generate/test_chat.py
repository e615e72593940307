"""--interactive: a USER: prompt, how to quit, and the whole conversation in every prompt."""
import io
import random

from vflan_jax.inference.chat import chat
from vflan_jax.inference.generator import GenerationResult


class RecordingGenerator:
    """Answers with a random word and keeps the prompts it was given."""
    conv_template = "vicuna_v1"

    def __init__(self):
        self.prompts, self.answers, self.rng = [], [], random.Random(0)

    def _generate_texts(self, prompts, images, config):
        self.prompts += prompts
        self.answers.append(self.rng.choice(["red", "a circle", "two", "yes"]) + str(self.rng.randint(0, 99)))
        return [GenerationResult(self.answers[-1], [5])]


def test_piped_chat_reads_as_a_conversation_and_keeps_it():
    gen, out = RecordingGenerator(), io.StringIO()
    turns = chat(gen, "cat.png", None, io.StringIO("What is it?\n\nWhat colour?\nquit\nnever asked\n"), out, echo=True)
    a1, a2 = gen.answers
    assert out.getvalue().splitlines() == [
        "Chat about cat.png: type a question after USER:, 'exit' or Ctrl-D to quit.",
        "USER: What is it?", f"ASSISTANT: {a1}", "USER: ", "USER: What colour?", f"ASSISTANT: {a2}", "USER: quit"]
    assert len(turns) == 4
    # the second prompt carries the first exchange, the image in the first turn only, LLaVA's separators
    assert gen.prompts[1].endswith(f"USER: <image>\nWhat is it? ASSISTANT: {a1}</s>USER: What colour? ASSISTANT:")
    assert gen.prompts[1].count("<image>") == 1


def test_prompt_argument_is_shown_and_eof_ends_cleanly():
    gen, out = RecordingGenerator(), io.StringIO()
    chat(gen, None, None, io.StringIO(""), out, first_question="Hello?")
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["USER: Hello?", f"ASSISTANT: {gen.answers[0]}", "USER: "]
    assert "<image>" not in gen.prompts[0]


def test_json_mode_writes_only_answers():
    gen, out = RecordingGenerator(), io.StringIO()
    chat(gen, "cat.png", None, io.StringIO("a\nb\n"), out, as_json=True, echo=True)
    assert [line[:9] for line in out.getvalue().splitlines()] == ['{"text": '] * 2
