"""The trainer's two compiled programs, built from a config: the state constructor and the train step.

Both are jitted with explicit shardings derived from the parameter shardings
(`parallel.state_shardings`): Adam moments live in their parameter's shards, scalars are
replicated. The trainer (`train/__main__.py`) runs them; `aot.py` compiles the very same programs
for a target it does not run on (a TPU topology, N simulated CPU devices) to measure their memory.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from vflan_jax import parallel
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.train import optim
from vflan_jax.train.step import TrainState, make_train_step

# The config fields that change a program's memory, named when it does not fit.
MEMORY_FIELDS = ("global_batch_size / grad_accum_steps (same global batch, smaller micro-batches)",
                 "model.remat_policy ('full' keeps the least)", "mesh (more fsdp devices per replica)",
                 "data.max_length")


class DoesNotFit(RuntimeError):
    """A compile (or allocation) ran out of device memory; the message names the fields to change.
    The CLIs turn it into one line and exit status 1, never a traceback."""


def is_out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def needed_gib(error: BaseException) -> float | None:
    """What an out-of-memory compile says it needs ('Used 109.68G of 95.74G hbm', 'temporaries (109.68G)')."""
    for pattern in (r"Used ([\d.]+)([KMGT])i?B? of", r"\(([\d.]+)([KMGT])\) exceeds"):
        m = re.search(pattern, str(error))
        if m:
            return float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1) / 1024 ** 3
    return None


def does_not_fit_message(error: BaseException) -> str:
    needs = needed_gib(error)
    first = next((line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line), str(error).splitlines()[0])
    what = f"needs {needs:.2f} GiB per device" if needs else first.strip()[:300]
    return f"does not fit in device memory: {what}; change " + "; ".join(MEMORY_FIELDS)


@dataclasses.dataclass
class TrainProgram:
    mesh: Mesh
    rules: Any
    mask: dict
    optimizer: Any
    schedules: dict
    abstract_params: Any       # ShapeDtypeStructs, no sharding
    param_shardings: Any
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying state_shardings (lower() and restore() take it)
    batch_sharding: NamedSharding
    create_state_jit: Callable
    train_step_jit: Callable

    def _in_context(self, fn, *args):
        # Tracing happens at the first call: the model's logical-axis constraints need the mesh and rules then.
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            try:
                return fn(*args)
            except jax.errors.JaxRuntimeError as e:
                if is_out_of_memory(e):
                    raise DoesNotFit(does_not_fit_message(e)) from None
                raise

    def create_state(self, params) -> TrainState:
        params = jax.device_put(params, self.param_shardings)   # no-op when already in place
        return self._in_context(self.create_state_jit, params)

    def train_step(self, state: TrainState, batch: dict):
        return self._in_context(self.train_step_jit, state, batch)

    def lower_create_state(self):
        abstract = parallel.with_shardings(self.abstract_params, self.param_shardings)
        return self._in_context(self.create_state_jit.lower, abstract)

    def lower_train_step(self, abstract_batch: dict):
        return self._in_context(self.train_step_jit.lower, self.abstract_state, abstract_batch)


def build_program(cfg, model_cfg, mesh: Mesh, num_tasks: int, rules=parallel.DEFAULT_RULES) -> TrainProgram:
    boxed = parallel.abstract_params(model_cfg)
    shardings = parallel.param_shardings(boxed, mesh, rules)
    abstract_params = parallel.strip_boxes(boxed)
    mask = optim.trainable_mask(abstract_params, tuple(cfg.optim.trainable))
    abstract_trainable, _ = optim.split(abstract_params, mask)
    optimizer, schedules = optim.make_optimizer(cfg.optim, abstract_trainable, cfg.total_steps)

    def create_state(params):
        trainable, _ = optim.split(params, mask)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trainable),
                          jax.random.key_data(jax.random.key(cfg.seed)))

    state_shapes = jax.eval_shape(create_state, abstract_params)
    state_sh = parallel.state_shardings(state_shapes, abstract_params, shardings, mesh)
    batch_sh = parallel.batch_sharding(mesh, rules)
    grad_shardings, _ = optim.split(shardings, mask)
    step = make_train_step(LlavaForConditionalGeneration(model_cfg), optimizer, lambda p: optim.split(p, mask),
                           num_tasks=num_tasks, grad_accum_steps=cfg.grad_accum_steps,
                           grad_shardings=grad_shardings, batch_sharding=batch_sh)
    return TrainProgram(
        mesh=mesh, rules=rules, mask=mask, optimizer=optimizer, schedules=schedules,
        abstract_params=abstract_params, param_shardings=shardings, state_shardings=state_sh,
        abstract_state=parallel.with_shardings(state_shapes, state_sh), batch_sharding=batch_sh,
        create_state_jit=jax.jit(create_state, in_shardings=(shardings,), out_shardings=state_sh),
        train_step_jit=jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                               donate_argnums=(0,)))


def abstract_batch(cfg, model_cfg, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the data pipeline gives the step at the config's largest shape
    (global_batch_size x data.max_length, K image slots per row; data/packing.py's layout)."""
    B, L = cfg.global_batch_size, cfg.data.max_length
    K = cfg.data.max_images_per_row or max(1, L // (model_cfg.tokens_per_image + 1))
    size = model_cfg.vision.image_size
    shapes = {"input_ids": ((B, L), jnp.int32), "targets": ((B, L), jnp.int32), "segment_ids": ((B, L), jnp.int32),
              "positions": ((B, L), jnp.int32), "task_ids": ((B, L), jnp.int32),
              "pixel_values": ((B, K, 3, size, size), jnp.float32), "image_mask": ((B, K), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}
