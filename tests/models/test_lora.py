"""LoRA layer (models/lora.py): its maths against a numpy reference, dropout as PEFT applies it, merge
parity, quantized storage, the trainable mask, config resolution, and adapters sharded like their base
on 8 devices."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.models.hf_oracle import nano_config
from vflan_jax.models import lora_params
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.models.lora import (
    NF4_TABLE,
    PROJECTIONS,
    LoraConfig,
    LoraDense,
    default_lora_config,
    dequantize,
    lora_config_from,
    quantize,
)
from vflan_jax.parallel import DEFAULT_RULES, init_params, make_mesh, strip_boxes
from vflan_jax.train import optim


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def lora_cfg(quantize="none", **kw):
    return nano_config(**{"text.lora": LoraConfig(4, 8.0, quantize=quantize, block_size=16, **kw)})


def random_adapters(params, seed=0):
    """Nonzero B everywhere (fresh adapters are B = 0, which would hide any error in the delta)."""
    rng = np.random.default_rng(seed)
    def draw(path, x):
        if path[-1].key == "lora_b":
            return jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.05)
        return x
    return jax.tree_util.tree_map_with_path(draw, params)


def batch(cfg, b=2, extra=7, seed=1):
    rng = np.random.default_rng(seed)
    n = cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, n + extra)).astype(np.int32)
    ids[:, 1:1 + n] = cfg.image_token_id
    pix = rng.standard_normal((b, 1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(pix)


def init(cfg, seed=0):
    params = jax.jit(LlavaForConditionalGeneration(cfg).init)(jax.random.key(seed), *batch(cfg))["params"]
    return strip_boxes(params)   # jitted: an eager init of the whole model takes longer than its compile


def test_layer_equals_the_lora_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 24)).astype(np.float32)
    cfg = LoraConfig(rank=6, alpha=12.0)
    layer = LoraDense(40, ("embed", "mlp"), cfg, jnp.float32, jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    w, a = np.asarray(params["kernel"].unbox()), np.asarray(params["lora_a"].unbox())
    b = rng.standard_normal((6, 40)).astype(np.float32)
    params = {"kernel": w, "lora_a": a, "lora_b": b}
    out = layer.apply({"params": params}, x)
    ref = x @ w + (12.0 / 6) * (x @ a) @ b
    assert rel_l2(out, ref) <= 1e-6
    assert np.all(np.abs(a) <= 1 / np.sqrt(24)) and np.std(a) > 0.5 / np.sqrt(3 * 24)  # PEFT's U(+-1/sqrt(in))


def test_dropout_acts_on_the_adapter_input_as_peft():
    """peft's lora.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling. With our layer's mask put into
    peft's dropout slot, the outputs agree; without a dropout RNG our layer equals peft in eval mode."""
    import peft
    import torch
    rate, rng = 0.25, np.random.default_rng(4)
    x = rng.standard_normal((4, 64, 24)).astype(np.float32)
    layer = LoraDense(40, ("embed", "mlp"), LoraConfig(rank=6, alpha=12.0, dropout=rate), jnp.float32, jnp.float32)
    params = jax.tree.map(np.array, nn.unbox(layer.init(jax.random.key(0), x)["params"]))
    params["lora_b"] = rng.standard_normal((6, 40)).astype(np.float32)
    out, sown = layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(3)},
                            mutable=["intermediates"])
    keep = np.asarray(sown["intermediates"]["dropout_keep"][0])
    assert keep.shape == x.shape and abs(keep.mean() - (1 - rate)) < 0.03   # p is the drop probability

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 40, bias=False)
    config = peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=rate, target_modules=["proj"])
    model = peft.inject_adapter_in_model(config, Holder())
    with torch.no_grad():
        model.proj.base_layer.weight.copy_(torch.from_numpy(params["kernel"].T))
        model.proj.lora_A["default"].weight.copy_(torch.from_numpy(params["lora_a"].T))
        model.proj.lora_B["default"].weight.copy_(torch.from_numpy(params["lora_b"].T))
    # torch's dropout scales what it keeps by 1 / (1 - p): read off its output on ones.
    values = np.unique(torch.nn.functional.dropout(torch.ones(4096), rate, training=True).numpy())
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / (1 - rate), rel=1e-6)

    class FixedMask(torch.nn.Module):   # torch's dropout with our mask
        def forward(self, t):
            return t * torch.from_numpy(keep.copy()) / (1 - rate)
    dropout = model.proj.lora_dropout["default"]
    model.proj.lora_dropout["default"] = FixedMask()
    with torch.no_grad():
        expected = model.proj(torch.from_numpy(x)).numpy()
    assert rel_l2(out, expected) <= 1e-6
    ref = x @ params["kernel"] + 2.0 * ((x * keep / (1 - rate)) @ params["lora_a"]) @ params["lora_b"]
    assert rel_l2(out, ref) <= 1e-6
    model.proj.lora_dropout["default"] = dropout
    model.eval()
    with torch.no_grad():
        expected = model.proj(torch.from_numpy(x)).numpy()
    assert rel_l2(layer.apply({"params": params}, x), expected) <= 1e-6   # no RNG: no dropout
    assert rel_l2(out, expected) > 1e-2


@pytest.mark.slow   # in-process, but a minute or more of compiling on 2 cores
def test_dropout_masks_are_drawn_per_layer_and_projection_and_absent_without_a_key():
    cfg, plain = lora_cfg(dropout=0.3), lora_cfg()
    params = random_adapters(init(cfg))
    ids, pix = batch(cfg)
    model = LlavaForConditionalGeneration(cfg)
    logits, sown = model.apply({"params": params}, ids, pix, rngs={"dropout": jax.random.key(5)},
                               mutable=["intermediates"])
    masks = sown["intermediates"]["language_model"]["layers"]["self_attn"]
    q, k = (np.asarray(masks[n]["dropout_keep"][0]) for n in ("q_proj", "k_proj"))
    assert q.shape[0] == cfg.text.num_layers   # [layers, batch, tokens, in]
    assert not np.array_equal(q[0], q[1]) and not np.array_equal(q, k)   # one mask per layer and projection
    reference = LlavaForConditionalGeneration(plain).apply({"params": params}, ids, pix)
    assert rel_l2(logits, reference) > 1e-3
    # Without a dropout RNG (evaluation, export; generation's KV-cache path never passes one): no dropout.
    np.testing.assert_array_equal(model.apply({"params": params}, ids, pix), reference)


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_merged_model_gives_the_lora_models_logits(quant):
    cfg = lora_cfg(quant)
    params = random_adapters(init(cfg))
    ids, pix = batch(cfg)
    ref = LlavaForConditionalGeneration(cfg).apply({"params": params}, ids, pix)
    merged, plain_cfg = lora_params.merged(params, cfg)
    assert plain_cfg.text.lora is None and "lora_a" not in merged["language_model"]["layers"]["mlp"]["up_proj"]
    out = LlavaForConditionalGeneration(plain_cfg).apply({"params": merged}, ids, pix)
    assert rel_l2(out, ref) <= 1e-5
    # The adapters matter: without them the logits move.
    zeroed = jax.tree_util.tree_map_with_path(lambda p, x: x * 0 if p[-1].key == "lora_b" else x, params)
    assert rel_l2(LlavaForConditionalGeneration(cfg).apply({"params": zeroed}, ids, pix), ref) > 1e-3


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_fresh_adapters_leave_a_plain_model_unchanged(quant):
    plain = nano_config()
    params = init(plain, seed=2)
    cfg = lora_cfg(quant)
    adapted = lora_params.with_adapters(params, cfg, seed=0)
    assert jax.tree.structure(adapted) == jax.tree.structure(init(cfg))
    ids, pix = batch(plain)
    ref = LlavaForConditionalGeneration(plain).apply({"params": params}, ids, pix)
    out = LlavaForConditionalGeneration(cfg).apply({"params": adapted}, ids, pix)
    assert rel_l2(out, ref) <= (1e-6 if quant == "none" else 0.2)   # quantized: the base's rounding only


def test_int8_and_nf4_storage():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 64, 24)).astype(np.float32)
    codes, scale = quantize(w, "int8")
    assert codes.dtype == jnp.int8 and scale.shape == (2, 24)
    assert np.all(np.abs(np.asarray(dequantize(codes, scale, "int8")) - w) <= np.asarray(scale)[:, None] / 2 + 1e-7)
    # NF4: a kernel made of code-book values times block maxima comes back exactly ...
    idx = rng.integers(0, 16, size=(64, 24))
    idx[::16] = 15   # every block's max |w| is its scale
    block_scale = rng.uniform(0.5, 2, size=(4, 24)).astype(np.float32)
    exact = NF4_TABLE[idx] * np.repeat(block_scale, 16, axis=0)
    codes, scale = quantize(exact, "nf4", block_size=16)
    assert codes.shape == (32, 24) and codes.dtype == jnp.uint8 and scale.shape == (4, 24)
    np.testing.assert_allclose(np.asarray(dequantize(codes, scale, "nf4", 16)), exact, rtol=1e-6, atol=1e-7)
    # ... and any kernel gets the nearest code (brute force over the 16 values).
    codes, scale = quantize(w[0], "nf4", block_size=16)
    normed = w[0].reshape(4, 16, 24) / np.asarray(scale)[:, None, :]
    nearest = NF4_TABLE[np.abs(normed[..., None] - NF4_TABLE).argmin(-1)] * np.asarray(scale)[:, None, :]
    np.testing.assert_allclose(np.asarray(dequantize(codes, scale, "nf4", 16)), nearest.reshape(64, 24), atol=1e-6)


def test_only_adapters_and_projector_are_trainable():
    params = init(lora_cfg("int8"))
    mask = optim.trainable_mask(params, ("projector", "llm"))
    trained = {"/".join(p) for p, m in mask.items() if m}
    assert trained and all(p.startswith("multi_modal_projector/") or p.endswith(("lora_a", "lora_b")) for p in trained)
    assert sum(p.endswith("lora_a") for p in trained) == len(PROJECTIONS)
    # A raw regex cannot unfreeze an adapted base; the optimizer holds no state for it.
    mask = optim.trainable_mask(params, ("projector", "llm", r"^language_model/layers/self_attn/q_proj/kernel"))
    assert not mask[("language_model", "layers", "self_attn", "q_proj", "kernel")]
    trainable, frozen = optim.split(params, mask)
    assert set(trainable["language_model"]["layers"]["self_attn"]["q_proj"]) == {"lora_a", "lora_b"}
    assert set(frozen["language_model"]["layers"]["self_attn"]["q_proj"]) == {"kernel", "kernel_scale"}
    opt = optim.make_optimizer(optim.default_optim_config(), trainable, 10)[0]
    moments = jax.eval_shape(opt.init, trainable)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(moments)}
    assert not any("language_model" in p and "lora_" not in p for p in paths)


def test_config_block_resolves_targets_and_rejects_bad_values():
    c = default_lora_config()
    assert lora_config_from(c) is None   # rank 0: off
    c.rank, c.alpha = 8, 16
    assert lora_config_from(c).targets == PROJECTIONS and lora_config_from(c).scale == 2.0
    c.target_modules = (r"self_attn/(q|v)_proj",)
    assert lora_config_from(c).targets == ("q_proj", "v_proj")
    c.dropout = 0.05
    assert lora_config_from(c).dropout == 0.05
    for field, value, words in (("target_modules", ("self_atn/q",), "matches none"), ("quantize", "int4", "quantize"),
                                ("dropout", 1.0, "probability"), ("alpha", 0.0, "alpha")):
        bad = ml_collections.ConfigDict(c.to_dict())
        bad[field] = value
        with pytest.raises(ValueError, match=words):
            lora_config_from(bad)
    # The config round-trips through the JSON stored beside checkpoints.
    cfg = lora_cfg("nf4", targets=("q_proj", "v_proj"))
    assert type(cfg).from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.slow   # in-process, but a minute or more of compiling on 2 cores
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_adapters_shard_like_their_base_on_8_devices():
    cfg = lora_cfg(dropout=0.2)   # training's forward: dropout masks drawn on sharded activations
    mesh = make_mesh((2, 2, 2))
    params, _ = init_params(cfg, mesh)
    layers = params["language_model"]["layers"]
    for parent, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        module = layers[parent][name]
        kernel = module["kernel"].sharding.spec
        assert module["lora_a"].sharding.spec == P(None, kernel[1], None), name
        assert module["lora_b"].sharding.spec == P(None, None, kernel[2]), name
        assert kernel[1] is not None and kernel[2] is not None
    single = jax.device_put(jax.tree.map(np.asarray, random_adapters(params)), jax.devices()[0])
    sharded = jax.device_put(single, jax.tree.map(lambda x: x.sharding, params))
    ids, pix = batch(cfg, b=4)
    model = LlavaForConditionalGeneration(cfg)
    rngs = {"dropout": jax.random.key(7)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(lambda p: model.apply({"params": p}, ids, pix, rngs=rngs))(sharded)
    # The same masks as on one device (partitionable threefry): the sharding changes no value.
    assert rel_l2(out, model.apply({"params": single}, ids, pix, rngs=rngs)) <= 1e-5



def test_kv_cache_decoding_sees_the_adapters():
    """The cached path applies the decoder layer unbound (llama.py _cached_layers); adapters must act there too."""
    from vflan_jax.models.llama import KVCache
    cfg = lora_cfg("nf4")
    params = random_adapters(init(cfg))
    ids, pix = batch(cfg, b=2, extra=5)
    model = LlavaForConditionalGeneration(cfg)
    full = model.apply({"params": params}, ids, pix)
    cache = KVCache.zeros(cfg.text, ids.shape[0], ids.shape[1] + 4, jnp.float32)
    cached, _ = model.apply({"params": params}, ids, pix, cache=cache)
    assert rel_l2(cached, full) <= 1e-5
