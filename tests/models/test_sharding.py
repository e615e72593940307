"""Parameters created sharded on 8 simulated devices (data 2 x fsdp 2 x tensor 2) land where
the rules say, and the sharded forward equals the single-device one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.models.hf_oracle import nano_config
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.parallel import (
    DEFAULT_RULES,
    ShardingRuleError,
    abstract_params,
    init_params,
    logical_sharding,
    make_mesh,
    param_shardings,
    parse_overrides,
    resolve_mesh_shape,
    rules_with,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")


def test_params_land_sharded_as_the_rules_say():
    cfg = nano_config()
    mesh = make_mesh((2, 2, 2))
    params, _ = init_params(cfg, mesh)
    lm = params["language_model"]
    expect = {
        "embed": (lm["embed_tokens"]["embedding"], P("tensor", "fsdp")),
        "q_proj": (lm["layers"]["self_attn"]["q_proj"]["kernel"], P(None, "fsdp", "tensor")),
        "down_proj": (lm["layers"]["mlp"]["down_proj"]["kernel"], P(None, "tensor", "fsdp")),
        "lm_head": (lm["lm_head"]["kernel"], P("fsdp", "tensor")),
        "norm": (lm["norm"]["scale"], P(None)),
        "vision fc1": (params["vision_tower"]["layers"]["mlp"]["fc1"]["kernel"], P(None, "fsdp", "tensor")),
    }
    for name, (array, spec) in expect.items():
        assert array.sharding.spec == spec, name
        # Each device holds 1/(product of the sharded mesh axes) of the tensor: really sharded.
        shard = array.addressable_shards[0].data
        factor = np.prod([2 for s in spec if s is not None])
        assert shard.size * factor == array.size, name


def test_sharded_forward_equals_single_device():
    cfg = nano_config()
    mesh = make_mesh((2, 2, 2))
    params, _ = init_params(cfg, mesh, seed=3)
    single = jax.device_put(jax.tree.map(np.asarray, params), jax.devices()[0])
    rng = np.random.default_rng(4)
    b, n = 4, cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, n + 8)).astype(np.int32)
    ids[:, 2:2 + n] = cfg.image_token_id
    pix = rng.standard_normal((b, 1, 3, 28, 28)).astype(np.float32)
    model = LlavaForConditionalGeneration(cfg)
    ref = model.apply({"params": single}, jnp.asarray(ids), jnp.asarray(pix))

    batch_sharding = logical_sharding(mesh, ("act_batch", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x))
        out = fwd(params, jax.device_put(ids, batch_sharding),
                  jax.device_put(pix, logical_sharding(mesh, ("act_batch", None, None, None, None))))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-5, rtol=1e-5)


def test_mesh_shape_errors_name_the_problem():
    assert resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)


def test_indivisible_parameter_names_the_parameter():
    cfg = nano_config(**{"text.vocab_size": 130})  # vocab rows go over tensor=4
    with pytest.raises(ValueError, match=r"embed_tokens.*cannot be sharded.*130 is not divisible by 4"):
        init_params(cfg, make_mesh((1, 2, 4)))


def test_rules_with_merges_overrides_in_every_form():
    rules = dict(rules_with({"mlp": "fsdp,tensor", "embed": "none", "heads": ("data",), "vocab": None}))
    assert (rules["mlp"], rules["embed"], rules["heads"], rules["vocab"]) == (("fsdp", "tensor"), None, "data", None)
    assert {k: v for k, v in rules.items() if k not in ("mlp", "embed", "heads", "vocab")} == {
        k: v for k, v in DEFAULT_RULES if k not in ("mlp", "embed", "heads", "vocab")}
    # The order is kept: flax takes the first rule that matches.
    assert [k for k, _ in rules_with({"mlp": None})] == [k for k, _ in DEFAULT_RULES]
    assert parse_overrides(["mlp=fsdp,tensor", "embed=none"]) == {"mlp": "fsdp,tensor", "embed": "none"}


@pytest.mark.parametrize("overrides,message", [
    ({"mlpp": "tensor"}, "mlpp: unknown logical axis name; known: act_batch"),
    ({"mlp": "model"}, "mlp: mesh axis 'model' is not one of ('data', 'fsdp', 'tensor')"),
    ({"mlp": ("fsdp", "tensor", "fsdp")}, "mlp: mesh axis 'fsdp' is used twice in fsdp,tensor,fsdp"),
    ({"embed": "fsdp,"}, "embed: mesh axis '' is not one of"),
    ({"embed": 2}, "embed: 2 is not None, a mesh axis name or a tuple of them"),
])
def test_a_bad_override_is_named(overrides, message):
    with pytest.raises(ShardingRuleError) as e:
        rules_with(overrides)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("items,message", [(["mlp"], "mlp: expected NAME=AXES"),
                                           (["mlp=tensor", "mlp=none"], "mlp: given twice")])
def test_bad_override_flags_are_named(items, message):
    with pytest.raises(ShardingRuleError, match=message):
        parse_overrides(items)



def test_overrides_that_clash_on_a_parameter_are_named():
    """flax would silently leave a dimension whole when an earlier rule holds its mesh axis."""
    boxed, mesh = abstract_params(nano_config()), make_mesh((2, 2, 2))
    with pytest.raises(ShardingRuleError, match=r"down_proj.*logical axes \('layers', 'mlp', 'embed'\): sharding rule "
                       r"mlp=\('fsdp', 'tensor'\) cannot apply: mesh axis 'fsdp' is already taken by embed"):
        param_shardings(boxed, mesh, rules_with({"mlp": "fsdp,tensor"}))
    resolved = param_shardings(boxed, mesh, rules_with({"mlp": "fsdp,tensor", "embed": "none"}))
    assert resolved["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, None, ("fsdp", "tensor"))
