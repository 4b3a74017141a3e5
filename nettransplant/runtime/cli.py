"""What every command line of the project shares: one-line errors and exit codes.

A launch script wraps its work in :func:`run_main`. An expected failure prints
``error: <one line>`` on stderr and exits with :data:`EXIT_USAGE` instead of a
traceback: a bad input (a config field, a file, a module id), a full disk or a
read-only, unwritable output (the line names the path), a training that
diverged (what diverged, at which step; what finished stays on disk). Ctrl-C
prints one line (what to do next) and exits with :data:`EXIT_INTERRUPTED`.
Anything else is a bug: its traceback is printed, then one line asking for a
report, and the exit status is :data:`EXIT_BUG`.

A command of absl flags parses them with
:func:`nettransplant.experiments.config.config_flags_parser` (a ``--config`` file that
is missing or fails to load is one line, exit 2); one of argparse builds its parser
with :class:`ArgumentParser` (a bad argument is one line after the usage, exit 2).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BUG = 1
BUG_REPORT = "this is a bug: please report it with the command and the traceback above"

# Operating-system errors of the place a command writes to: one line naming the path.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device (the disk is full)",
               errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}

# Errors that come from what the user gave (files, ids, config values), not from a bug.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError)


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(text).split())


def error_message(err: BaseException) -> str:
    """The one-line message of ``err`` (a KeyError's own text, not its repr; for a disk or
    permission error, the path and what went wrong)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        reason = DISK_ERRORS[err.errno]
        return one_line(f"{' -> '.join(paths)}: {reason}" if paths else reason)
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return one_line(message)


def _non_finite_error() -> type | None:
    # A training's divergence; only raised once nettransplant.training.loop is imported.
    training = sys.modules.get("nettransplant.training.loop")
    return getattr(training, "NonFiniteError", None)


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is an expected failure (reported as one line, exit 2), not a bug."""
    if isinstance(err, USER_ERRORS):
        return True
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        return True
    non_finite = _non_finite_error()
    return non_finite is not None and isinstance(err, non_finite)


def expected_message(err: BaseException) -> str:
    """The one line printed after ``error:`` for an expected failure."""
    non_finite = _non_finite_error()
    if non_finite is not None and isinstance(err, non_finite):
        return one_line(f"training diverged: {err}")
    return error_message(err)


def unexpected_arguments(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (absl's, program name first) has positional arguments, which no
    command takes; prints the one-line error (:func:`start` calls it)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
        return True
    return False


def start(argv: Sequence[str]) -> bool:
    """Open a command's ``main``: whether it may go on (``if not cli.start(argv): return
    cli.EXIT_USAGE``). Refuses positional arguments (:func:`unexpected_arguments`) and
    keeps absl's log at WARNING (orbax logs every checkpoint save at INFO)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    return not unexpected_arguments(argv)


def check_output_folder(folder: str | os.PathLike, flag: str, *, create: bool = True) -> None:
    """Create ``folder`` (and its parents) and write and remove a probe file in it, before
    any work: a folder that cannot take the command's output (read-only, no permission,
    a full disk, a path through a file) is a :class:`UsageError` naming ``flag``.

    Without ``create`` nothing is created: the probe goes to the nearest existing folder
    on the way to ``folder``."""
    folder = os.path.abspath(os.fspath(folder))
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        else:
            while not os.path.exists(folder) and os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)
            if not os.path.isdir(folder):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        reason = DISK_ERRORS.get(e.errno) or e.strerror or str(e)
        raise UsageError(f"{flag} {folder}: cannot write there ({reason})") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors end in one ``error: <message>`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {one_line(message)}\n")


def run_main(work: Callable[[], object], *, interrupted: str = "interrupted") -> int:
    """Run ``work()``; returns the process exit code.

    Args:
      work: the command's whole job.
      interrupted: what to print on Ctrl-C (how to resume, what is unchanged).
    Returns:
      0 on success, :data:`EXIT_USAGE` after an expected failure (printed as one
      line: :func:`is_expected`), :data:`EXIT_INTERRUPTED` after Ctrl-C,
      :data:`EXIT_BUG` after any other error (its traceback, then
      :data:`BUG_REPORT`).
    """
    try:
        work()
    except KeyboardInterrupt:
        print(one_line(interrupted), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - sorted into expected failures and bugs
        if is_expected(err):
            print(f"error: {expected_message(err)}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return EXIT_BUG
    return 0
