"""The train state is sharded by construction on 8 simulated devices: Adam moments in their
parameter's shards, state bytes per device = total / fsdp (plus the small replicated leaves),
accumulation micro-batches spread over every batch device, and a checkpoint resumes on other meshes."""
import shutil

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.demo import get_config
from tests.models.hf_oracle import nano_config
from tests.train.cli import losses, run, train_args
from vflan_jax import parallel
from vflan_jax.train import optim
from vflan_jax.train.program import build_program

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")


def _program(mesh_shape, projector_lr=None):
    cfg = get_config()
    cfg.optim.projector_learning_rate = projector_lr   # multi_transform nests the moments one level deeper
    return build_program(cfg, nano_config(), parallel.make_mesh(mesh_shape), num_tasks=3)


def _adam_states(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]


@pytest.mark.parametrize("mesh_shape,projector_lr", [((1, 8, 1), None), ((2, 2, 2), 1e-3)])
def test_every_moment_lives_in_its_parameters_shards(mesh_shape, projector_lr):
    program = _program(mesh_shape, projector_lr)
    params, _ = parallel.init_params(nano_config(), program.mesh, seed=1)
    state = program.create_state(params)
    trainable_shardings = optim.split(program.param_shardings, program.mask)[0]
    flat_expected = {p: s for p, s in jax.tree_util.tree_leaves_with_path(trainable_shardings)}
    adam = _adam_states(state.opt_state)
    assert len(adam) == (2 if projector_lr else 1)
    seen = 0
    for a in adam:
        for moment in (a.mu, a.nu):
            for path, leaf in jax.tree_util.tree_leaves_with_path(moment):
                if isinstance(leaf, optax.MaskedNode):
                    continue
                # the array as created, not only the declared sharding
                assert leaf.sharding == flat_expected[path], jax.tree_util.keystr(path)
                seen += 1
    assert seen == 2 * len(flat_expected)
    sharded = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.sharding.spec != P() and
               any(ax is not None for ax in leaf.sharding.spec)]
    assert len(sharded) > len(flat_expected), "moments were replicated"
    for scalar in [state.step, *(a.count for a in adam)]:
        assert scalar.sharding.is_fully_replicated


def _per_device_bytes(tree):
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def test_state_bytes_per_device_are_total_over_fsdp():
    program = _program((1, 8, 1))
    params, _ = parallel.init_params(nano_config(), program.mesh, seed=1)
    state = program.create_state(params)
    leaves = jax.tree.leaves(state)
    total = sum(leaf.nbytes for leaf in leaves)
    replicated = sum(leaf.nbytes for leaf in leaves if leaf.sharding.is_fully_replicated)
    assert replicated < 0.05 * total, "more than the small leaves (norms, biases, counts) are replicated"
    per_device = _per_device_bytes(state)
    assert len(per_device) == 8
    for device, nbytes in per_device.items():
        assert nbytes == pytest.approx((total - replicated) / 8 + replicated, rel=1e-9), device
    # the optimizer state alone: about a quarter of what a replicated Adam would hold per device
    opt_per_device = _per_device_bytes(state.opt_state)
    opt_total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state))
    assert max(opt_per_device.values()) < 0.2 * opt_total


def test_accumulation_micro_batch_spreads_over_all_batch_devices():
    mesh = parallel.make_mesh((2, 4, 1))
    sharding = parallel.batch_sharding(mesh)
    rows = jax.device_put(np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32), sharding)
    steps = 4
    micro = jax.jit(lambda x: parallel.micro_batches(x, steps, sharding))(rows)
    np.testing.assert_array_equal(np.asarray(micro), np.stack([np.asarray(rows)[j::steps] for j in range(steps)]))
    for j in range(steps):
        part = micro[j]
        holders = {s.device for s in part.addressable_shards if s.data.shape[0]}
        assert len(holders) == 8, f"micro-batch {j} lives on {len(holders)} of 8 devices"
        assert all(s.data.shape[0] == 1 for s in part.addressable_shards)   # 8 rows, one per device


@pytest.fixture(scope="module")
def saved_on_fsdp8(tmp_path_factory):
    """A 2-step run on a (1, 8, 1) mesh; its final checkpoint is where the resumes start."""
    suite = tmp_path_factory.mktemp("suite") / "synthetic"
    workdir = tmp_path_factory.mktemp("saved") / "run"
    run(train_args(workdir, suite, steps=2, eval_max_examples=0, global_batch_size=8, **{"mesh.fsdp": 8}),
        devices=8)
    return workdir, suite


def _resume(saved, dest, devices, mesh):
    workdir, suite = saved
    shutil.copytree(workdir, dest)
    run(train_args(dest, suite, steps=4, eval_max_examples=0, global_batch_size=8,
                   **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]}), devices=devices)
    return losses(dest)


@pytest.mark.slow
def test_checkpoint_from_fsdp8_resumes_on_other_meshes(saved_on_fsdp8, tmp_path):
    same = _resume(saved_on_fsdp8, tmp_path / "same", 8, (1, 8, 1))
    assert sorted(same) == [1, 2, 3, 4]
    for devices, mesh in [(4, (1, 4, 1)), (8, (2, 2, 2))]:
        other = _resume(saved_on_fsdp8, tmp_path / f"mesh{devices}{mesh}", devices, mesh)
        for step in (3, 4):
            assert other[step] == pytest.approx(same[step], rel=2e-5, abs=2e-5), (mesh, step)
