"""The jitted training step: loss, gradients of the trainable tree, clip, AdamW update.

Loss = mean over the labelled tokens of the whole global batch (sum of token losses / number
of labelled tokens, across all devices and accumulation micro-batches). LLaVA (HF Trainer +
DeepSpeed) instead averages per-device token means, so devices with few labelled tokens weigh
as much as devices with many; with packing, rows are full and the two nearly coincide.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.models.losses import chunked_cross_entropy
from vflan_jax.parallel import micro_batches
from vflan_jax.train.optim import merge

MODEL_INPUTS = ("input_ids", "pixel_values", "image_mask", "positions", "segment_ids")


class TrainState(NamedTuple):
    step: jax.Array
    params: Any            # the full tree (trainable and frozen)
    opt_state: Any         # over the trainable tree only
    rng: jax.Array         # uint32 key data: with step, the source of LoRA dropout masks (dropout_key_for)


def token_losses(model, params, batch, dropout_key=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy in float32 and the labelled-token weights, both [B, T], and their sum
    (differentiate it, not the per-token losses: the chunked loss then forms its gradient in its forward).
    With model.config.loss_chunk_size the lm_head is applied inside the loss, chunk by chunk
    (models/losses.py), so no [B, T, vocab] float32 logits exist; 0 keeps the full logits.
    dropout_key: LoRA dropout is drawn from it (training); None = deterministic (evaluation)."""
    inputs = (batch[k] for k in MODEL_INPUTS)
    targets = batch["targets"]
    chunk = model.config.loss_chunk_size
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    if chunk:
        hidden, lm_head = model.apply({"params": params}, *inputs, return_hidden=True, rngs=rngs)
        return chunked_cross_entropy(hidden, lm_head, targets, chunk)
    logits = model.apply({"params": params}, *inputs, rngs=rngs).astype(jnp.float32)
    weights = (targets != IGNORE_INDEX).astype(jnp.float32)
    with jax.named_scope("lm_head_cross_entropy"):  # names the ops in profiles
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(targets == IGNORE_INDEX, 0, targets))
    return ce * weights, weights, jnp.sum(ce * weights)


def _per_task(values, task_ids, num_tasks: int):
    ids = jnp.where(task_ids >= 0, task_ids, num_tasks).reshape(-1)
    return jax.ops.segment_sum(values.reshape(-1), ids, num_segments=num_tasks + 1)[:num_tasks]


def _sum_loss_and_stats(model, trainable, frozen, batch, num_tasks, dropout_key):
    ce, w, total = token_losses(model, merge(trainable, frozen), batch, dropout_key)
    stats = {"loss_sum": total, "tokens": w.sum(),
             "task_loss_sum": _per_task(ce, batch["task_ids"], num_tasks),
             "task_tokens": _per_task(w, batch["task_ids"], num_tasks)}
    return total, stats


def uses_dropout(model) -> bool:
    lora = model.config.text.lora
    return lora is not None and lora.dropout > 0


def dropout_key_for(state: TrainState, micro_batch) -> jax.Array:
    """The dropout key of one accumulation micro-batch: a function of the state's seed, its step and
    the micro-batch index only, so a resumed run draws the masks an uninterrupted one draws."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), micro_batch)


def make_train_step(model, optimizer, mask_split, *, num_tasks: int, grad_accum_steps: int,
                    grad_shardings=None, batch_sharding=None):
    """Returns step(state, batch) -> (state, metrics). `mask_split(params) -> (trainable, frozen)`.
    grad_shardings (the trainable parameters' shardings): gradients are constrained to them, so XLA
    reduce-scatters each into its parameter's shards instead of all-reducing full copies.
    batch_sharding: keeps every accumulation micro-batch spread over all batch devices."""
    raw_grad_fn = jax.value_and_grad(lambda t, f, b, k: _sum_loss_and_stats(model, t, f, b, num_tasks, k), has_aux=True)
    dropout = uses_dropout(model)   # otherwise no key is made: the step's program stays as without LoRA dropout

    def grad_fn(trainable, frozen, batch, key):
        out, grads = raw_grad_fn(trainable, frozen, batch, key)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return out, grads

    def gradients(state, trainable, frozen, batch):
        key = (lambda i: dropout_key_for(state, i)) if dropout else (lambda i: None)
        if grad_accum_steps == 1:
            (_, stats), grads = grad_fn(trainable, frozen, batch, key(0))
            return grads, stats
        micro = jax.tree.map(lambda x: micro_batches(x, grad_accum_steps, batch_sharding), batch)

        def body(carry, mb_and_index):
            mb, i = mb_and_index
            (_, stats), grads = grad_fn(trainable, frozen, mb, key(i))
            return jax.tree.map(jnp.add, carry, (grads, stats)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], micro), key(0))))
        (grads, stats), _ = jax.lax.scan(body, (zeros[1], zeros[0][1]), (micro, jnp.arange(grad_accum_steps)))
        return grads, stats

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        trainable, frozen = mask_split(state.params)
        grads, stats = gradients(state, trainable, frozen, batch)
        n = jnp.maximum(stats["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)   # gradient of the global token mean
        grad_norm = optax.tree.norm(grads)
        loss = stats["loss_sum"] / n
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step never reaches the parameters; the host then stops or goes on (train.nonfinite).
        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_trainable, new_opt = keep(new_trainable, trainable), keep(new_opt, state.opt_state)
        new_state = TrainState(state.step + 1, merge(new_trainable, frozen), new_opt, state.rng)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": stats["tokens"],
                   "loss_sum": stats["loss_sum"], "task_loss_sum": stats["task_loss_sum"],
                   "task_tokens": stats["task_tokens"]}
        return new_state, metrics

    return step
