"""Device mesh, logical-axis rules and sharded parameter creation.

Model code names axes logically ('embed', 'heads', 'act_batch', ...); this table maps them
onto the mesh ('data', 'fsdp', 'tensor'). Parameters never materialise on one device: shapes
come from jax.eval_shape and init runs under jit with out_shardings from the rules.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style: weights sharded over fsdp on their model dimension and over tensor on
# heads/mlp/vocab; activations over (data, fsdp) on batch.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("projector_in", None),
    ("positions", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
)


class ShardingRuleError(ValueError):
    """A bad sharding override. From rules_with the message starts with the logical name, for the
    caller to prefix where it came from ("config sharding_overrides.", "--sharding_overrides ");
    from param_shardings (overrides that clash on a parameter) it names the parameter and both rules."""


MeshAxes = str | tuple[str, ...] | None


def parse_mesh_axes(text: str) -> MeshAxes:
    """The text form of a rule's mesh axes, as command lines give it: 'none' (replicated),
    'fsdp', or 'fsdp,tensor' (sharded over both, fsdp major)."""
    text = text.strip()
    if text.lower() == "none":
        return None
    axes = tuple(a.strip() for a in text.split(","))
    return axes[0] if len(axes) == 1 else axes


def _checked_axes(name: str, axes) -> MeshAxes:
    if isinstance(axes, str):
        axes = parse_mesh_axes(axes)
    if axes is not None and not isinstance(axes, (str, tuple, list)):
        raise ShardingRuleError(f"{name}: {axes!r} is not None, a mesh axis name or a tuple of them")
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for axis in names:
        if axis not in MESH_AXES:
            raise ShardingRuleError(f"{name}: mesh axis {axis!r} is not one of {MESH_AXES} "
                                    "(or 'none' for replicated)")
        if names.count(axis) > 1:
            raise ShardingRuleError(f"{name}: mesh axis {axis!r} is used twice in {','.join(names)}")
    return None if not names else names[0] if len(names) == 1 else names


def rules_with(overrides=None, base=DEFAULT_RULES) -> tuple[tuple[str, MeshAxes], ...]:
    """`base` with some logical names mapped to other mesh axes: {logical name: None | 'axis' |
    ('axis', ...) | the text form of parse_mesh_axes}. Every name and axis is checked (flax would
    silently leave an unknown logical name unsharded). Two rules that claim one mesh axis within a
    parameter (embed='tensor' meets vocab='tensor' in the embedding) are found by param_shardings,
    which sees the parameters."""
    rules = dict(base)
    for name, axes in (overrides or {}).items():
        if name not in rules:
            raise ShardingRuleError(f"{name}: unknown logical axis name; known: {', '.join(rules)}")
        rules[name] = _checked_axes(name, axes)
    return tuple(rules.items())


OVERRIDES_HELP = "logical axis -> mesh axes onto vflan_jax/parallel.py's DEFAULT_RULES, e.g. mlp=fsdp,tensor embed=none"


def parse_overrides(items) -> dict[str, str]:
    """['mlp=fsdp,tensor', 'embed=none'] (command-line flags) -> {'mlp': 'fsdp,tensor', 'embed': 'none'}."""
    out = {}
    for item in items or ():
        name, sep, axes = item.partition("=")
        if not sep or not name.strip():
            raise ShardingRuleError(f"{item}: expected NAME=AXES, e.g. mlp=fsdp,tensor or embed=none")
        if name.strip() in out:
            raise ShardingRuleError(f"{name.strip()}: given twice")
        out[name.strip()] = axes
    return out


def _named(shape) -> dict[str, int]:
    return dict(zip(MESH_AXES, shape, strict=True))


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with at most one -1 meaning 'the rest of the devices'."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"mesh shape {_named(shape)} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {_named(shape)} uses {math.prod(shape)} of {num_devices} devices")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape where it does not apply (CPU subsets)
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    # Auto axes: linen's logical constraints are hints to GSPMD, not assertions (environment.md §3).
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def init_inputs(model_config, batch: int = 1):
    """The smallest batch that creates every parameter (one image, its token slots)."""
    n = model_config.tokens_per_image
    ids = jnp.full((batch, n + 1), model_config.image_token_id, jnp.int32).at[:, 0].set(model_config.text.bos_token_id)
    size = model_config.vision.image_size
    return ids, jnp.zeros((batch, 1, 3, size, size), jnp.float32)


def _init_model(model_config):
    # Init runs the forward on a few tokens; kernels with block-size limits (splash) cannot, and the
    # parameters do not depend on the attention implementation.
    from vflan_jax.models.llava import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration(model_config.replace(attention_impl="xla"))


def abstract_params(model_config):
    """Boxed (LogicallyPartitioned) ShapeDtypeStructs of every parameter, computed without memory."""
    model = _init_model(model_config)
    return jax.eval_shape(lambda key: model.init(key, *init_inputs(model_config))["params"], jax.random.key(0))


def strip_boxes(boxed_params):
    """The raw values of LogicallyPartitioned leaves (nn.unbox would also add sharding
    constraints when called under a mesh and rules)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed_params,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _rule_conflict(logical_names, mesh_spec, rules) -> str | None:
    """Flax assigns rules in table order and skips one whose mesh axes an earlier rule already gave
    to another dimension of the same array: an override such as mlp='fsdp,tensor' would silently
    leave the MLP kernels' mlp dimension whole (embed holds fsdp). Describes the first such dimension."""
    def axes_of(axes):
        return axes if isinstance(axes, tuple) else (axes,) if axes else ()
    wanted = {}
    for name, axes in rules:
        wanted.setdefault(name, axes)
    mesh_spec = tuple(mesh_spec) + (None,) * (len(logical_names) - len(mesh_spec))
    for name, got in zip(logical_names, mesh_spec, strict=True):
        if got is None and wanted.get(name) is not None:
            for other, taken in zip(logical_names, mesh_spec, strict=True):
                clash = [a for a in axes_of(wanted[name]) if a in axes_of(taken)]
                if clash:
                    return (f"sharding rule {name}={wanted[name]!r} cannot apply: mesh axis {clash[0]!r} is already "
                            f"taken by {other}; override {name} or {other} as well")
    return None


def check_rules(boxed_params, rules=DEFAULT_RULES) -> None:
    """ShardingRuleError naming the first parameter in which two rules claim one mesh axis (no mesh needed)."""
    specs = nn.get_partition_spec(boxed_params)
    for path, names in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        conflict = _rule_conflict(tuple(names), nn.logical_to_mesh_axes(tuple(names), rules), rules)
        if conflict:
            raise ShardingRuleError(f"parameter {jax.tree_util.keystr(path)} with logical axes {tuple(names)}: "
                                    f"{conflict}")


def param_shardings(boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding per parameter (an unboxed tree) from the logical names; checks the rules
    (check_rules) and divisibility, so that bad rules or a bad mesh for a model fail with the
    parameter's name, not deep inside XLA or silently."""
    specs = nn.get_partition_spec(boxed_params)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = strip_boxes(boxed_params)
    check_rules(boxed_params, rules)
    for (path, sharding), shape in zip(jax.tree_util.tree_leaves_with_path(shardings),
                                       jax.tree.leaves(shapes), strict=True):
        for dim, axes in zip(shape.shape, sharding.spec, strict=False):   # a spec may omit trailing dims
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            size = math.prod(mesh.shape[a] for a in names)
            if dim % size:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {shape.shape} cannot be sharded "
                                 f"{sharding.spec} over mesh {dict(mesh.shape)}: {dim} is not divisible by {size}")
    return shardings


def init_params(model_config, mesh: Mesh, rules=DEFAULT_RULES, seed: int = 0):
    """Random parameters created directly in their shards. Returns (params, shardings)."""
    model = _init_model(model_config)
    shardings = param_shardings(abstract_params(model_config), mesh, rules)

    def init(key):
        return nn.unbox(model.init(key, *init_inputs(model_config))["params"])

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return params, shardings


def initialize_distributed() -> None:
    """Multi-host start-up. TPU pods: automatic. GPU clusters: SLURM is detected by JAX, or set
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    One process on one host: nothing to do."""
    import os
    if jax.distributed.is_initialized():
        return
    # CPU processes (tests, simulations) need a cross-process collectives backend; no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
          or os.environ.get("VFLAN_DISTRIBUTED") == "auto"):
        # VFLAN_DISTRIBUTED=auto (launch/tpu_pod.py sets it): GCE TPU VMs keep the worker list in
        # instance metadata, not in the environment; jax.distributed.initialize() reads it there.
        jax.distributed.initialize()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Each host's slice of the batch -> global arrays sharded on the batch axis over the mesh."""
    out = {}
    for name, array in local_batch.items():
        spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (array.ndim - 1), rules)
        out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), array)
    return out


def state_shardings(abstract_state, abstract_params, shardings, mesh: Mesh):
    """The sharding of every leaf of a train state, derived from the parameter shardings.

    Optimizer states (optax) nest copies of the parameter tree (Adam's mu and nu, multi_transform's
    per-group states): a leaf whose trailing dict keys are a parameter's path and whose shape is
    that parameter's takes the parameter's sharding. Everything else (step, counts, RNG key) is
    replicated. Compiling the constructor and reading its output shardings does not do this:
    `zeros_like` carries no data dependence on the parameter, so GSPMD replicates the moments.
    """
    by_path = {tuple(k.key for k in path): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings), strict=True)}
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            shape, sharding = by_path.get(keys[start:], (None, None))
            if sharding is not None and tuple(shape) == tuple(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry their sharding (what lower()/restore() take)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_tree, shardings)


def micro_batches(x: jax.Array, steps: int, batch_sharding: NamedSharding | None = None) -> jax.Array:
    """[B, ...] -> [steps, B // steps, ...] for gradient accumulation, with row i * steps + j in
    micro-batch j. A batch sharded on rows gives each device a contiguous block; taking every
    steps-th row keeps each micro-batch spread over all batch devices, from rows they already hold
    (a plain reshape would put whole micro-batches on a few devices and idle the rest)."""
    micro = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    if batch_sharding is None:
        return micro
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(batch_sharding.mesh, spec))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Rows over the batch axes of the mesh, every other dimension whole (a prefix for any batch array)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules))
