"""Layer stacks: nn.scan over identical layers, with nn.remat under a named policy.

Scanning keeps compile time flat in depth (one layer body is traced) and stores every
parameter with a leading 'layers' axis, which the converter and the sharding rules rely on.
"""
from __future__ import annotations

import flax.linen as nn
import jax

# Which intermediates the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,                                              # no remat: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,          # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,           # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def scanned_stack(layer_cls: type[nn.Module], *, length: int, remat_policy: str, num_broadcast_args: int):
    """Return a module class that applies `layer_cls` `length` times.

    The layer is called as layer(carry, *broadcast_args) -> (carry, per_layer_out); broadcast
    args (positions, masks) are shared by all layers. KV-cache decoding does not scan (see
    LlamaModel._cached_layers: a scanned cache is copied per layer).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    block = layer_cls
    if remat_policy != "none":
        block = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    in_axes = (nn.broadcast,) * num_broadcast_args
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},   # intermediates: what tests sow, per layer
        split_rngs={"params": True, "dropout": True},   # each layer its own init and dropout (LoRA) keys
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
