"""Benchmark evaluation of vflan_jax checkpoints with LLaVA-1.5's prompts and the official scoring rules.

    python -m vflan_jax.eval run   --benchmark mme --checkpoint C --data_dir D --out R
    python -m vflan_jax.eval score --benchmark pope --predictions answers.jsonl --annotations D
    python -m vflan_jax.eval table results/*/report.json --out table.md

One module per benchmark (reads the shipped files, builds prompts, scores); runner.py is the
batched, resumable generation loop; judge.py the OpenAI-compatible judge and its review cache;
report.py one benchmark's report, table.py the results table; tfds_source.py TFDS datasets.
See docs/EVALUATION.md.
"""
