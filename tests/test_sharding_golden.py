"""Golden sharding files: the PartitionSpec of every leaf of the train state the trainer builds
(parameters and optimizer state, vflan_jax/train/program.py) for the 7b and 13b stage-1 configs on
meshes (data, fsdp, tensor) = (1, 8, 1) and (2, 2, 2), compared with tests/golden/sharding_*.json.
Abstract only (jax.eval_shape): nothing is allocated, the whole file runs in seconds.

A deliberate change of the rules or the model updates the files:
    VFLAN_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding_golden.py -n 0
then review `git diff tests/golden` (one line per leaf).
"""
import json
import os
import pathlib

import jax
import pytest

from configs.vflan_stage1 import get_config
from vflan_jax import parallel
from vflan_jax.train import config as train_config
from vflan_jax.train.program import build_program

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("VFLAN_UPDATE_GOLDEN") == "1"


def _program(size: str, mesh_shape, **overrides):
    cfg = get_config(f"size={size}")
    for name, axes in overrides.items():
        cfg.sharding_overrides[name] = axes
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:8])
    return build_program(cfg, train_config.model_config(cfg), mesh, num_tasks=3,
                         rules=train_config.sharding_rules(cfg))


def _key_text(key) -> str:
    for attr in ("key", "name", "idx"):   # DictKey, GetAttrKey (TrainState, optax states), SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def sharding_table(program) -> dict[str, str]:
    """{'opt_state/1/0/mu/language_model/.../kernel': "P(None, 'fsdp', 'tensor') [32, 4096, 11008] -> [32, 1024, 5504]"}
    (spec, global shape, shape per device) for every leaf of the abstract train state, which carries
    program.state_shardings."""
    table = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(program.abstract_state):
        spec = ", ".join(repr(axes) for axes in leaf.sharding.spec)
        shard = list(leaf.sharding.shard_shape(leaf.shape))
        table["/".join(_key_text(k) for k in path)] = f"P({spec}) {list(leaf.shape)} -> {shard}"
    return table


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_train_state_shardings_match_the_golden_file(size, mesh_shape):
    table = sharding_table(_program(size, mesh_shape))
    path = GOLDEN / f"sharding_{size}_{'x'.join(map(str, mesh_shape))}.json"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    golden = json.loads(path.read_text())
    changed = [f"{k}: golden {golden.get(k)} vs now {table.get(k)}" for k in sorted(set(golden) | set(table))
               if golden.get(k) != table.get(k)]
    assert not changed, f"{len(changed)} leaves differ from {path.name} (VFLAN_UPDATE_GOLDEN=1 rewrites it):\n" + \
        "\n".join(changed[:20])
    # The file says something: most of the state is sharded over the mesh, moments included.
    sharded = [k for k, v in table.items() if any(a in v for a in ("'fsdp'", "'tensor'"))]
    assert sum(k.startswith("opt_state/") for k in sharded) >= 2 * 10
    assert sum(k.startswith("params/") for k in sharded) > 20


def _logical_axes_of_params(size: str) -> dict[str, tuple]:
    """'language_model/layers/mlp/gate_proj/kernel' -> ('layers', 'embed', 'mlp'), from the model's boxes."""
    boxed = parallel.abstract_params(train_config.model_config(get_config(f"size={size}")))
    specs = jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: hasattr(x, "names")),
        is_leaf=lambda x: isinstance(x, tuple))
    return {"/".join(_key_text(k) for k in path): names for path, names in specs}


def test_an_override_moves_exactly_the_entries_it_names():
    """mlp replicated instead of over tensor: only the parameters with an 'mlp' dimension (the LLM's
    MLP kernels, the projector's hidden layer) and their two Adam moments change, and only there."""
    default = sharding_table(_program("7b", (2, 2, 2)))
    moved = sharding_table(_program("7b", (2, 2, 2), mlp="none"))
    assert set(default) == set(moved)
    changed = {k for k in default if default[k] != moved[k]}

    with_mlp = {p for p, names in _logical_axes_of_params("7b").items() if "mlp" in names}
    assert with_mlp == {f"language_model/layers/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")} | {
        "multi_modal_projector/linear_1/kernel", "multi_modal_projector/linear_1/bias",
        "multi_modal_projector/linear_2/kernel"}
    expected = {k for k in default for p in with_mlp if k == f"params/{p}" or
                (k.startswith("opt_state/") and k.endswith(f"/{p}") and ("/mu/" in k or "/nu/" in k))}
    assert len(expected) == 3 * len(with_mlp)   # the parameter, mu and nu
    assert changed == expected
    key = "language_model/layers/mlp/gate_proj/kernel"
    assert default[f"params/{key}"].startswith("P(None, 'fsdp', 'tensor')")
    assert moved[f"params/{key}"].startswith("P(None, 'fsdp', None)")


def test_a_bad_override_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"config sharding_overrides\.mlp: mesh axis 'model' is not one of"):
        _program("7b", (2, 2, 2), mlp="model")
    cfg = get_config("size=7b")
    cfg.sharding_overrides.mlp_hidden = "tensor"   # a config file may add any key: validate names it
    cfg.tokenizer = "unused"
    with pytest.raises(ValueError, match=r"config sharding_overrides\.mlp_hidden: unknown logical axis name"):
        train_config.validate(cfg, num_devices=8, process_count=1)
