"""Decode step time at several KV-cache lengths, PRESETS["small"], random weights.

    .venv/bin/python benchmarks/decode_step_time.py --batch 16 --lengths 64,2048

Steps run inside one jitted fori_loop, as in the Generator's decode while_loop (cache donated,
updated in place; on CPU the layer weights are split once before the loop, as decode.py does).
ms/step = (t(34 steps) - t(2 steps)) / 32, best of --repeats after one warm-up.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vflan_jax.models.config import get_preset
from vflan_jax.models.llama import KVCache
from vflan_jax.models.llava import LlavaForConditionalGeneration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lengths", default="64,2048")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = get_preset("small")
    model = LlavaForConditionalGeneration(cfg)
    b = args.batch
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                        jnp.zeros((1, 1, 3, 224, 224)), jnp.zeros((1, 1), bool))["params"])()

    def run(params, cache, n):
        try:  # per-layer weights in the loop, as the Generator decodes on CPU (CompiledDecoder.prepare_params)
            from vflan_jax.models.llama import unstack_layers
            params = {**params, "language_model": unstack_layers(params["language_model"], cfg.text.num_layers)}
        except ImportError:  # older code without it
            pass

        def step(_, carry):
            tok, cache = carry
            logits, cache = model.apply({"params": params}, tok, None, None, jnp.full_like(tok, cache.index),
                                        jnp.ones_like(tok), cache)
            return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache
        return jax.lax.fori_loop(0, n, step, (jnp.ones((b, 1), jnp.int32), cache))

    run = jax.jit(run, donate_argnums=(1,), static_argnums=(2,))

    def fresh(s):  # cache filled up to S-40, so the 34 steps stay inside it
        c = KVCache.zeros(cfg.text, b, s, jnp.float32)
        return jax.block_until_ready(c._replace(index=jnp.int32(s - 40), segment_ids=jnp.ones((b, s), jnp.int32)))

    for s in (int(x) for x in args.lengths.split(",")):
        best = {}
        for n in (2, 34):
            jax.block_until_ready(run(params, fresh(s), n))  # compile
            times = []
            for _ in range(args.repeats):
                cache = fresh(s)
                t = time.perf_counter()
                jax.block_until_ready(run(params, cache, n))
                times.append(time.perf_counter() - t)
            best[n] = min(times)
        print(f"batch {b} cache length {s}: {(best[34] - best[2]) / 32 * 1e3:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
