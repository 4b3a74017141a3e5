"""What every command line of the project shares: one-line errors and exit codes.

A command wraps its work in :func:`run_main`. An expected failure prints
``error: <one line>`` on stderr and exits with :data:`EXIT_USAGE` instead of a
traceback: a bad input (a config field, a file, a module id), a full disk or a
read-only, unwritable output (the line names the path), a training that
diverged (what diverged, at which step; what finished stays on disk). Ctrl-C
prints one line (what to do next) and exits with :data:`EXIT_INTERRUPTED`.
Anything else is a bug: its traceback is printed, then one line asking for a
report, and the exit status is :data:`EXIT_BUG`.

Every command parses its absl flags with :func:`parse_flags`, into a fresh
``FlagValues`` of its own (so commands run one after another in one process):
``--help`` prints the command's docstring and every flag with its default (exit 0);
an unknown flag, a bad value or a positional argument is one ``error:`` line (exit 2).
A command with a ``--config`` goes through
:func:`nettransplant.experiments.config.parse_config_flags`, which adds the config
flag and its one-line errors.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from absl import flags

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


HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull")


def refuse(message: object) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with :data:`EXIT_USAGE`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def wants_help(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (no program name) asks for help before any ``--``."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in HELP_FLAGS:
            return True
    return False


def _is_required(flag: flags.Flag) -> bool:
    # absl marks a required flag with a validator refusing None (mark_flag_as_required).
    return any("must have a value other than None" in getattr(v, "message", "")
               for v in flag.validators)


def flags_help(values: flags.FlagValues) -> str:
    """Every flag of ``values``, in the order defined: its name, help and default."""
    lines, seen = [], set()
    for name in values:
        flag = values[name]
        if id(flag) in seen or name != flag.name:
            continue
        seen.add(id(flag))
        spelled = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        if _is_required(flag):
            default = "required"
        elif flag.default is None:
            default = "default: none"
        else:
            default = f"default: {flag.default_as_str}"
        lines.append(textwrap.fill(f"{spelled}: {one_line(flag.help)}", width=88,
                                   initial_indent="  ", subsequent_indent="      "))
        lines.append(f"      ({default})")
    return "\n".join(lines)


def command_help(program: str, doc: str, values: flags.FlagValues | None = None) -> str:
    """What ``--help`` prints: the usage line, ``doc`` and the flags of ``values``."""
    parts = [f"usage: {program} [flags]", doc.strip()]
    if values is not None:
        parts.append("flags:\n" + flags_help(values))
    return "\n\n".join(parts) + "\n"


def commands_help(program: str, summaries: Mapping[str, str], doc: str = "") -> str:
    """What ``--help`` of a program with commands prints: each command and what it does."""
    width = max(map(len, summaries))
    listed = "\n".join(f"  {name:<{width}}  {summary}" for name, summary in summaries.items())
    text = (f"usage: {program} <command> [flags]   ({program} <command> --help: its flags and "
            f"their defaults)\n\ncommands:\n{listed}\n")
    return text + (f"\n{doc.strip()}\n" if doc else "")


def choose_command(argv: Sequence[str], summaries: Mapping[str, str], *, program: str,
                   doc: str = "") -> str | None:
    """The command ``argv[0]`` names, among ``summaries``' keys.

    Returns None after printing :func:`commands_help` for ``--help``. No command or an
    unknown one is one ``error:`` line (``SystemExit`` with :data:`EXIT_USAGE`).
    """
    if argv and argv[0] in HELP_FLAGS:
        print(commands_help(program, summaries, doc), end="")
        return None
    if not argv or argv[0] not in summaries:
        given = f"unknown command {argv[0]!r}" if argv else "no command"
        refuse(f"{program}: {given}; commands: {', '.join(summaries)} ({program} --help)")
    return argv[0]


def parse_flags(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], object], *,
                program: str, doc: str,
                describe_error: Callable[[BaseException], str | None] | None = None
                ) -> flags.FlagValues:
    """The flags a command defines (``define(values)``), parsed from ``argv``.

    Args:
      argv: the command line without the program name (default ``sys.argv[1:]``).
      define: defines the command's flags on the fresh ``FlagValues`` it is given.
      program: the command as typed (``nettransplant reproduce``), for the help.
      doc: what the command does and how to run it, printed by ``--help``.
      describe_error: the one line for a parse error (None: the error's own text);
        given, errors other than absl's are reported too (config files raise anything).
    Returns:
      The parsed ``FlagValues`` (``values.workdir`` is ``--workdir``'s value).
    Raises:
      SystemExit: 0 after ``--help``; :data:`EXIT_USAGE` after one ``error:`` line for an
        unknown flag, a bad or missing value, or a positional argument.
    """
    from absl import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    values = flags.FlagValues()
    define(values)
    if wants_help(argv):
        print(command_help(program, doc, values), end="")
        raise SystemExit(0)
    try:
        rest = values([program, *argv])
    except Exception as err:  # noqa: BLE001 - sorted below: flag errors and config files'
        if describe_error is None and not isinstance(err, flags.Error):
            raise
        refuse((describe_error and describe_error(err)) or error_message(err))
    if rest[1:]:
        refuse(f"unexpected arguments {rest[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint save at INFO
    return values


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
