"""What every command line of the project shares: one-line errors and exit codes.

A launch script wraps its work in :func:`run_main`; a bad input (a config
field, a file, a module id) then prints ``error: <one line>`` on stderr and
exits with :data:`EXIT_USAGE` instead of a traceback, and Ctrl-C prints one
line (what to do next) and exits with :data:`EXIT_INTERRUPTED`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors that come from what the user gave (files, ids, config values), not from a bug.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError)


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(text).split())


def error_message(err: BaseException) -> str:
    """The one-line message of ``err`` (a KeyError's own text, not its repr)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return one_line(message)


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


def run_main(work: Callable[[], object], *, interrupted: str = "interrupted") -> int:
    """Run ``work()``; returns the process exit code.

    Args:
      work: the command's whole job.
      interrupted: what to print on Ctrl-C (how to resume, what is unchanged).
    Returns:
      0 on success, :data:`EXIT_USAGE` after a user error (printed as one
      line), :data:`EXIT_INTERRUPTED` after Ctrl-C.
    """
    try:
        work()
    except KeyboardInterrupt:
        print(one_line(interrupted), file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0
