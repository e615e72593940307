"""Batched KV-cache generation for vflan_jax LLaVA models (entry point).

    python -m vflan_jax.generate --checkpoint ckpt/ --image cat.jpg --prompt "What is this?" [--json]
    python -m vflan_jax.generate --checkpoint ckpt/ --image cat.jpg --interactive < questions.txt

--interactive shows a USER: prompt and keeps the whole conversation in each prompt ('exit' or
Ctrl-D quits). The inputs (checkpoint folder, image, prompt, sampling values) are checked before
a model is loaded: a bad one is one line naming it and exit status 2 (vflan_jax/cli.py).

The library behind it is `vflan_jax.inference.generator.Generator`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK, is_url, resolve_path, route_logging
from vflan_jax.constants import IMAGE_TOKEN
from vflan_jax.inference.generator import CONV_TEMPLATES, GenerationConfig, Generator
from vflan_jax.parallel import OVERRIDES_HELP, ShardingRuleError, parse_overrides, rules_with


# ---------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="vflan_jax model checkpoint or transformers LLaVA directory")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", help="the question (conv_template none: the full prompt with <image>)")
    p.add_argument("--conv_template", default="vicuna_v1", choices=CONV_TEMPLATES)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--image_aspect", default="pad", choices=("pad", "square"))
    p.add_argument("--dtype", default=None, help="cast parameters on load (e.g. bfloat16)")
    p.add_argument("--sharding_overrides", nargs="+", action="extend", default=[], metavar="NAME=AXES",
                   help=OVERRIDES_HELP)
    p.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
    p.add_argument("--interactive", action="store_true", help="multi-turn chat about the image, lines from stdin")
    return p


def sharding_rules(args) -> tuple:
    return rules_with(parse_overrides(args.sharding_overrides))


def input_error(args) -> str | None:
    """What is wrong with the command's inputs (one line naming the culprit), checked before any
    model is loaded; None when they look usable."""
    from vflan_jax.checkpoint import CONFIG, is_model_checkpoint
    if not args.interactive and not (args.prompt or "").strip():
        return "--prompt is required (or use --interactive)"
    if not is_url(args.checkpoint):
        if not os.path.isdir(args.checkpoint):
            return f"--checkpoint {args.checkpoint}: no such directory"
        hf_dir = os.path.exists(os.path.join(args.checkpoint, "config.json"))
        if not is_model_checkpoint(args.checkpoint) and not hf_dir:
            return (f"--checkpoint {args.checkpoint}: neither a vflan_jax model checkpoint ({CONFIG} + params/) "
                    "nor a transformers LLaVA directory (config.json)")
    if args.image is not None and not is_url(args.image):
        try:
            with Image.open(args.image) as im:
                im.load()
        except FileNotFoundError:
            return f"--image {args.image}: file not found"
        except (OSError, Image.DecompressionBombError) as e:
            return f"--image {args.image}: not a readable image ({e})"
    if args.prompt and args.conv_template != "none" and args.image is None and IMAGE_TOKEN in args.prompt:
        return f"--prompt contains {IMAGE_TOKEN} but no --image was given"
    if args.prompt and args.conv_template == "none" and args.image is not None and IMAGE_TOKEN not in args.prompt:
        return f"--conv_template none uses --prompt verbatim: put {IMAGE_TOKEN} where the image goes"
    if args.interactive and args.conv_template != "vicuna_v1":
        return "--interactive keeps the conversation in the vicuna_v1 template: drop --conv_template"
    if args.max_new_tokens < 0:
        return f"--max_new_tokens {args.max_new_tokens}: must be >= 0"
    try:
        sharding_rules(args)
    except ShardingRuleError as e:
        return f"--sharding_overrides {e}"
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        return "need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0"
    return None


def main(argv=None) -> int:
    """Exit status per vflan_jax/cli.py: 0 ok, 2 bad input (one line), 1 failure."""
    args = _parser().parse_args(argv)
    args.checkpoint, args.image = resolve_path(args.checkpoint), resolve_path(args.image)
    route_logging()
    problem = input_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, stop_strings=tuple(args.stop), seed=args.seed)
    from vflan_jax.convert.errors import ConversionError
    try:
        gen = Generator.from_checkpoint(args.checkpoint, conv_template=args.conv_template, batch_size=1,
                                        image_aspect=args.image_aspect, dtype=args.dtype, rules=sharding_rules(args))
    except ConversionError as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ShardingRuleError as e:   # overrides that clash on one of this model's parameters
        print(f"error: --sharding_overrides: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if gen.tokenizer is None:
        print(f"error: --checkpoint {args.checkpoint} has no tokenizer/ (generate needs one)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.interactive:
        from vflan_jax.inference.chat import chat
        chat(gen, args.image, config, sys.stdin, sys.stdout, first_question=args.prompt, as_json=args.json,
             echo=not sys.stdin.isatty())
        return EXIT_OK
    result = gen.generate([args.prompt], [args.image], config)[0]
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids}, ensure_ascii=False))
    else:
        print(result.text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
