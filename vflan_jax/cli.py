"""What every command-line entry point shares: one exit-status scheme and user paths resolved once.

Exit status of every vflan_jax command:
  0  success
  1  failure while running (an error the input did not cause)
  2  bad input or usage (a missing file, a malformed record, an impossible option), one line naming it
  3  `convert verify`: the two models ran but their outputs differ beyond the tolerance
  75 (EX_TEMPFAIL) `train`: stopped by SIGTERM/SIGINT after saving a checkpoint; rerun to resume

Paths are resolved at the CLI boundary, once: a local path becomes absolute (Orbax and the
worker processes must not depend on the working directory), a URL (gs://...) is kept as given.
Library code below the CLIs receives only resolved paths.

Console: a command shows its own lines (vflan_jax's log records, anyone's warnings); library
INFO (Orbax, JAX backend probing) goes to the log file a command names (train: workdir/train.log)
or, with verbose (train: --verbosity=1), to the console too.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFY_MISMATCH = 3
EXIT_PREEMPTED = 75


def is_url(path: str) -> bool:
    return "://" in path


def resolve_path(path: str | os.PathLike | None) -> str | None:
    """Absolute local path (user home expanded), or the URL unchanged; None stays None."""
    if path is None:
        return None
    path = os.fspath(path)
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------------- console and log file
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
FILE_ONLY = {"console": False}  # logging extra= for a record meant for the log file only
_log_buffer = None  # records kept until the log file is known (see route_logging)


class _ProductLines(logging.Filter):
    """vflan_jax's own records at any level, other libraries' from WARNING up; none marked
    extra=FILE_ONLY (e.g. the traceback behind a one-line error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class _PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def route_logging(verbose: bool = False, keep_for_file: bool = False) -> None:
    """Console: vflan_jax's lines only (library INFO such as Orbax's and JAX's backend probing is
    chatter to a user), or every record in absl's format when verbose (--verbosity=1 / -v 1).
    keep_for_file: also keep every record until log_to_file names the file."""
    global _log_buffer
    from absl import logging as absl_logging
    root = logging.getLogger()
    for handler in list(root.handlers):  # absl's stderr handler (app.run installs it) and any default
        root.removeHandler(handler)
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # the root level decides
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(absl_logging.PythonFormatter())
    else:
        console.setFormatter(_PlainFormatter())
        console.addFilter(_ProductLines())
    root.addHandler(console)
    if keep_for_file:
        _log_buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        root.addHandler(_log_buffer)


def log_to_file(path: str) -> None:
    """Every record (absl format), from the start of the process, appended to path."""
    global _log_buffer
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from absl import logging as absl_logging
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(absl_logging.PythonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    if _log_buffer is not None:
        _log_buffer.setTarget(handler)
        _log_buffer.flush()
        root.removeHandler(_log_buffer)
        _log_buffer = None


# ---------------------------------------------------------------------- absl flag parsing
def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for app.run(flags_parser=), with every parse failure one line and exit
    status 2: an unknown or malformed flag, and a `--config.FIELD=VALUE` override ml_collections
    cannot apply (a field the config does not have, a value of the wrong type), named, not a traceback."""
    import re

    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        found = re.search(r"'([^'\\]+)", str(e))
        missing = found.group(1) if found else ""
        culprits = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                    and missing in a.split("=")[0].split(".")]
        hint = str(e).split("\\n")[-1] if "Did you mean" in str(e) else "not a field of the config"
        message = f"{culprits[0] if culprits else 'a --config.* override'}: {hint.strip(chr(34) + chr(39))}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
