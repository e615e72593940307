"""launch/: the exact commands each launcher prints with --dry_run (nothing is submitted), the
generated sbatch script run against fake srun/scontrol, the resume decisions, and the XLA flags
checked against the pinned jaxlib."""
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))
import _common  # noqa: E402 - launch/ holds scripts, not a package: importable once its folder is on the path
import tpu_pod  # noqa: E402 - likewise

STAGE1 = "configs/vflan_stage1.py:size=13b,data_dir=/shared/vision-flan"


def dry(script, *args) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), "--dry_run", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sbatch_body(out: str) -> str:
    return out.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


@pytest.mark.parametrize("per,tasks,cpus", [("node", 1, 64), ("gpu", 8, 8)])
def test_slurm_two_nodes_of_eight(per, tasks, cpus):
    out = dry("slurm_gpu.py", "--config", STAGE1, "--workdir", "/shared/runs/s1", "--nodes", "2",
              "--gpus_per_node", "8", "--per", per, "--time", "24:00:00", "--partition", "gpu",
              "--", "--config.init_from=/shared/ckpt/pre")
    lines = out.splitlines()
    assert lines[0] == "mkdir -p /shared/runs/s1/slurm"
    assert lines[1] == "cat > /shared/runs/s1/slurm/vflan.sbatch <<'EOF'"
    assert lines[-1] == "sbatch /shared/runs/s1/slurm/vflan.sbatch"
    body = sbatch_body(out)
    sbatch = [line for line in body.splitlines() if line.startswith("#SBATCH")]
    for want in ("--nodes=2", f"--ntasks-per-node={tasks}", "--gpus-per-node=8", f"--cpus-per-task={cpus}",
                 "--signal=TERM@120", "--requeue", "--time=24:00:00", "--partition=gpu"):
        assert f"#SBATCH {want}" in sbatch
    assert 'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355"' in body
    assert 'export JAX_NUM_PROCESSES="$SLURM_NTASKS"' in body
    srun = next(line for line in body.splitlines() if line.startswith("srun "))
    task = shlex.split(srun)[-1]
    assert task.startswith("export JAX_PROCESS_ID=$SLURM_PROCID")
    assert ("JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in task) == (per == "gpu")
    assert task.endswith("exec python -m vflan_jax.train --config " + shlex.quote(STAGE1)
                         + " --workdir /shared/runs/s1 --config.init_from=/shared/ckpt/pre")
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body and '"$status" -eq 75' in body


def _fake_bin(tmp_path, trainer_status):
    """srun runs the task command once per task (2 nodes x 2 tasks); python records its env."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scripts = {
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then printf "node-a\\nnode-b\\n"; '
                    'else echo "$@" >> "$LOG/scontrol"; fi\n',
        "srun": '#!/bin/bash\ncmd="${@: -1}"\nrc=0\nfor i in 0 1 2 3; do '
                'SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) bash -c "$cmd" || rc=$?; done\nexit $rc\n',
        "python": '#!/bin/bash\necho "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID '
                  '${JAX_LOCAL_DEVICE_IDS:-none} $*" >> "$LOG/python"\n' + f"exit {trainer_status}\n",
    }
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(stat.S_IRWXU)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{fake}:$PATH"\n')
    return venv


@pytest.mark.parametrize("trainer_status", [75, 0])
def test_slurm_script_runs_one_process_per_gpu_and_requeues_on_75(tmp_path, trainer_status):
    venv = _fake_bin(tmp_path, trainer_status)
    out = dry("slurm_gpu.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), "--nodes", "2",
              "--gpus_per_node", "2", "--per", "gpu", "--venv", str(venv), "--port", "4000")
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_body(out))
    env = dict(os.environ, LOG=str(tmp_path), SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="4", SLURM_JOB_ID="77")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == trainer_status, proc.stderr
    calls = sorted((tmp_path / "python").read_text().splitlines())
    train = f"-m vflan_jax.train --config configs/demo.py --workdir {tmp_path / 'w'}"
    assert calls == [f"node-a:4000 4 {i} {i % 2} {train}" for i in range(4)]
    requeued = (tmp_path / "scontrol").read_text().split() if (tmp_path / "scontrol").exists() else []
    assert requeued == (["requeue", "77"] if trainer_status == 75 else [])


def test_tpu_v5p64_queued_spot_commands():
    out = dry("tpu_pod.py", "--name", "vf", "--zone", "us-east5-a", "--project", "proj", "--accelerator_type",
              "v5p-64", "--create", "queued", "--spot", "--config", STAGE1, "--workdir", "/mnt/runs/s1",
              "--setup", "mkdir -p /mnt/runs", "--", "--config.init_from=/mnt/ckpt/pre")
    lines = out.splitlines()
    where = "--zone=us-east5-a --project=proj"
    assert lines[0] == ("gcloud compute tpus queued-resources create vf-qr --node-id=vf " + where
                        + " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot")
    assert lines[1].startswith(f"gcloud compute tpus queued-resources describe vf-qr {where} "
                               "'--format=value(state.state)'")
    assert lines[2] == f"git -C {REPO} archive --format=tar.gz --output=/tmp/vf-vflan_jax.tar.gz HEAD"
    assert lines[3] == ("gcloud compute tpus tpu-vm scp /tmp/vf-vflan_jax.tar.gz 'vf:~/vflan_jax.tar.gz' "
                        + where + " --worker=all")
    install = shlex.split(lines[4])
    assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vf", "--zone=us-east5-a", "--project=proj"]
    assert install[8] == "--worker=all"
    assert "pip install -q -r requirements.txt -e . 'jax[tpu]==0.10.2'" in install[9]
    assert shlex.split(lines[5])[9] == "--command=mkdir -p /mnt/runs"
    train = shlex.split(lines[6])
    assert train[8] == "--worker=all"
    assert train[9] == ("--command=cd ~/vflan_jax && VFLAN_DISTRIBUTED=auto ~/vflan_venv/bin/python -m vflan_jax.train "
                        f"--config {STAGE1} --workdir /mnt/runs/s1 --config.init_from=/mnt/ckpt/pre 2>&1 "
                        "| tee -a ~/vflan_train.log; exit ${PIPESTATUS[0]}")
    assert lines[7].startswith("# on status 75 or 255") and "at most 10 times" in lines[7]
    assert len(lines) == 8


def test_tpu_existing_vm_and_tpu_vm_create():
    existing = dry("tpu_pod.py", "--name", "pod", "--zone", "z", "--config", "configs/demo.py", "--workdir", "/w",
                   "--skip_install", "--repo_url", "https://example.org/r.git").splitlines()
    assert len(existing) == 2 and existing[0].startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all")
    created = dry("tpu_pod.py", "--name", "pod", "--zone", "z", "--accelerator_type", "v4-32", "--create", "vm",
                  "--config", "configs/demo.py", "--workdir", "/w", "--repo_url", "https://example.org/r.git",
                  "--ref", "v1").splitlines()
    assert created[0] == ("gcloud compute tpus tpu-vm create pod --zone=z --accelerator-type=v4-32 "
                          "--version=tpu-ubuntu2204-base")
    assert "git clone --quiet https://example.org/r.git ~/vflan_jax && git -C ~/vflan_jax checkout --quiet v1" \
        in created[1]
    assert dry("tpu_pod.py", "--name", "pod", "--zone", "z", "--action", "logs").strip() == \
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=0 '--command=tail -n 200 -F ~/vflan_train.log'"
    deleted = dry("tpu_pod.py", "--name", "pod", "--zone", "z", "--create", "queued", "--accelerator_type", "v5p-8",
                  "--action", "delete")
    assert deleted.strip() == "gcloud compute tpus queued-resources delete pod-qr --zone=z --force --quiet"


def test_tpu_retry_decisions():
    assert not tpu_pod.should_retry(0, "READY")
    assert tpu_pod.should_retry(75, "READY")          # trainers saved after SIGTERM
    assert tpu_pod.should_retry(255, "READY")         # ssh connection dropped
    assert tpu_pod.should_retry(1, "PREEMPTED")       # spot VM taken away
    assert not tpu_pod.should_retry(1, "READY")       # a real error: do not loop


def test_single_gpu_dry_run():
    out = dry("single_gpu.py", "--config", "configs/demo.py", "--workdir", "runs/demo", "--gpus", "0,1",
              "--mem_fraction", "0.9", "--xla_flags=--xla_gpu_enable_command_buffer=", "--python", "python",
              "--", "--config.total_steps=20")
    assert out.splitlines() == [
        f"cd {REPO}",
        "XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=' "
        "CUDA_VISIBLE_DEVICES=0,1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
        "python -m vflan_jax.train --config configs/demo.py --workdir runs/demo --config.total_steps=20"]


def test_non_override_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(REPO / "launch/single_gpu.py"), "--config", "c.py", "--workdir", "w",
                           "--dry_run", "--", "--total_steps=3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "only --config.FIELD=VALUE" in proc.stderr


def _scripted_trainer(statuses):
    """A trainer stand-in exiting with `statuses` in turn, and the list its runs are counted in."""
    exits, runs = iter(statuses), []
    return runs, lambda: runs.append(1) or next(exits)


def test_resume_loop_reruns_only_after_status_75():
    for statuses, restarts, calls, final in (([75, 75, 0], 5, 3, 0), ([1], 5, 1, 1), ([75, 75, 75, 75], 2, 3, 75),
                                              ([75, 137], 5, 2, 137)):
        runs, trainer = _scripted_trainer(statuses)
        rc = _common.resume_loop(trainer, restarts)
        assert (len(runs), rc) == (calls, final)


def test_single_gpu_resumes_a_preempted_trainer(tmp_path):
    """A fake trainer exits 75 once, then 0: the launcher re-runs it, same arguments."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\n'
                    f'if [ ! -e {tmp_path}/once ]; then touch {tmp_path}/once; exit 75; fi\nexit 0\n')
    fake.chmod(stat.S_IRWXU)
    proc = subprocess.run([sys.executable, str(REPO / "launch/single_gpu.py"), "--config", "configs/demo.py",
                           "--workdir", "w", "--python", str(fake)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["-m vflan_jax.train --config configs/demo.py --workdir w"] * 2


def test_gpu_xla_flags_are_known_to_the_pinned_jaxlib():
    """XLA aborts on an unknown flag, so a misspelt or removed flag would fail here (checked on CPU:
    the flag table is shared by all backends)."""
    code = "import jax; print(jax.devices()[0].platform)"
    for flags, ok in ((_common.xla_flags("--xla_gpu_enable_command_buffer= --xla_gpu_enable_triton_gemm=false"), True),
                      (_common.xla_flags("--xla_gpu_no_such_flag=true"), False)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
        assert (proc.returncode == 0) == ok, proc.stderr[-2000:]


def test_vflan_distributed_auto_initialises_jax_distributed(monkeypatch):
    import jax

    from vflan_jax import parallel
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("VFLAN_DISTRIBUTED", raising=False)
    parallel.initialize_distributed()
    assert calls == []
    monkeypatch.setenv("VFLAN_DISTRIBUTED", "auto")
    parallel.initialize_distributed()
    assert calls == [((), {})]
