"""The start-up parameter table: per-module counts equal the transformers model's, the frozen
vision tower is marked frozen, and every row's sharding is the one the array is created with."""
import logging

import jax
import pytest
import torch

from configs.demo import get_config
from tests.models.hf_oracle import build_hf_model, nano_config
from vflan_jax import parallel
from vflan_jax.train import parameter_table
from vflan_jax.train.program import build_program

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")


def _hf_counts(model: torch.nn.Module) -> dict[str, int]:
    """transformers LLaVA's parameter count per top-level module (its lm_head is ours in language_model)."""
    counts = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        module = parts[1] if parts[0] == "model" else parts[0]
        module = "language_model" if module == "lm_head" else module
        counts[module] = counts.get(module, 0) + p.numel()
    return counts


@pytest.fixture(scope="module")
def program():
    cfg = get_config()   # trains the projector and the LLM; the vision tower is frozen
    return build_program(cfg, nano_config(), parallel.make_mesh((1, 8, 1)), num_tasks=3)


def test_module_rows_count_what_transformers_counts(program):
    rows = parameter_table.parameter_rows(program.abstract_params, program.param_shardings, program.mask)
    modules = {m.module: m for m in parameter_table.module_rows(rows)}
    expected = _hf_counts(build_hf_model(nano_config()))
    assert set(modules) == set(expected) == {"vision_tower", "multi_modal_projector", "language_model"}
    for name, m in modules.items():
        assert m.trainable + m.frozen == expected[name], name
    assert modules["vision_tower"].trainable == 0 and modules["vision_tower"].frozen == expected["vision_tower"]
    for name in ("multi_modal_projector", "language_model"):
        assert modules[name].frozen == 0
    assert sum(r.size for r in rows) == sum(expected.values())
    assert all(not r.trainable for r in rows if r.name.startswith("vision_tower/"))
    summary = parameter_table.summary_table(rows)
    assert summary.startswith(f"parameters: {sum(expected.values()):,} ")
    for name in expected:
        assert name in summary


def test_rows_name_the_shardings_the_arrays_are_created_with(program):
    rows = {r.name: r for r in parameter_table.parameter_rows(program.abstract_params, program.param_shardings,
                                                               program.mask)}
    params, _ = parallel.init_params(nano_config(), program.mesh, seed=0)
    flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert set(flat) == set(rows)
    sharded = 0
    for name, leaf in flat.items():
        axes = [x for a in leaf.sharding.spec if a is not None for x in (a if isinstance(a, tuple) else (a,))]
        if axes:
            sharded += 1
            assert all(a in rows[name].sharding for a in axes), (name, leaf.sharding.spec, rows[name].sharding)
        else:
            assert rows[name].sharding == "replicated", name
        assert rows[name].shape == leaf.shape and rows[name].bytes == leaf.nbytes
    assert sharded > len(flat) // 2   # fsdp over 8 devices shards most parameters


def test_the_full_table_goes_to_the_log_file_only(program, caplog):
    with caplog.at_level(logging.INFO):
        parameter_table.log_tables(program.abstract_params, program.param_shardings, program.mask)
    summary, full = caplog.records[-2:]
    assert getattr(summary, "console", True) and summary.getMessage().startswith("parameters: ")
    assert full.console is False   # cli.FILE_ONLY: train.log, not the console
    assert "language_model/embed_tokens/embedding" in full.getMessage()
