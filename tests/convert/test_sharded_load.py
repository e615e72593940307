"""Loading onto an 8-device (data=2, fsdp=2, tensor=2) mesh: every parameter lands in its
parallel.param_shardings sharding, and the sharded forward equals the one-device forward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests.models.hf_oracle import random_batch
from vflan_jax.checkpoint import load_any, load_model, save_model
from vflan_jax.convert.hf_import import import_llava_hf
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.parallel import DEFAULT_RULES, abstract_params, make_mesh, param_shardings


def forward(cfg, params, batch, mesh):
    model = LlavaForConditionalGeneration(cfg)
    args = (jnp.asarray(batch["ids"], jnp.int32), jnp.asarray(batch["pixels"]), jnp.asarray(batch["image_mask"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))


def test_sharded_restore_and_import_match_one_device(tmp_path, llava_hf_dir):
    assert jax.device_count() == 8
    hf_dir, _ = llava_hf_dir
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params1, cfg, _ = import_llava_hf(hf_dir, mesh=one, progress=False)
    save_model(tmp_path / "c", params1, cfg)

    mesh = make_mesh((2, 2, 2))
    want = param_shardings(abstract_params(cfg), mesh, DEFAULT_RULES)
    restored, _ = load_model(tmp_path / "c", mesh)
    imported, _, _ = load_any(hf_dir, mesh)  # the on-the-fly HF import lands in the same shardings
    sharded_somewhere = 0
    for tree in (restored, imported):
        for got, spec, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(want), jax.tree.leaves(params1), strict=True):
            assert got.sharding.is_equivalent_to(spec, got.ndim), (got.sharding, spec)
            assert len(got.sharding.device_set) == 8
            assert np.array_equal(np.asarray(got), np.asarray(ref))
            sharded_somewhere += any(s is not None for s in spec.spec)
    assert sharded_somewhere > 20  # the rules really split most weights

    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 6, seed=1)
    ref = forward(cfg, params1, batch, one)
    np.testing.assert_allclose(forward(cfg, restored, batch, mesh), ref, rtol=2e-5, atol=2e-5)
