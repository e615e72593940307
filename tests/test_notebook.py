"""notebooks/quickstart.ipynb runs top to bottom (nbclient, the venv's kernel) with a small setting:
the loss curve is written and shown, the model answers, and transformers loads the export."""
import ast
import json
import os
import pathlib
import shutil

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


@pytest.mark.slow
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
    assert "same answer: True" in _text(hf_cell)  # AutoProcessor + generate on the export = vflan_jax's answer
    assert "n_image_tokens" not in hf_cell.source  # the processor expands the image tokens, not the notebook


def _colab_repository():
    """The install cell's colab_repository function, without running the cell (it would chdir)."""
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if "def colab_repository" in c.source)
    tree = ast.parse(cell.source)
    namespace = {"pathlib": pathlib, "shutil": shutil, "sh": None}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "colab_repository"],
                            []), "cell", "exec"), namespace)
    return namespace["colab_repository"]


def test_colab_install_from_an_uploaded_zip_or_a_clear_message(tmp_path):
    find = _colab_repository()
    with pytest.raises(RuntimeError, match="Upload it .* or set REPO_URL"):
        find(tmp_path, "")
    copy = tmp_path / "src" / "vflan_jax-main"  # GitHub's Download ZIP: one top folder
    (copy / "vflan_jax").mkdir(parents=True)
    (copy / "vflan_jax" / "__init__.py").write_text("")
    (copy / "pyproject.toml").write_text("[project]\nname = 'vflan_jax'\n")
    content = tmp_path / "content"
    content.mkdir()
    shutil.make_archive(str(content / "vflan_jax-main"), "zip", tmp_path / "src")
    repo = find(content, "")
    assert (repo / "pyproject.toml").read_text() == (copy / "pyproject.toml").read_text()
    assert find(content, "") == repo  # unpacked once, found again
