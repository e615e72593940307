"""Train on one GPU host (one process, all of its GPUs; or a chosen subset).

    python launch/single_gpu.py --config configs/vflan_stage1.py:size=7b,data_dir=/data/vision-flan \\
        --workdir /ckpt/stage1-7b [--gpus 0,1,2,3] [--mem_fraction 0.9] [--max_restarts 3] [--dry_run] \\
        [-- --config.init_from=ckpt/llava15-7b-pretrained ...]

Sets XLA_FLAGS (launch/README.md) and runs `python -m vflan_jax.train` in the current directory
(relative paths mean what they mean to the trainer run by hand). When the trainer exits
with status 75 (it received SIGTERM, e.g. from a spot-VM shutdown agent, and saved a checkpoint)
the same command is re-run, which resumes; a SIGTERM/Ctrl-C sent to this launcher is forwarded
to the trainer and the launcher stops after it has saved. --dry_run prints the command.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402 - after the sys.path line: _common sits beside this script (launch/ is no package)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES (default: all GPUs of the host)")
    p.add_argument("--mem_fraction", type=float, default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75%% of GPU memory by default)")
    p.add_argument("--xla_flags", default="",
                   help="more XLA flags, appended after the launcher's (write --xla_flags=\"--flag=v ...\")")
    p.add_argument("--python", default=sys.executable, help="the interpreter with vflan_jax installed")
    p.add_argument("--max_restarts", type=int, default=3, help="re-runs after exit status 75")
    p.add_argument("--dry_run", action="store_true", help="print the command instead of running it")
    p.add_argument("overrides", nargs="*", help="--config.FIELD=VALUE (after --)")
    return p.parse_args(argv)


def command_env(args) -> dict:
    env = {"XLA_FLAGS": _common.xla_flags(args.xla_flags)}
    if args.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.gpus
    if args.mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{args.mem_fraction:g}"
    return env


def main(argv=None) -> int:
    args = parse(argv)
    train = _common.train_args(args.config, args.workdir, args.overrides, python=args.python)
    env = command_env(args)
    # The trainer runs where the launcher was started: relative --config/--workdir/override paths
    # mean what they mean to the user (the trainer makes them absolute).
    cwd = os.getcwd()
    if args.dry_run:
        _common.emit([f"cd {_common.join([cwd])}", f"{_common.env_assignments(env)} {_common.join(train)}"], True)
        return 0
    full_env = {**os.environ, **env}
    forward = _common.ForwardSignals()
    return _common.resume_loop(lambda: forward.run(train, env=full_env, cwd=cwd), args.max_restarts,
                               should_retry=lambda rc: rc == _common.EXIT_PREEMPTED and not forward.received)


if __name__ == "__main__":
    sys.exit(main())
