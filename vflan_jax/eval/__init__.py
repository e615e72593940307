"""Benchmark evaluation of vflan_jax checkpoints with LLaVA-1.5's prompts and the official scoring rules.

    python -m vflan_jax.eval run   --benchmark mme --checkpoint C --data_dir D --out R
    python -m vflan_jax.eval score --benchmark pope --predictions answers.jsonl --annotations D

One module per benchmark (reads the shipped files, builds prompts, scores); runner.py is the
batched, resumable generation loop; judge.py the OpenAI-compatible judge; report.py the output.
See docs/EVALUATION.md.
"""
