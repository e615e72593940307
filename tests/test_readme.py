"""Every command in README.md is exercised: the demo command runs (2 steps), the test command is
the one CI runs (.ci/run), commands needing real data or weights are checked against their CLI
parser (train: the config, its arguments and overrides are applied by the trainer's own flags),
and the launch/ commands run with --dry_run."""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

DEMO = ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . && "
        ".venv/bin/python -m vflan_jax.train --config configs/demo.py --workdir runs/demo")
TESTS = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-test.txt -e . && "
         ".venv/bin/python -m pytest tests")


def readme_commands() -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                out.append(re.sub(r"\s+", " ", line))
    return out


COMMANDS = readme_commands()


def kind(cmd: str) -> str:
    if cmd.startswith("python3 -m venv"):
        return "setup"
    words = shlex.split(cmd)
    if words[:2] == ["python", "-m"]:
        return words[2]
    if words[0] == "python" and words[1].startswith("launch/"):
        return "launch"
    return "unknown"


def test_every_readme_command_is_known():
    assert len(COMMANDS) >= 14
    assert [c for c in COMMANDS if kind(c) == "unknown"] == []
    assert DEMO in COMMANDS and TESTS in COMMANDS  # the quick start, word for word


def test_ci_runs_the_readme_test_command():
    assert TESTS in (REPO / ".ci" / "run").read_text()


def test_quick_start_demo_command_runs(tmp_path):
    """The demo command as written (the venv's python), shortened to 2 steps on small batches."""
    args = shlex.split(DEMO.split(" && ")[-1])
    assert args[0] == ".venv/bin/python"
    workdir = tmp_path / "demo"
    args = [sys.executable, *args[1:-1], str(workdir), "--config.total_steps=2", "--config.eval_every_steps=0",
            "--config.eval_max_examples=4", "--config.synthetic_instances_per_task=4", "--config.data.max_length=96",
            "--config.global_batch_size=4", "--config.data.prefetch=0"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "model/model_config.json", "synthetic/train.json"):
        assert (workdir / name).exists(), name


def _train_flags(args):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = ["train", *args]  # the override flags are found in argv while --config is parsed
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if kind(c) == "vflan_jax.train"])
def test_train_commands_parse(cmd):
    """The config file, its ':' arguments and every --config.x=y override are applied by the
    trainer's flags (unknown fields or bad values raise)."""
    args = shlex.split(cmd)[3:]
    fv = _train_flags([a.replace("configs/", f"{REPO}/configs/", 1) if a.startswith("configs/") else a for a in args])
    cfg = fv.config
    assert fv.workdir
    for a in args:
        if a.startswith("--config."):
            field, value = a[len("--config."):].split("=", 1)
            node = cfg
            for part in field.split("."):
                node = node[part]
            assert str(node) == value
    spec = args[args.index("--config") + 1]
    if ":" in spec:  # e.g. size=13b,data_dir=/data/vision-flan reaches the config
        for item in spec.split(":", 1)[1].split(","):
            value = item.split("=", 1)[1]
            assert value in repr(cfg.to_dict()), item


def _parser(module):
    if module == "vflan_jax.convert":
        from vflan_jax.convert.__main__ import parser
        return parser()
    if module == "vflan_jax.eval":
        from vflan_jax.eval.__main__ import _parser
        return _parser()
    if module == "vflan_jax.generate":
        from vflan_jax.generate import _parser
        return _parser()
    return None


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if kind(c) in ("vflan_jax.convert", "vflan_jax.eval",
                                                                   "vflan_jax.generate", "vflan_jax.data.inspect")])
def test_cli_commands_parse(cmd):
    """Commands that need real weights or data: their arguments are accepted by the CLI (the
    CLIs' behaviour is tested in tests/convert, tests/eval, tests/generate, tests/data)."""
    words = shlex.split(cmd)
    module, args = words[2], words[3:]
    parser = _parser(module)
    if parser is not None:
        parsed = parser.parse_args(args)
        for flag in [a for a in args if a.startswith("--")]:
            assert getattr(parsed, flag[2:]) is not None, flag
    else:  # data.inspect builds its parser inside main(): every flag must be in its --help
        help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                                   timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}).stdout
        for flag in [a for a in args if a.startswith("--")]:
            assert re.search(rf"{flag}\b", help_text), flag


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if kind(c) == "launch"])
def test_launch_commands_dry_run(cmd):
    words = shlex.split(cmd)
    assert "--dry_run" in words
    proc = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "vflan_jax.train --config configs/" in proc.stdout
    assert "--workdir " + words[words.index("--workdir") + 1] in proc.stdout
