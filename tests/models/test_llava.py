"""Model behaviour that transformers cannot check for us: presets, packing, remat, cache, errors."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.hf_oracle import nano_config
from vflan_jax.models.config import ModelConfig, get_preset
from vflan_jax.models.llama import KVCache
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.parallel import abstract_params, init_inputs


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.mark.parametrize("name,text,projector",
                         [("7b", 6_738_415_616, 20_979_712), ("13b", 13_015_864_320, 31_467_520)])
def test_presets_have_the_published_parameter_counts(name, text, projector):
    """Counts from docs/REFERENCE.md §1 (computed from the HF shapes), evaluated without allocating."""
    params = abstract_params(get_preset(name))
    assert _count(params["language_model"]) == text
    assert _count(params["multi_modal_projector"]) == projector
    assert _count(params["vision_tower"]) == 303_507_456
    assert get_preset(name).tokens_per_image == 576


def _init(cfg: ModelConfig, seed=0):
    return nn.unbox(LlavaForConditionalGeneration(cfg).init(jax.random.key(seed), *init_inputs(cfg))["params"])


def _example(cfg, rng, length):
    n = cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=length).astype(np.int32)
    ids[1:1 + n] = cfg.image_token_id
    pix = rng.standard_normal((3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, pix


@pytest.mark.slow   # in-process, but a minute or more of compiling on 2 cores
def test_packed_examples_do_not_see_each_other():
    """Two examples packed into one row give exactly the logits each gets alone."""
    cfg = nano_config()
    params = _init(cfg)
    model = LlavaForConditionalGeneration(cfg)
    rng = np.random.default_rng(0)
    (a, pa), (b, pb) = _example(cfg, rng, 9), _example(cfg, rng, 11)
    alone = [model.apply({"params": params}, jnp.asarray(x)[None], jnp.asarray(p)[None, None])
             for x, p in ((a, pa), (b, pb))]
    row = np.concatenate([a, b, np.zeros(3, np.int32)])[None]
    seg = np.array([[1] * 9 + [2] * 11 + [0] * 3])
    pos = np.array([list(range(9)) + list(range(11)) + [0] * 3])
    packed = model.apply({"params": params}, jnp.asarray(row), jnp.asarray(np.stack([pa, pb]))[None],
                         jnp.ones((1, 2), bool), jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_allclose(packed[0, :9], alone[0][0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 9:20], alone[1][0], atol=2e-5, rtol=1e-5)


@pytest.mark.slow   # in-process, but a minute or more of compiling on 2 cores
def test_remat_policies_give_the_same_gradients():
    rng = np.random.default_rng(1)
    base = nano_config()
    ids, pix = _example(base, rng, 10)
    params = _init(base)

    def grads(policy):
        model = LlavaForConditionalGeneration(base.replace(remat_policy=policy))
        def loss(p):
            return jnp.mean(model.apply({"params": p}, jnp.asarray(ids)[None], jnp.asarray(pix)[None, None]) ** 2)
        return jax.grad(loss)(params)

    ref = grads("none")
    for policy in ("full", "dots_no_batch"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), grads(policy), ref)
    # The frozen tower gets no gradient at all (stop_gradient), the projector does.
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(ref["vision_tower"]))
    assert float(jnp.abs(ref["multi_modal_projector"]["linear_1"]["kernel"]).max()) > 0


def test_kv_cache_decoding_equals_full_forward():
    cfg = nano_config()
    params = _init(cfg)
    model = LlavaForConditionalGeneration(cfg)
    rng = np.random.default_rng(2)
    ids, pix = _example(cfg, rng, 14)
    full = model.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(pix)[None, None])
    cache = KVCache.zeros(cfg.text, 1, 32, jnp.float32)
    prompt = 10
    logits, cache = model.apply({"params": params}, jnp.asarray(ids[:prompt])[None], jnp.asarray(pix)[None, None],
                                None, None, None, cache)
    steps = [logits]
    for t in range(prompt, 14):
        step, cache = model.apply({"params": params}, jnp.asarray(ids[t:t + 1])[None], None, None,
                                  jnp.array([[t]]), None, cache)
        steps.append(step)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_image_token_count_mismatch_is_a_clear_error():
    cfg = nano_config()
    params = _init(cfg)
    ids, pix = _example(cfg, np.random.default_rng(3), 10)
    ids[1] = 5  # one image slot too few
    with pytest.raises(ValueError, match="image token count mismatch.*row 0 has 3 tokens"):
        LlavaForConditionalGeneration(cfg).apply({"params": params}, jnp.asarray(ids)[None],
                                                 jnp.asarray(pix)[None, None])


@pytest.mark.parametrize("overrides,message", [
    ({"vision.image_size": 30}, "image_size=30 is not divisible by vision.patch_size=14"),
    ({"text.num_kv_heads": 3}, "num_heads=4 is not divisible by text.num_kv_heads=3"),
    ({"vision_feature_layer": -5}, "vision_feature_layer=-5 is outside a 3-layer tower"),
    ({"projector_type": "mlp2x_relu"}, "projector_type='mlp2x_relu'"),
    ({"remat_policy": "some"}, "remat_policy='some'"),
    ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy='cls'"),
    ({"attention_impl": "flash"}, "attention_impl='flash': use one of auto, xla, splash, cudnn, blockwise"),
    ({"loss_chunk_size": -1}, "loss_chunk_size=-1"),
])
def test_impossible_model_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_preset("nano", **overrides)


def test_config_json_round_trip():
    cfg = get_preset("tiny", **{"text.rope_theta": 123.0, "remat_policy": "full"})
    assert ModelConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
