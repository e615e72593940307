"""Every documented command, as a new user types it.

The quick start runs word for word in a fresh copy of the repository (tracked and untracked,
non-ignored files; `.venv` linked to the existing virtual environment), from that directory,
with its relative paths: the demo (shortened by appending --config overrides only), then every
"After the demo" command on `runs/demo` in order, a rerun of the finished demo, a rerun after a kill during
the final export, and the one-GPU launcher with a relative --workdir. Commands needing weights or
data that are not here (README.md, docs/*.md) are checked against their CLI's parser, and the
benchmark scripts docs/ names against their flags.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}

DEMO = ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . && "
        ".venv/bin/python -m vflan_jax.train --config configs/demo.py --workdir runs/demo")
TESTS = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-test.txt -e . && "
         ".venv/bin/python -m pytest tests")
# Appended to the demo command only to shorten it (fewer steps, instances and tokens).
SHORTER_DEMO = ["--config.total_steps=3", "--config.log_every_steps=1", "--config.eval_every_steps=0",
                "--config.eval_max_examples=4", "--config.synthetic_instances_per_task=12",
                "--config.data.max_length=96", "--config.global_batch_size=4"]
SHORTER = {"vflan_jax.generate": ["--max_new_tokens", "4"],
           "vflan_jax.eval": ["--max_new_tokens", "3", "--batch_size", "4"]}


def commands(text: str) -> list[str]:
    """Command lines of the fenced blocks: continuations joined, comments and [optional arguments] dropped."""
    out = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else re.split(r"\s#\s", line)[0].strip()
            if re.match(r"(python3? |\.venv/bin/python )", line):
                out.append(re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]", "", line)).strip())
    return out


COMMANDS = commands(README)
DOC_COMMANDS = [c for text in DOCS.values() for c in commands(text)]
def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


QUICK_START = commands(section("Quick start"))
AFTER_DEMO = commands(section("After the demo"))
USE_DEMO = [c for c in AFTER_DEMO if c.startswith(".venv/bin/python -m") and "runs/demo/" in c]


def kind(cmd: str) -> str:
    words = shlex.split(cmd)
    if words[0] == "python3" and words[1:3] == ["-m", "venv"]:
        return "setup"
    if words[1] == "-m":
        return words[2].split(".")[0] if words[2] == "pytest" else words[2]
    if words[1].startswith("launch/"):
        return "launch"
    if words[1].startswith("benchmarks/"):
        return "benchmark"
    return "unknown"


def test_every_documented_command_is_known():
    assert [c for c in COMMANDS + DOC_COMMANDS if kind(c) == "unknown"] == []
    assert QUICK_START == [DEMO, TESTS]  # the quick start: two commands, word for word
    assert len(USE_DEMO) >= 8, USE_DEMO


def test_ci_runs_the_readme_test_command():
    assert TESTS in (REPO / ".ci" / "run").read_text()


# ---------------------------------------------------------------------- the quick start, as written
def _copy_repository(dest: pathlib.Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("runs/", ".venv/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    venv = pathlib.Path(sys.prefix)  # the environment running the tests stands for `.venv`
    (dest / ".venv").symlink_to(venv if (venv / "bin" / "python").exists() else REPO / ".venv")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return dict(env, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(cwd, cmd: str, extra=(), stdin=None, expect=0):
    """cmd exactly as documented (`python` is the venv's, as after `source .venv/bin/activate`)."""
    words = shlex.split(cmd)
    if words[0] == "python":
        words[0] = ".venv/bin/python"
    proc = subprocess.run(words + list(extra), cwd=cwd, env=_env(), input=stdin, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A fresh copy of the repository in which the quick-start demo command has run."""
    root = tmp_path_factory.mktemp("fresh_clone")
    _copy_repository(root)
    proc = _run(root, DEMO.split(" && ")[-1], SHORTER_DEMO)
    return root, proc


@pytest.mark.slow
def test_demo_console_shows_only_the_runs_own_lines(demo):
    root, proc = demo
    console = (proc.stdout + proc.stderr).splitlines()
    assert sum("ETA" in line for line in console) == 3
    assert sum(line.startswith("data mixture") for line in console) == 1  # the task-mixture table, once
    assert not [line for line in console if re.match(r"[IWE]\d{4} ", line) or "Unable to initialize backend" in line]
    # 3 progress lines, the mixture table (14 trained + 3 held-out tasks + 3), the final evaluation
    # (2 splits, 17 tasks) and a handful of summary lines: nothing else.
    assert len(console) <= 55, "\n".join(console)
    log = (root / "runs/demo/train.log").read_text()
    assert "orbax" in log.lower() and "Saving checkpoint" in log  # library INFO kept in the log file
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "model/model_config.json", "model/tokenizer"):
        assert (root / "runs/demo" / name).exists(), name
    assert str(root) in json.loads((root / "runs/demo/summary.json").read_text())["model"]


@pytest.mark.slow
def test_quick_start_commands_on_the_demo_model(demo):
    """The README's "After the demo" commands, in order: generate, chat, benchmark, eval, export, load in
    transformers, import, verify, inspect."""
    root, _ = demo
    done = set()
    for cmd in USE_DEMO:
        module = shlex.split(cmd)[2]
        if "--interactive" in cmd:
            proc = _run(root, cmd, SHORTER[module], stdin="Is there a red circle?\nWhat colour is it?\nexit\n")
            out = proc.stdout
            assert "'exit' or Ctrl-D to quit" in out
            assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2  # the 3rd prompt read "exit"
            assert "USER: Is there a red circle?\nASSISTANT: " in out and "USER: What colour is it?\n" in out
            done.add("chat")
            continue
        proc = _run(root, cmd, SHORTER.get(module, ()))
        if module == "vflan_jax.generate":
            assert proc.stdout.endswith("\n") and not proc.stderr.strip(), proc.stderr  # the answer, nothing else
        elif module == "vflan_jax.eval":
            report = json.loads((root / "runs/demo/pope_results/report.json").read_text())
            assert report and (root / "runs/demo/pope_results/answers.jsonl").read_text().count("\n") >= 3
        elif "export-hf" in cmd:
            from transformers import LlavaForConditionalGeneration
            hf = LlavaForConditionalGeneration.from_pretrained(root / "runs/demo/hf")
            ours = json.loads((root / "runs/demo/model/model_config.json").read_text())
            assert hf.config.text_config.num_hidden_layers == ours["text"]["num_layers"]
        elif "verify" in cmd:
            assert json.loads(proc.stdout)["passed"] is True
        elif module == "vflan_jax.data.inspect":
            lines = (root / "runs/demo/inspect.jsonl").read_text().splitlines()
            assert len(lines) == 20 and json.loads(lines[0])["status"] == "ok"
        done.add(cmd.split(" --")[0].split()[-1])
    assert {"chat", "vflan_jax.generate", "run", "export-hf", "import-hf", "verify", "vflan_jax.data.inspect",
            "vflan_jax.data.synthetic_benchmark"} <= done, done


def _snapshot(workdir: pathlib.Path) -> dict:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and p.name != "train.log"}


@pytest.mark.slow
def test_rerunning_the_finished_demo_changes_nothing(demo):
    root, _ = demo
    before = _snapshot(root / "runs/demo")
    proc = _run(root, DEMO.split(" && ")[-1], SHORTER_DEMO)
    assert "holds a finished run" in proc.stdout
    assert _snapshot(root / "runs/demo") == before


@pytest.mark.slow
def test_the_one_gpu_launcher_passes_a_relative_workdir_through(demo):
    """launch/single_gpu.py runs the trainer where it was started: runs/demo is the finished demo."""
    root, _ = demo
    cmd = next(c for c in COMMANDS if "launch/single_gpu.py" in c)
    args = shlex.split(cmd)
    args[args.index("--config") + 1] = "configs/demo.py"
    args[args.index("--workdir") + 1] = "runs/demo"
    args.remove("--dry_run")
    proc = _run(root, shlex.join(args), ["--", *SHORTER_DEMO])
    assert f"{root / 'runs/demo'} holds a finished run" in proc.stdout


@pytest.mark.slow
def test_a_run_killed_during_its_final_export_completes_on_rerun(demo):
    """State after a kill between the model's params and its tokenizer/summary: the export was
    still in model.partial (it is renamed into place only when complete)."""
    root, _ = demo
    workdir = root / "runs/demo"
    (workdir / "model").rename(workdir / "model.partial")
    shutil.rmtree(workdir / "model.partial/tokenizer")
    (workdir / "model.partial/model_config.json").unlink()
    (workdir / "summary.json").unlink()
    proc = _run(root, DEMO.split(" && ")[-1], SHORTER_DEMO)
    assert "heldout tasks: exact-match accuracy" in proc.stdout
    assert (workdir / "model/tokenizer/tokenizer_config.json").exists() and (workdir / "model/params").is_dir()
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 3
    assert not (workdir / "model.partial").exists()


# ---------------------------------------------------------------------- commands needing what is not here
def _train_flags(args):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = ["train", *args]  # the override flags are found in argv while --config is parsed
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv


@pytest.mark.parametrize("cmd", [c for c in COMMANDS + DOC_COMMANDS if kind(c) == "vflan_jax.train"])
def test_train_commands_parse(cmd):
    """The config file, its ':' arguments and every --config.x=y override (tuples included) are
    applied by the trainer's flags (unknown fields or bad values raise)."""
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


@pytest.mark.parametrize("cmd", [
    # data.inspect is asked for its --help in a subprocess
    pytest.param(c, marks=pytest.mark.slow) if kind(c) == "vflan_jax.data.inspect" else c
    for c in COMMANDS + DOC_COMMANDS if c not in USE_DEMO and kind(c) in (
        "vflan_jax.convert", "vflan_jax.eval", "vflan_jax.generate", "vflan_jax.data.inspect")])
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


@pytest.mark.parametrize("cmd", [c for c in DOC_COMMANDS if kind(c) == "benchmark"])
def test_benchmark_commands_name_their_flags(cmd):
    """docs/ benchmark commands take minutes: the script exists and defines every flag used."""
    words = shlex.split(cmd)
    source = (REPO / words[1]).read_text()
    for flag in [a.split("=")[0] for a in words[2:] if a.startswith("--")]:
        assert f'"{flag}"' in source, f"{words[1]} has no {flag}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if kind(c) == "launch"])
def test_launch_commands_dry_run(cmd):
    words = shlex.split(cmd)
    assert "--dry_run" in words
    proc = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "vflan_jax.train --config configs/" in proc.stdout
    assert "--workdir " + words[words.index("--workdir") + 1] in proc.stdout
