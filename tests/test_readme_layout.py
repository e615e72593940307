"""README's "How the code is organised" block names every module of every package it lists, and
only modules that exist (vflan_jax/eval/ is summarised in words, so it is only checked to exist)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def layout_block() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## How the code is organised", 1)[1].split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        m = re.match(r"(vflan_jax/\S*)\s", line)
        if m:
            folder = m.group(1)
        if folder:
            listed.setdefault(folder, set()).update(re.findall(r"([A-Za-z_]\w*)\.py\b", line))
    return listed


def test_the_layout_block_matches_the_tree():
    listed = layout_block()
    assert {"vflan_jax/", "vflan_jax/models/", "vflan_jax/data/", "vflan_jax/train/", "vflan_jax/convert/",
            "vflan_jax/inference/", "vflan_jax/eval/"} <= set(listed)
    for folder, names in listed.items():
        path = ROOT / folder
        assert path.is_dir(), folder
        if folder == "vflan_jax/eval/":
            continue
        modules = {p.stem for p in path.glob("*.py") if p.stem != "__init__"}
        assert names == modules, (folder, "listed, not in the tree:", sorted(names - modules),
                                  "in the tree, not listed:", sorted(modules - names))
