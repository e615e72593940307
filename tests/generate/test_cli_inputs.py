"""`python -m vflan_jax.generate` checks its inputs before loading a model: one line, exit status 2."""
import pytest
from PIL import Image

from vflan_jax import generate
from vflan_jax.checkpoint import CONFIG, PARAMS
from vflan_jax.cli import EXIT_BAD_INPUT


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A folder that looks like a model checkpoint, a good and a corrupt image; loading a model fails the test."""
    (tmp_path / "ckpt" / PARAMS).mkdir(parents=True)
    (tmp_path / "ckpt" / CONFIG).write_text("{}")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(generate.Generator, "from_checkpoint", no_loading)
    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    return tmp_path


Q = "What is this?"


@pytest.mark.parametrize("args, culprit", [
    (["--checkpoint", "ckpt", "--image", "missing.jpg", "--prompt", Q], "--image {}/missing.jpg: file not found"),
    (["--checkpoint", "ckpt", "--image", "broken.png", "--prompt", Q], "--image {}/broken.png: not a readable image"),
    (["--checkpoint", "nowhere", "--image", "good.png", "--prompt", Q], "--checkpoint {}/nowhere: no such directory"),
    (["--checkpoint", ".", "--prompt", "What is this?"], "neither a vflan_jax model checkpoint"),
    (["--checkpoint", "ckpt", "--image", "good.png"], "--prompt is required"),
    (["--checkpoint", "ckpt", "--prompt", "<image>\nWhat is this?"], "contains <image> but no --image"),
    (["--checkpoint", "ckpt", "--image", "good.png", "--prompt", "Hi", "--conv_template", "none"], "put <image> where"),
    (["--checkpoint", "ckpt", "--prompt", "Hi", "--top_p", "0"], "0 < --top_p <= 1"),
    (["--checkpoint", "ckpt", "--prompt", "Hi", "--sharding_overrides", "mlpp=tensor"],
     "--sharding_overrides mlpp: unknown logical axis name"),
    (["--checkpoint", "ckpt", "--prompt", "Hi", "--sharding_overrides", "mlp=fsdp,fsdp"],
     "--sharding_overrides mlp: mesh axis 'fsdp' is used twice"),
])
def test_bad_input_is_one_line_and_status_2(inputs, capsys, args, culprit):
    assert generate.main(args) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert culprit.format(inputs) in lines[0]
    assert captured.out == ""


def test_sharding_overrides_reach_the_loader(inputs, monkeypatch):
    """--sharding_overrides: the rules the checkpoint is loaded (and generation runs) with."""
    from vflan_jax.convert.errors import ConversionError
    from vflan_jax.parallel import rules_with
    seen = {}

    def record(path, **kw):
        seen.update(kw)
        raise ConversionError("stop here")
    monkeypatch.setattr(generate.Generator, "from_checkpoint", record)
    args = ["--checkpoint", "ckpt", "--prompt", "Hi", "--sharding_overrides", "mlp=fsdp,tensor", "embed=none"]
    assert generate.main(args) == EXIT_BAD_INPUT
    assert seen["rules"] == rules_with({"mlp": ("fsdp", "tensor"), "embed": None})
