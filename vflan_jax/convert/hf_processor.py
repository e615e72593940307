"""The processor files of an export, so `AutoProcessor.from_pretrained(D)` prepares an image and a
chat-templated prompt exactly as vflan_jax does (docs/CONVERSION.md, "The processor"):

* preprocessor_config.json: transformers' `LlavaImageProcessor` with LLaVA's CLIP settings
  (BICUBIC to the tower's image size, CLIP mean/std; docs/REFERENCE.md §3.7). image_aspect "pad" (LLaVA-1.5
  finetuning and evaluation) sets do_pad: the image is centred on a square of the mean colour
  before resizing, as `expand2square` does; "square" (projector pretraining) resizes the
  shortest edge and centre-crops. The PIL backend gives our pixels to float rounding.
* processor_config.json: `LlavaProcessor` with the patch size, the feature selection and the
  CLS token, so each "<image>" expands to the model's tokens_per_image copies.
* chat_template.jinja (processor and tokenizer): the vicuna_v1 conversation (docs/REFERENCE.md §3.1).

One deliberate difference from vflan_jax's prompt text: LLaVA tokenizes the text on either side
of an image separately (docs/REFERENCE.md §3.4), so a SentencePiece tokenizer starts the text after the
image with its "▁" prefix; the processor tokenizes the whole prompt at once and would not. The
template therefore writes a separator after "<image>" (a space for a non-legacy LLaMA
tokenizer, nothing for a legacy one), chosen at export by tokenizing a probe prompt both ways,
so that the processor's token ids equal vflan_jax's.
"""
from __future__ import annotations

import json
import logging

from vflan_jax.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN
from vflan_jax.convert.errors import ConversionError
from vflan_jax.data.conversation import VICUNA_V1, Template, render_prompt
from vflan_jax.data.image import ASPECTS, CLIP_MEAN, CLIP_STD
from vflan_jax.data.tokenize import tokenizer_image_token
from vflan_jax.models.config import ModelConfig

IMAGE_SEPARATORS = ("", " ")   # what may follow "<image>" in the template's text
_PROBE_QUESTION = "What is shown in this picture? Answer with one word."


def image_separator(tokenizer, image_token_id: int) -> str:
    """The text after "<image>" that makes one-pass tokenization equal LLaVA's per-chunk ids."""
    prompt = render_prompt(_PROBE_QUESTION, VICUNA_V1)
    want = [image_token_id if t == IMAGE_PLACEHOLDER else t for t in tokenizer_image_token(prompt, tokenizer)]
    for sep in IMAGE_SEPARATORS:
        if list(tokenizer(prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN + sep)).input_ids) == want:
            return sep
    raise ConversionError(f"no chat template reproduces this tokenizer's LLaVA prompt ids (tried separators "
                          f"{IMAGE_SEPARATORS!r} after {IMAGE_TOKEN})")


def chat_template(template: Template = VICUNA_V1, image_sep: str = "") -> str:
    """A Jinja chat template rendering `template` (style "two") as conversation.render does:
    "{system} USER: <image>{sep}\\n{question} ASSISTANT: {answer}</s>USER: ..."; a first
    message with role system replaces the default system prompt. Images (content items of type
    image, or "<image>" in a string) move to the front of their turn, as preprocess_multimodal."""
    if template.style != "two":
        raise ValueError(f"template {template.name!r}: only a two-role chat template can be exported")
    literal = json.dumps  # Jinja string literals: JSON escaping is valid Jinja
    user, assistant = template.roles
    return (
        "{%- set system = " + literal(template.system) + " -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "  {%- set system = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}\n"
        "  {%- set messages = messages[1:] -%}\n"
        "{%- endif -%}\n"
        "{{- system + " + literal(template.sep) + " -}}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['content'] is string -%}\n"
        "    {%- set text = message['content'] -%}\n"
        "    {%- set images = text.count('<image>') -%}\n"
        "  {%- else -%}\n"
        "    {%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}\n"
        "    {%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}\n"
        "  {%- endif -%}\n"
        "  {%- if message['role'] == 'user' -%}\n"
        "    {%- if images -%}\n"
        "      {%- set text = ('<image>" + image_sep + "\\n' * images"
        " + text.replace('<image>', '') | trim) | trim -%}\n"
        "    {%- endif -%}\n"
        "    {{- " + literal(user + ": ") + " + text + " + literal(template.sep) + " -}}\n"
        "  {%- elif message['role'] == 'assistant' -%}\n"
        "    {{- " + literal(assistant + ": ") + " + text + " + literal(template.sep2) + " -}}\n"
        "  {%- else -%}\n"
        "    {{- raise_exception('roles after the first message must be user or assistant, got '"
        " + message['role']) -}}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- " + literal(assistant + ":") + " -}}{%- endif -%}\n")


def build_processor(tokenizer, cfg: ModelConfig, image_aspect: str = "pad"):
    """The LlavaProcessor of an export (module doc), or None with a warning saying why there is
    none; `processor.save_pretrained(D)` writes it with the tokenizer, which gets the chat template."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor
    if image_aspect not in ASPECTS:
        raise ValueError(f"image_aspect {image_aspect!r}: use one of {ASPECTS}")
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    try:
        if found != cfg.image_token_id:
            raise ConversionError(f"the tokenizer's {IMAGE_TOKEN} is id {found}, the model's image token "
                                  f"{cfg.image_token_id}")
        separator = image_separator(tokenizer, cfg.image_token_id)
    except ConversionError as e:
        logging.warning("no processor exported (tokenizer only; prompts need the image tokens expanded by "
                        "hand): %s", e)
        return None
    v = cfg.vision
    size = v.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=image_aspect == "pad", size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    template = chat_template(VICUNA_V1, separator)
    tokenizer.chat_template = template
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               num_additional_image_tokens=1,  # CLIP's CLS token ("default" drops it again)
                               chat_template=template, image_token=IMAGE_TOKEN)
    return processor
