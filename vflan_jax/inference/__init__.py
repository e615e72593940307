"""Pieces of batched KV-cache decoding; `vflan_jax.generate` is the entry point."""
