"""HF transformers / original LLaVA <-> vflan_jax model checkpoints. See docs/CONVERSION.md.

  python -m vflan_jax.convert import-hf --hf_dir llava-1.5-7b-hf --out ckpt/base
  python -m vflan_jax.convert import-hf --vision_tower clip-vit-large-patch14-336 --llm vicuna-7b-v1.5 \
      [--projector mm_projector.bin] --out ckpt/stage0
  python -m vflan_jax.convert export-hf --checkpoint ckpt/base --out hf_out [--dtype bfloat16] [--max_shard_size 5GB]
  python -m vflan_jax.convert verify --checkpoint ckpt/base --hf_dir hf_out [--tolerance 1e-4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_MISMATCH, resolve_path, route_logging
from vflan_jax.convert.errors import ConversionError
from vflan_jax.parallel import OVERRIDES_HELP, ShardingRuleError, parse_overrides, rules_with


def _mesh(text: str):
    from vflan_jax.parallel import make_mesh
    return make_mesh(tuple(int(x) for x in text.split(",")))


def _rules(args):
    try:
        return rules_with(parse_overrides(args.sharding_overrides))
    except ShardingRuleError as e:
        raise ConversionError(f"--sharding_overrides {e}") from None


def cmd_import(args) -> int:
    from vflan_jax.checkpoint import save_model_atomically
    from vflan_jax.convert.hf_import import import_params
    from vflan_jax.convert.import_plan import plan_composed, plan_llava_hf
    if args.hf_dir and (args.vision_tower or args.llm or args.projector):
        raise SystemExit("import-hf: give either --hf_dir, or --vision_tower and --llm (and optionally --projector)")
    from etils import epath
    if epath.Path(args.out).exists() and not args.overwrite:   # said before any weight is read
        raise ConversionError(f"--out {args.out} exists, use --overwrite to replace it")
    rules = _rules(args)
    if args.hf_dir:
        plan = plan_llava_hf(args.hf_dir, args.param_dtype)
    elif args.vision_tower and args.llm:
        plan = plan_composed(args.vision_tower, args.llm, args.projector, args.param_dtype,
                             projector_type=args.projector_type, vision_feature_layer=args.vision_feature_layer)
    else:
        raise SystemExit("import-hf: --hf_dir, or both --vision_tower and --llm, are required")
    params = import_params(plan, _mesh(args.mesh), rules, seed=args.seed)
    config = plan.config
    if args.adapter:   # a PEFT LoRA adapter onto the imported base (convert/lora_peft.py)
        from vflan_jax.convert.lora_peft import import_adapter
        params, config = import_adapter(args.adapter, params, config)
    # Atomic (written beside --out, then renamed): a failure leaves no half-written checkpoint behind.
    save_model_atomically(args.out, params, config, tokenizer_dir=plan.tokenizer_dir, replace=args.overwrite)
    print(json.dumps({"out": args.out, "fresh": list(plan.fresh), "image_token_id": plan.config.image_token_id,
                      "tokenizer": str(plan.tokenizer_dir) if plan.tokenizer_dir else None}))
    return 0


def _require_checkpoint(path: str) -> None:
    from vflan_jax.checkpoint import CONFIG, PARAMS, is_model_checkpoint
    if not is_model_checkpoint(path):
        raise ConversionError(f"--checkpoint {path}: not a vflan_jax model checkpoint ({CONFIG} + {PARAMS}/ missing)")


def cmd_export(args) -> int:
    _require_checkpoint(args.checkpoint)
    rules = _rules(args)
    if args.adapter_only:   # a PEFT adapter directory instead of merged weights (convert/lora_peft.py)
        from vflan_jax.checkpoint import load_model
        from vflan_jax.convert.lora_peft import export_adapter
        config = export_adapter(*load_model(args.checkpoint, _mesh(args.mesh), rules), args.out)
        print(json.dumps({"out": args.out, "adapter_only": True, "r": config["r"], "lora_alpha": config["lora_alpha"]}))
        return 0
    from vflan_jax.convert.hf_export import export_hf
    cfg = export_hf(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.seed, _mesh(args.mesh),
                    image_aspect=args.image_aspect, rules=rules)
    print(json.dumps({"out": args.out, "image_token_id": cfg["image_token_id"],
                      "vocab_size": cfg["text_config"]["vocab_size"], "dtype": cfg["dtype"]}))
    return 0


def cmd_verify(args) -> int:
    from vflan_jax.convert.verify import verify
    _require_checkpoint(args.checkpoint)
    if not os.path.exists(os.path.join(args.hf_dir, "config.json")):
        raise ConversionError(f"--hf_dir {args.hf_dir}: no config.json (not a transformers LLaVA directory)")
    result = verify(args.checkpoint, args.hf_dir, args.tolerance, args.batch, args.seq_len, args.seed)
    print(json.dumps(result, indent=2))
    return EXIT_OK if result["passed"] else EXIT_VERIFY_MISMATCH


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mesh_help = "data,fsdp,tensor mesh the parameters are placed on (-1: the remaining devices)"
    sharding = dict(nargs="+", action="extend", default=[], metavar="NAME=AXES", help=OVERRIDES_HELP)

    imp = sub.add_parser("import-hf", help="HF/LLaVA checkpoint(s) -> vflan_jax model checkpoint")
    imp.add_argument("--hf_dir", help="transformers LlavaForConditionalGeneration directory (any key layout)")
    imp.add_argument("--vision_tower", help="CLIPModel or CLIPVisionModel directory")
    imp.add_argument("--llm", help="LlamaForCausalLM directory, or an original LLaVA (llava_llama) directory")
    imp.add_argument("--projector", help="LLaVA projector file (mm_projector.bin or .safetensors)")
    imp.add_argument("--out", required=True, help="model checkpoint directory to write")
    imp.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    imp.add_argument("--projector_type", default="mlp2x_gelu",
                     help="for a plain LLaMA --llm (LLaVA configs carry theirs)")
    imp.add_argument("--vision_feature_layer", type=int, default=-2, help="for a plain LLaMA --llm")
    imp.add_argument("--seed", type=int, default=0, help="initialisation of a projector no file provides")
    imp.add_argument("--mesh", default="1,-1,1", help=mesh_help)
    imp.add_argument("--sharding_overrides", **sharding)
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.add_argument("--adapter",
                     help="PEFT LoRA adapter directory to apply onto the imported model (kept as adapters)")
    imp.set_defaults(run=cmd_import)

    exp = sub.add_parser("export-hf", help="vflan_jax model checkpoint -> transformers LLaVA directory")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="of the written tensors (default: the checkpoint's param_dtype)")
    exp.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB; above it: sharded files + index")
    exp.add_argument("--seed", type=int, default=0, help="sampling of the rows added for <image>/<pad>")
    from vflan_jax.data.image import ASPECTS
    exp.add_argument("--image_aspect", default="pad", choices=ASPECTS,
                     help="how the exported processor fits images: pad (LLaVA-1.5 finetune/eval) or square")
    exp.add_argument("--mesh", default="1,-1,1", help=mesh_help)
    exp.add_argument("--sharding_overrides", **sharding)
    exp.add_argument("--adapter_only", action="store_true",
                     help="LoRA checkpoint: write a PEFT adapter directory, not merged full weights")
    exp.set_defaults(run=cmd_export)

    ver = sub.add_parser("verify", help="compare logits of a model checkpoint and a transformers directory")
    ver.add_argument("--checkpoint", required=True)
    ver.add_argument("--hf_dir", required=True)
    ver.add_argument("--tolerance", type=float, default=1e-4, help="largest relative L2 logit difference that passes")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq_len", type=int, default=None, help="default: image tokens + 16")
    ver.add_argument("--seed", type=int, default=0)
    ver.set_defaults(run=cmd_verify)
    return p


PATH_ARGS = ("hf_dir", "vision_tower", "llm", "projector", "out", "checkpoint", "adapter")


def main(argv=None) -> int:
    """Exit status per vflan_jax/cli.py: 0 ok, 2 bad input (one line), 3 verify mismatch, 1 failure."""
    args = parser().parse_args(argv)
    for name in PATH_ARGS:
        if hasattr(args, name):
            setattr(args, name, resolve_path(getattr(args, name)))
    route_logging()
    try:
        return args.run(args)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ShardingRuleError as e:   # --sharding_overrides that clash on one of the model's parameters
        print(f"error: --sharding_overrides: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
