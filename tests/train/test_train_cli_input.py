"""The trainer's command line: list-valued fields set from it (a tuple), relative paths resolved
where the command runs, and bad input reported in one line with exit status 2."""
import subprocess

import pytest

from tests.train.cli import env, train_args
from vflan_jax.cli import EXIT_BAD_INPUT


@pytest.mark.slow
def test_own_annotation_files_from_the_command_line(tmp_path):
    """--config.data.sources.train.paths takes a tuple; a missing file is named by its absolute path."""
    args = train_args("runs/mine", tmp_path / "suite", steps=1)
    args.append("--config.data.sources.train.paths=('my_data/part1.json', 'my_data/part2.json')")
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data/part1.json").write_text("[]")
    proc = subprocess.run(args, cwd=tmp_path, env=env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-3000:]
    assert str(tmp_path / "my_data/part2.json") in err[0]  # the second file of the tuple, made absolute
    assert "Traceback" in (tmp_path / "runs/mine/train.log").read_text()  # the details are kept in the log


def test_every_config_path_is_made_absolute_once(tmp_path, monkeypatch):
    from vflan_jax.data.pipeline import source_config
    from vflan_jax.train.config import base_config
    from vflan_jax.train.inputs import resolve_config_paths
    cfg = base_config()
    with cfg.unlocked():
        cfg.data.sources.mine = source_config(("a.json", "gs://bucket/b.json"), "images")
        cfg.eval_data.val = source_config("val.json", "~/val_images")
        cfg.tokenizer, cfg.init_from = "ckpt/tokenizer", "runs/stage1"
    monkeypatch.chdir(tmp_path)
    resolve_config_paths(cfg)
    assert cfg.data.sources.mine.paths == (str(tmp_path / "a.json"), "gs://bucket/b.json")
    assert cfg.data.sources.mine.image_folder == str(tmp_path / "images")
    assert cfg.eval_data.val.image_folder.startswith("/") and cfg.eval_data.val.image_folder.endswith("/val_images")
    assert (cfg.tokenizer, cfg.init_from) == (str(tmp_path / "ckpt/tokenizer"), str(tmp_path / "runs/stage1"))
