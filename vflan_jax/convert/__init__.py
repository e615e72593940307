"""HF transformers <-> vflan_jax weights (CLI: python -m vflan_jax.convert)."""
