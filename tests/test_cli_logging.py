"""vflan_jax.cli.route_logging: the console shows vflan_jax's records (every record when verbose);
the log file gets everything, including what was logged before its name was known."""
import logging
import os

import pytest
from absl import logging as absl_logging

from vflan_jax import cli

TRAIN_PY = os.path.join(os.path.dirname(cli.__file__), "train.py")


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _ours(level, msg, **extra):
    """A record as logging.info(...) inside vflan_jax/train/__main__.py makes it."""
    record = logging.getLogger().makeRecord("root", level, TRAIN_PY, 1, msg, (), None, extra=extra or None)
    logging.getLogger().handle(record)


@pytest.mark.parametrize("verbose", [False, True])
def test_console_and_file(tmp_path, capsys, restore_root, verbose):
    cli.route_logging(verbose=verbose, keep_for_file=True)
    absl_logging.info("orbax-style INFO 7")                                   # a library, through absl
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.info("a record from outside the package")
    logging.getLogger("some.library").warning("library warning")
    _ours(logging.INFO, "step 1/3 | loss 6.9")
    _ours(logging.ERROR, "traceback detail", **cli.FILE_ONLY)
    cli.log_to_file(str(tmp_path / "run" / "train.log"))
    _ours(logging.WARNING, "after the file is open")
    console = capsys.readouterr().err
    log = (tmp_path / "run" / "train.log").read_text()
    for text in ("orbax-style INFO 7", "Unable to initialize backend", "outside the package", "library warning",
                 "step 1/3", "traceback detail", "after the file is open"):
        assert text in log, text
    assert "step 1/3" in console and "library warning" in console and "after the file is open" in console
    for text in ("orbax-style INFO 7", "Unable to initialize backend", "outside the package"):
        assert (text in console) == verbose, text
    assert ("traceback detail" in console) == verbose
    if not verbose:  # plain lines: the message, warnings labelled
        assert console.splitlines() == ["warning: library warning", "step 1/3 | loss 6.9",
                                        "warning: after the file is open"]
