"""Train on a Cloud TPU VM or pod slice: create it (or use an existing one), put the code on every
worker, start the same trainer command on all workers, stream the logs, and resume after
preemption.

    python launch/tpu_pod.py --name vflan-v5p --zone us-east5-a --accelerator_type v5p-64 \\
        [--create none|vm|queued] [--spot] [--project P] \\
        --config configs/vflan_stage1.py:size=13b,data_dir=/mnt/data/vision-flan \\
        --workdir /mnt/runs/stage1-13b [--repo_url https://github.com/you/vflan_jax --ref main] \\
        [--setup 'sudo mount ...'] [--max_restarts 10] [--dry_run] [-- --config.init_from=...]
    python launch/tpu_pod.py --name vflan-v5p --zone us-east5-a --action logs     # follow worker 0's log
    python launch/tpu_pod.py --name vflan-v5p --zone us-east5-a --action delete [--create queued]

Steps (each a gcloud command; --dry_run prints them in order and runs nothing):
  1. create: `gcloud compute tpus tpu-vm create` (--create vm), or a queued resource
     (`gcloud compute tpus queued-resources create`, then poll until ACTIVE) (--create queued);
  2. code: `git archive HEAD` of this checkout copied to every worker with `tpu-vm scp --worker=all`
     (commit first: uncommitted changes are not sent), or `git clone --repo_url` on every worker;
  3. install: a Python 3.11 venv with requirements.txt, this package and jax[tpu] on every worker;
  4. train: `tpu-vm ssh --worker=all --command=...` runs `python -m vflan_jax.train` on all workers
     at once (VFLAN_DISTRIBUTED=auto: jax.distributed.initialize finds the pod's workers itself).
     gcloud streams every worker's output here; each worker also appends to ~/vflan_train.log.
  5. resume: if that exits with status 75 (the trainers saved after SIGTERM) or the connection
     dropped (255), or the TPU is no longer READY (spot preemption), the TPU is recreated when this
     script created it (steps 1-3 again), and step 4 is re-issued unchanged: the trainer resumes from
     the newest checkpoint in --workdir. Any other status stops the loop.

--workdir and the data must be on storage every worker reads and that outlives the VMs: see
launch/README.md (a Cloud Storage bucket mounted with Cloud Storage FUSE, or Filestore).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402 - after the sys.path line: _common sits beside this script (launch/ is no package)

JAX_VERSION = "0.10.2"  # = requirements.txt; jax[tpu] adds the matching libtpu
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/vflan_jax"
REMOTE_VENV = "~/vflan_venv"
REMOTE_LOG = "~/vflan_train.log"
TARBALL = "vflan_jax.tar.gz"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--action", default="train", choices=("train", "logs", "delete"),
                   help="train (default); logs: follow worker 0's log; delete: delete the TPU / queued resource")
    p.add_argument("--name", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator_type", default=None, help="e.g. v5p-64, v4-32, v5litepod-16, v6e-64")
    p.add_argument("--runtime_version", default=None, help="default: chosen from the accelerator generation")
    p.add_argument("--create", choices=("none", "vm", "queued"), default="none",
                   help="none: use the existing TPU; vm: tpu-vm create; queued: a queued resource")
    p.add_argument("--queued_resource", default=None, help="queued resource id (default: NAME-qr)")
    p.add_argument("--spot", action="store_true", help="Spot TPU (preemptible; the resume loop recreates it)")
    p.add_argument("--repo_url", default=None, help="git clone this on the workers instead of copying the checkout")
    p.add_argument("--ref", default="main", help="branch/tag/commit for --repo_url")
    p.add_argument("--remote_python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run on every worker after install, e.g. a gcsfuse mount (repeatable)")
    p.add_argument("--skip_install", action="store_true", help="the workers already have the code and venv")
    p.add_argument("--config", default=None, help="configs/NAME.py[:args]")
    p.add_argument("--workdir", default=None, help="shared storage path every worker sees")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the trainers (repeatable)")
    p.add_argument("--max_restarts", type=int, default=10)
    p.add_argument("--poll_s", type=float, default=60.0, help="queued-resource polling interval")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="--config.FIELD=VALUE (after --)")
    args = p.parse_args(argv)
    if args.action == "train" and (not args.config or not args.workdir):
        p.error("train needs --config and --workdir")
    if args.create != "none" and not args.accelerator_type:
        p.error("--create needs --accelerator_type")
    for item in args.env:
        if "=" not in item:
            p.error(f"--env {item!r}: use NAME=VALUE")
    return args


def runtime_version(args) -> str:
    if args.runtime_version:
        return args.runtime_version
    generation = args.accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise SystemExit(f"no default runtime for {args.accelerator_type}; pass --runtime_version")
    return RUNTIME_VERSIONS[generation]


class Gcloud:
    """The gcloud command lines, as strings exactly as they are run."""

    def __init__(self, args):
        self.args = args
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
        self.qr = args.queued_resource or f"{args.name}-qr"

    def _tpu(self, *words):
        return _common.join(["gcloud", "compute", "tpus", *words])

    def create(self) -> list[str]:
        a = self.args
        spot = ["--spot"] if a.spot else []
        if a.create == "vm":
            return [self._tpu("tpu-vm", "create", a.name, *self.where, f"--accelerator-type={a.accelerator_type}",
                              f"--version={runtime_version(a)}", *spot)]
        if a.create == "queued":
            return [self._tpu("queued-resources", "create", self.qr, f"--node-id={a.name}", *self.where,
                              f"--accelerator-type={a.accelerator_type}", f"--runtime-version={runtime_version(a)}",
                              *spot)]
        return []

    def queued_state(self) -> str:
        return self._tpu("queued-resources", "describe", self.qr, *self.where, "--format=value(state.state)")

    def tpu_state(self) -> str:
        return self._tpu("tpu-vm", "describe", self.args.name, *self.where, "--format=value(state)")

    def delete(self) -> list[str]:
        if self.args.create == "queued":
            return [self._tpu("queued-resources", "delete", self.qr, *self.where, "--force", "--quiet")]
        return [self._tpu("tpu-vm", "delete", self.args.name, *self.where, "--quiet")]

    def ssh(self, command: str, worker: str = "all") -> str:
        return self._tpu("tpu-vm", "ssh", self.args.name, *self.where, f"--worker={worker}", f"--command={command}")

    def scp(self, local: str, remote: str) -> str:
        return self._tpu("tpu-vm", "scp", local, f"{self.args.name}:{remote}", *self.where, "--worker=all")


def install_commands(args, g: Gcloud) -> list[str]:
    """Code on every worker, then a venv with the pinned requirements and jax[tpu]."""
    cmds = []
    if args.repo_url:
        fetch = (f"rm -rf {REMOTE_DIR} && git clone --quiet {shlex.quote(args.repo_url)} {REMOTE_DIR} && "
                 f"git -C {REMOTE_DIR} checkout --quiet {shlex.quote(args.ref)}")
    else:
        local = f"/tmp/{args.name}-{TARBALL}"
        cmds.append(_common.join(["git", "-C", str(_common.REPO), "archive", "--format=tar.gz", f"--output={local}",
                                  "HEAD"]))
        cmds.append(g.scp(local, f"~/{TARBALL}"))
        fetch = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/{TARBALL} -C {REMOTE_DIR}"
    py = args.remote_python
    install = (f"(command -v {py} >/dev/null || (sudo apt-get update -q && "
               f"sudo apt-get install -y -q {py} {py}-venv)) && "
               f"{py} -m venv {REMOTE_VENV} && cd {REMOTE_DIR} && "
               f"{REMOTE_VENV}/bin/pip install -q -r requirements.txt -e . 'jax[tpu]=={JAX_VERSION}'")
    cmds.append(g.ssh(f"set -e; {fetch}; {install}"))
    for line in args.setup:
        cmds.append(g.ssh(line))
    return cmds


def remote_train_command(args) -> str:
    """What every worker runs: the same trainer command; output to the ssh stream and a log file."""
    train = _common.train_args(args.config, args.workdir, args.overrides)[1:]  # without "python"
    env = {"VFLAN_DISTRIBUTED": "auto"}
    for item in args.env:
        k, v = item.split("=", 1)
        env[k] = v
    return (f"cd {REMOTE_DIR} && {_common.env_assignments(env)} {REMOTE_VENV}/bin/python {_common.join(train)} 2>&1 "
            f"| tee -a {REMOTE_LOG}; exit ${{PIPESTATUS[0]}}")


def logs_command(g: Gcloud) -> str:
    return g.ssh(f"tail -n 200 -F {REMOTE_LOG}", worker="0")


def should_retry(rc: int, tpu_state: str) -> bool:
    """Re-issue the trainer command after a checkpointed stop (75), a dropped connection (255)
    or a TPU that is no longer READY (preempted, being repaired, or gone); not after an error."""
    if rc == 0:
        return False
    return rc in (_common.EXIT_PREEMPTED, 255) or tpu_state.strip() != "READY"


def capture(command: str) -> str:
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, executable="/bin/bash")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def wait_until_active(args, g: Gcloud) -> None:
    while True:
        state = capture(g.queued_state())
        print(f"[launch] queued resource {g.qr}: {state or 'unknown'}", file=sys.stderr, flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"queued resource {g.qr} is {state}")
        time.sleep(args.poll_s)


def provision(args, g: Gcloud, dry_run: bool, lines: list[str]) -> None:
    """Create (when asked) and install; dry run: append the commands to `lines`."""
    create = g.create()
    if dry_run:
        lines += create
        if args.create == "queued":
            lines.append(f"{g.queued_state()}   # polled every {args.poll_s:g}s until ACTIVE")
    else:
        for c in create:
            _common.run_shell(c)
        if args.create == "queued":
            wait_until_active(args, g)
    if not args.skip_install:
        cmds = install_commands(args, g)
        if dry_run:
            lines += cmds
        else:
            for c in cmds:
                _common.run_shell(c)


def main(argv=None) -> int:
    args = parse(argv)
    g = Gcloud(args)
    if args.action == "logs":
        if args.dry_run:
            print(logs_command(g))
            return 0
        return _common.run_shell(logs_command(g), check=False)
    if args.action == "delete":
        if args.dry_run:
            print("\n".join(g.delete()))
            return 0
        return max(_common.run_shell(c, check=False) for c in g.delete())

    train = g.ssh(remote_train_command(args))
    if args.dry_run:
        lines = []
        provision(args, g, True, lines)
        lines.append(train)
        _common.emit(lines, True)
        print(f"# on status 75 or 255, or when `{g.tpu_state()}` is not READY: "
              + ("delete, recreate and reinstall (the commands above), then " if args.create != "none" else "")
              + f"re-run the last command (at most {args.max_restarts} times)")
        return 0

    provision(args, g, False, [])

    def before_retry(rc, attempt):
        if capture(g.tpu_state()) != "READY" and args.create != "none":
            for c in g.delete():
                _common.run_shell(c, check=False)
            provision(args, g, False, [])

    def run_once():
        return _common.run_shell(train, check=False)

    return _common.resume_loop(run_once, args.max_restarts,
                               should_retry=lambda rc: should_retry(rc, capture(g.tpu_state())),
                               before_retry=before_retry, sleep_s=10)


if __name__ == "__main__":
    sys.exit(main())
