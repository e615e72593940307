"""Multi-node GPU training under SLURM: writes an sbatch script and submits it.

    python launch/slurm_gpu.py --config configs/vflan_stage1.py:size=13b,data_dir=/shared/vision-flan \\
        --workdir /shared/runs/stage1-13b --nodes 2 --gpus_per_node 8 [--per gpu|node] \\
        [--partition P] [--account A] [--time 24:00:00] [--venv /shared/vflan_jax/.venv] [--dry_run] \\
        [-- --config.init_from=/shared/ckpt/llava15-13b-pretrained]

One JAX process per node (`--per node`, default: each process drives the node's GPUs) or per GPU
(`--per gpu`: JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID). Every process gets JAX_COORDINATOR_ADDRESS
(the job's first node), JAX_NUM_PROCESSES=$SLURM_NTASKS and JAX_PROCESS_ID=$SLURM_PROCID, which
vflan_jax.parallel.initialize_distributed passes to jax.distributed.initialize.

Preemption and time limits: `#SBATCH --signal=TERM@<grace>` makes SLURM send SIGTERM to the
trainers <grace> seconds before the end; they finish the step, save, and exit 75; the script then
runs `scontrol requeue $SLURM_JOB_ID` (the job is `--requeue`-able), and the requeued job
resumes from that checkpoint. The repository and --workdir must be on a file system every node
sees. --dry_run prints the script and the sbatch command instead of writing/submitting.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402 - after the sys.path line: _common sits beside this script (launch/ is no package)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    p.add_argument("--workdir", required=True, help="on the shared file system")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--per", choices=("node", "gpu"), default="node", help="one JAX process per node or per GPU")
    p.add_argument("--cpus_per_task", type=int, default=None, help="default: 8 per GPU the task drives")
    p.add_argument("--job_name", default="vflan")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--signal_grace_s", type=int, default=120,
                   help="SIGTERM this many seconds before the time limit (one step + a checkpoint save must fit)")
    p.add_argument("--port", type=int, default=12355, help="coordinator port on the first node")
    p.add_argument("--repo", default=str(_common.REPO), help="the repository on the shared file system")
    p.add_argument("--venv", default=None, help="virtual environment to activate (default: REPO/.venv)")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before training on the batch host, e.g. 'module load cuda/12.4' (repeatable)")
    p.add_argument("--xla_flags", default="",
                   help="more XLA flags, appended after the launcher's (write --xla_flags=\"--flag=v ...\")")
    p.add_argument("--mem_fraction", type=float, default=None, help="XLA_PYTHON_CLIENT_MEM_FRACTION")
    p.add_argument("--log_dir", default=None, help="where SLURM writes the job's output (default: WORKDIR/slurm)")
    p.add_argument("--script", default=None, help="sbatch file to write (default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command only")
    p.add_argument("overrides", nargs="*", help="--config.FIELD=VALUE (after --)")
    return p.parse_args(argv)


def sbatch_script(args) -> str:
    per_gpu = args.per == "gpu"
    tasks_per_node = args.gpus_per_node if per_gpu else 1
    cpus = args.cpus_per_task or 8 * (1 if per_gpu else args.gpus_per_node)
    log_dir = args.log_dir or os.path.join(args.workdir, "slurm")
    venv = args.venv or os.path.join(args.repo, ".venv")
    train = _common.join(_common.train_args(args.config, args.workdir, args.overrides, python="python"))
    q = shlex.quote

    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --nodes={args.nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}",
             f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             f"#SBATCH --cpus-per-task={cpus}",
             "#SBATCH --exclusive",
             f"#SBATCH --signal=TERM@{args.signal_grace_s}",
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={log_dir}/%x-%j.out"]
    for flag, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                        ("time", args.time)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += ["",
              "set -uo pipefail",
              f"cd {q(args.repo)}",
              *args.setup,
              f"source {q(os.path.join(venv, 'bin', 'activate'))}",
              "",
              "# jax.distributed: the coordinator is the job's first node; one process per task.",
              'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
              f':{args.port}"',
              'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
              f"export XLA_FLAGS={q(_common.xla_flags(args.xla_flags))}"]
    if args.mem_fraction is not None:
        lines.append(f"export XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction:g}")
    # Per-task variables must be expanded inside each task, hence the single-quoted bash -c.
    per_task = "export JAX_PROCESS_ID=$SLURM_PROCID"
    if per_gpu:  # every task sees all of the node's GPUs and takes the one at its local rank
        per_task += " JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID"
    task_command = f"{per_task}; exec {train}"
    lines += ["",
              f"srun --kill-on-bad-exit=0 --ntasks-per-node={tasks_per_node} bash -c {q(task_command)}",
              "status=$?",
              f'if [ "$status" -eq {_common.EXIT_PREEMPTED} ]; then',
              '  echo "trainer saved a checkpoint and stopped (status 75): requeueing job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              'exit "$status"',
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("--nodes and --gpus_per_node must be >= 1")
    script = sbatch_script(args)
    log_dir = args.log_dir or os.path.join(args.workdir, "slurm")
    path = args.script or os.path.join(log_dir, f"{args.job_name}.sbatch")
    submit = _common.join(["sbatch", path])
    if args.dry_run:
        print(f"mkdir -p {shlex.quote(log_dir)}")
        print(f"cat > {shlex.quote(path)} <<'EOF'")
        print(script, end="")
        print("EOF")
        print(submit)
        return 0
    os.makedirs(log_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    return _common.run_shell(submit, check=False)


if __name__ == "__main__":
    sys.exit(main())
