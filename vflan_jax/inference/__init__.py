"""Batched KV-cache decoding: `generator.Generator` (the library) and the pieces it runs.

`vflan_jax.generate` is the CLI."""
