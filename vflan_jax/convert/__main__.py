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
import sys

from vflan_jax.convert.errors import ConversionError


def _mesh(text: str):
    from vflan_jax.parallel import make_mesh
    return make_mesh(tuple(int(x) for x in text.split(",")))


def cmd_import(args) -> int:
    from vflan_jax.convert.hf_import import import_params
    from vflan_jax.convert.import_plan import plan_composed, plan_llava_hf
    from vflan_jax.model_checkpoint import save_model
    if args.hf_dir and (args.vision_tower or args.llm or args.projector):
        raise SystemExit("import-hf: give either --hf_dir, or --vision_tower and --llm (and optionally --projector)")
    if args.hf_dir:
        plan = plan_llava_hf(args.hf_dir, args.param_dtype)
    elif args.vision_tower and args.llm:
        plan = plan_composed(args.vision_tower, args.llm, args.projector, args.param_dtype,
                             projector_type=args.projector_type, vision_feature_layer=args.vision_feature_layer)
    else:
        raise SystemExit("import-hf: --hf_dir, or both --vision_tower and --llm, are required")
    params = import_params(plan, _mesh(args.mesh), seed=args.seed)
    save_model(args.out, params, plan.config, tokenizer_dir=plan.tokenizer_dir, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "fresh": list(plan.fresh), "image_token_id": plan.config.image_token_id,
                      "tokenizer": str(plan.tokenizer_dir) if plan.tokenizer_dir else None}))
    return 0


def cmd_export(args) -> int:
    from vflan_jax.convert.hf_export import export_hf
    cfg = export_hf(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.seed, _mesh(args.mesh))
    print(json.dumps({"out": args.out, "image_token_id": cfg["image_token_id"],
                      "vocab_size": cfg["text_config"]["vocab_size"], "dtype": cfg["dtype"]}))
    return 0


def cmd_verify(args) -> int:
    from vflan_jax.convert.verify import verify
    result = verify(args.checkpoint, args.hf_dir, args.tolerance, args.batch, args.seq_len, args.seed)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mesh_help = "data,fsdp,tensor mesh the parameters are placed on (-1: the remaining devices)"

    imp = sub.add_parser("import-hf", help="HF/LLaVA checkpoint(s) -> vflan_jax model checkpoint")
    imp.add_argument("--hf_dir", help="transformers LlavaForConditionalGeneration directory (any key layout)")
    imp.add_argument("--vision_tower", help="CLIPModel or CLIPVisionModel directory")
    imp.add_argument("--llm", help="LlamaForCausalLM directory, or an original LLaVA (llava_llama) directory")
    imp.add_argument("--projector", help="LLaVA projector file (mm_projector.bin or .safetensors)")
    imp.add_argument("--out", required=True, help="model checkpoint directory to write")
    imp.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    imp.add_argument("--projector_type", default="mlp2x_gelu", help="for a plain LLaMA --llm (LLaVA configs carry theirs)")
    imp.add_argument("--vision_feature_layer", type=int, default=-2, help="for a plain LLaMA --llm")
    imp.add_argument("--seed", type=int, default=0, help="initialisation of a projector no file provides")
    imp.add_argument("--mesh", default="1,-1,1", help=mesh_help)
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(run=cmd_import)

    exp = sub.add_parser("export-hf", help="vflan_jax model checkpoint -> transformers LLaVA directory")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="of the written tensors (default: the checkpoint's param_dtype)")
    exp.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB; above it: sharded files + index")
    exp.add_argument("--seed", type=int, default=0, help="sampling of the rows added for <image>/<pad>")
    exp.add_argument("--mesh", default="1,-1,1", help=mesh_help)
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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
