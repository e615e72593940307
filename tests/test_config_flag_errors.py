"""A command-line override the config cannot take is one line naming the flag and exit status 2
(before anything is set up), for the trainer and the aot command, as users type it."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, "--config", "configs/demo.py", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, named", [
    ("--config.no_such_field=3", "--config.no_such_field: not a field of the config"),
    ("--config.sharding_overrides.mlpp=fsdp", '--config.sharding_overrides.mlpp: Did you mean "mlp"'),
    ("--config.total_steps=many", "--config.total_steps=many"),
])
def test_train_names_the_override_it_cannot_apply(tmp_path, override, named):
    proc = run("vflan_jax.train", "--workdir", str(tmp_path / "w"), override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()   # nothing was set up


def test_aot_names_the_override_it_cannot_apply():
    proc = run("vflan_jax.aot", "--topology", "cpu:1", "--config.no_such_field=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --config.no_such_field: not a field of the config"]
