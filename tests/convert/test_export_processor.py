"""export-hf writes a complete processor: AutoProcessor + LlavaForConditionalGeneration.generate on
an image and a chat-templated prompt give the same greedy tokens as vflan_jax's Generator, with
the LLaMA-style SentencePiece tokenizer training uses."""
import dataclasses
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from tests.convert.checkpoints import write_llava_hf
from tests.models.hf_oracle import nano_config
from vflan_jax.checkpoint import save_model
from vflan_jax.convert.hf_export import export_hf
from vflan_jax.convert.hf_import import import_llava_hf
from vflan_jax.convert.hf_processor import build_processor
from vflan_jax.data import synthetic
from vflan_jax.data.conversation import VICUNA_V1, render, render_prompt
from vflan_jax.data.image import load_pixels, pixels_from_image
from vflan_jax.data.tokenize import tokenizer_image_token
from vflan_jax.inference.batching import expand_image_placeholders
from vflan_jax.inference.generator import GenerationConfig, Generator

QUESTION = "What shape is drawn in the picture? Answer with one word."
WORDS = ("circle square triangle red green blue shape colour picture drawn how many what which is the "
         "answer with one word left right top bottom").split()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(vflan_jax checkpoint with the -200 placeholder, its HF export, an image file)."""
    root = tmp_path_factory.mktemp("export_processor")
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    tok_dir = synthetic.build_tokenizer(root / "tokenizer", texts, vocab_size=400)
    cfg = nano_config()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=512), image_token_id=511)
    write_llava_hf(root / "hf_src", cfg, "disk", seed=3)
    params, imported, _ = import_llava_hf(root / "hf_src", progress=False)
    ckpt = root / "ckpt"
    save_model(ckpt, params, imported.replace(image_token_id=-200), tokenizer_dir=tok_dir)
    out = root / "hf"
    export_hf(ckpt, out, progress=False)
    image = root / "wide.png"
    Image.fromarray(rng.integers(0, 256, (20, 44, 3), np.uint8)).save(image)  # not square: "pad" matters
    return ckpt, out, image


def messages(question, answer=None, follow_up=None):
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                  {"role": "user", "content": [{"type": "text", "text": follow_up}]}]
    return turns


def test_processor_prepares_what_vflan_jax_feeds_the_model(exported):
    ckpt, out, image = exported
    processor = AutoProcessor.from_pretrained(out)
    cfg = LlavaForConditionalGeneration.from_pretrained(out).config
    prompt = processor.apply_chat_template(messages(QUESTION), add_generation_prompt=True)
    ours_text = render_prompt(QUESTION, "vicuna_v1")
    assert prompt.replace("<image> ", "<image>") == ours_text  # the template's one extra space (hf_processor.py)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="np")

    tok = AutoTokenizer.from_pretrained(out)
    ours_cfg = nano_config().replace(image_token_id=cfg.image_token_id)
    ours_ids = expand_image_placeholders(tokenizer_image_token(ours_text, tok), 1, ours_cfg)
    assert inputs["input_ids"][0].tolist() == ours_ids
    assert np.abs(inputs["pixel_values"][0] - load_pixels(image, image_size=28, aspect="pad")).max() < 1e-6

    # multi-turn, and the string form with "<image>" inside the text, render like conversation.render
    turns = messages(QUESTION, "circle", "And its colour?")
    text = processor.apply_chat_template(turns)
    reference = render([("human", "<image>\n" + QUESTION), ("gpt", "circle"), ("human", "And its colour?")],
                       "vicuna_v1")
    assert text.replace("<image> ", "<image>") == reference
    as_strings = [{"role": "user", "content": QUESTION + " <image>"}]
    assert processor.apply_chat_template(as_strings, add_generation_prompt=True) == prompt
    system = [{"role": "system", "content": "Be brief."}, *messages(QUESTION)]
    assert processor.apply_chat_template(system, add_generation_prompt=True) == prompt.replace(
        VICUNA_V1.system, "Be brief.")


def test_transformers_generate_equals_vflan_jax_generate(exported):
    ckpt, out, image = exported
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    prompt = processor.apply_chat_template(messages(QUESTION), add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()

    ours = Generator.from_checkpoint(ckpt, batch_size=1).generate(
        [QUESTION], [str(image)], GenerationConfig(max_new_tokens=8))[0].token_ids
    assert len(ours) >= 4 and hf == ours
    assert pathlib.Path(out, "preprocessor_config.json").exists() and pathlib.Path(out, "chat_template.jinja").exists()


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_image_processor_pixels_equal_ours(exported, aspect):
    ckpt, out, _ = exported
    cfg = nano_config().replace(image_token_id=AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>"))
    processor = build_processor(AutoTokenizer.from_pretrained(out), cfg, aspect)
    rng = np.random.default_rng(7)
    for h, w in ((20, 44), (45, 17), (28, 28), (9, 70)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        hf = processor.image_processor(images=img, return_tensors="np")["pixel_values"][0]
        assert np.abs(hf - pixels_from_image(img, image_size=28, aspect=aspect)).max() < 1e-6


def test_no_processor_without_an_image_token(llava_hf_dir, nano_cfg, caplog):
    """A tokenizer without "<image>" for the model's in-vocabulary image token: tokenizer only, said so."""
    hf_dir, _ = llava_hf_dir
    with caplog.at_level("WARNING"):
        assert build_processor(AutoTokenizer.from_pretrained(hf_dir), nano_cfg) is None
    assert f"model's image token {nano_cfg.image_token_id}" in caplog.text
