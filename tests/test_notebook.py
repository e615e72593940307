"""notebooks/quickstart.ipynb runs top to bottom (nbclient, the venv's kernel) with a small setting:
the loss curve is written and shown, the model answers, and transformers loads the export."""
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o["text"])
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "\n".join(out)


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("notebook") / "run"
    env = {"VFLAN_NOTEBOOK_STEPS": "3", "VFLAN_NOTEBOOK_INSTANCES": "6", "VFLAN_NOTEBOOK_SMALL": "1",
           "VFLAN_NOTEBOOK_WORKDIR": str(workdir), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel (and the trainer it starts) inherit this environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
        except CellExecutionError as e:  # show what the failing cell printed (e.g. the trainer's error)
            printed = "\n".join(_text(c)[-3000:] for c in nb.cells if c.cell_type == "code")
            raise AssertionError(f"{printed}\n{e}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, workdir


def test_notebook_runs_top_to_bottom(executed):
    nb, workdir = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    everything = "\n".join(_text(c) for c in code)

    assert "repository: " + str(REPO) in everything
    assert "[CpuDevice(id=0)]" in everything                       # the device cell ran jax
    assert json.loads((workdir / "synthetic" / "manifest.json").read_text())["params"]["n"] == 6
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 3 and "after 3 steps" in everything
    assert (workdir / "loss_curve.png").stat().st_size > 0
    loss_cell = next(c for c in code if "loss_curve.png" in c.source)
    assert _images(loss_cell) == 1                                  # the curve is displayed
    gen_cell = next(c for c in code if "Generator.from_checkpoint" in c.source)
    assert _images(gen_cell) == 1                                   # the image is shown
    lines = dict(line.split(":", 1) for line in _text(gen_cell).splitlines() if ":" in line)
    assert lines["question"].strip() and "model" in lines and lines["reference"].strip()
    assert (workdir / "hf" / "config.json").exists()
    hf_cell = next(c for c in code if "LlavaForConditionalGeneration.from_pretrained" in c.source)
    assert "HF load OK: LlavaForConditionalGeneration" in _text(hf_cell)
    assert "transformers:" in _text(hf_cell)
