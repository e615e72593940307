"""train_step_flops' projector term against the kernels the Projector module really creates."""
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vflan_jax.models.config import get_preset
from vflan_jax.models.projector import Projector
from vflan_jax.train.flops import train_step_flops


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_projector_flops_count_the_modules_kernels(projector_type):
    cfg = get_preset("nano", projector_type=projector_type)
    rng = random.Random(projector_type)
    shape = dict(batch=rng.randint(1, 8), seq_len=rng.randint(16, 256), image_slots=rng.randint(1, 4))
    trained = train_step_flops(cfg, **shape) - train_step_flops(cfg, projector_trainable=False, **shape)
    features = jax.ShapeDtypeStruct((1, cfg.tokens_per_image, cfg.vision.hidden_size), jnp.float32)
    params = jax.eval_shape(Projector(projector_type, cfg.text.hidden_size).init, jax.random.key(0), features)
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in
                  traverse_util.flatten_dict(nn.meta.unbox(params["params"])).items() if path[-1] == "kernel")
    # trained: forward + backward, 6 FLOPs per kernel weight and image token; frozen: forward only, 2
    assert trained == 4 * kernels * shape["batch"] * shape["image_slots"] * cfg.tokens_per_image
