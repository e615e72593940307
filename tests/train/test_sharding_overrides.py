"""config.sharding_overrides from the trainer's command line: the text form reaches the rules, and a
bad entry stops the run at set-up with one line naming it (exit status 2)."""
import subprocess

import pytest

from tests.train.cli import env, train_args
from vflan_jax import parallel
from vflan_jax.cli import EXIT_BAD_INPUT
from vflan_jax.train import config as train_config


def test_overrides_merge_onto_the_defaults_and_unset_entries_keep_them():
    c = train_config.base_config()
    assert set(c.sharding_overrides) == {name for name, _ in parallel.DEFAULT_RULES}   # every name is settable
    assert train_config.sharding_rules(c) == parallel.DEFAULT_RULES
    c.sharding_overrides.mlp, c.sharding_overrides.embed = "fsdp,tensor", "none"
    rules = dict(train_config.sharding_rules(c))
    assert (rules["mlp"], rules["embed"]) == (("fsdp", "tensor"), None)
    assert {k: v for k, v in rules.items() if k not in ("mlp", "embed")} == {
        k: v for k, v in parallel.DEFAULT_RULES if k not in ("mlp", "embed")}


def test_overrides_that_clash_on_a_parameter_fail_validation_naming_both_rules():
    """mlp over fsdp too: embed holds fsdp in the MLP kernels, and flax would silently leave mlp whole."""
    c = train_config.base_config()
    c.tokenizer = "unused"
    c.sharding_overrides.mlp = "fsdp,tensor"
    with pytest.raises(ValueError, match=r"^config sharding_overrides: parameter .*mlp.*sharding rule mlp=\('fsdp', "
                       r"'tensor'\) cannot apply: mesh axis 'fsdp' is already taken by embed; override mlp or embed"):
        train_config.validate(c, num_devices=1, process_count=1)
    c.sharding_overrides.embed = "none"   # resolved: fsdp is free for mlp; validation goes on to the data
    with pytest.raises(ValueError, match="^data config: sources"):
        train_config.validate(c, num_devices=1, process_count=1)


@pytest.mark.slow
def test_a_bad_override_on_the_command_line_is_one_line_and_status_2(tmp_path):
    args = train_args(tmp_path / "run", tmp_path / "suite", steps=1) + ["--config.sharding_overrides.mlp=fsdp,fsdp"]
    proc = subprocess.run(args, cwd=tmp_path, env=env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == ["error: config sharding_overrides.mlp: mesh axis 'fsdp' is used twice in fsdp,fsdp"], \
        proc.stderr[-3000:]
