"""Output folders and files with one writer at a time, checked before any work starts.

Every net, module, prediction file and overlay folder the ``nettransplant net``
commands write goes through :func:`exclusive_output`: an ``os.mkdir`` lock
``.NAME.lock`` beside ``NAME`` (atomic and exclusive on every local file
system) that a second writer finds and is refused by, in one line. The lock
records its owner's host and process id; a lock whose process no longer runs
on this host (a killed writer) is taken over. Under the lock, staging folders
and files a killed write left behind (``.NAME.tmp-*``, ``.NAME.old-*``) are
removed before the new write starts.

:func:`check_output` is what a command calls before its work (training, for
example): ``--out`` must not exist unless ``--overwrite`` is given, must be of
the kind the command writes, and its folder must be writable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"
STAGING_MARKERS = (".tmp-", ".old-")


class OutputBusyError(FileExistsError):
    """Another process is writing the same output."""


def lock_path(target: str | os.PathLike) -> Path:
    """``DIR/.NAME.lock``: the lock of the output ``DIR/NAME``."""
    target = Path(target)
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _owner_line() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _read_owner(lock: Path) -> tuple[str, int] | None:
    """``(host, pid)`` recorded in a lock, or None while it is being created or unreadable."""
    try:
        host, pid = (lock / "owner").read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _stale(owner: tuple[str, int] | None) -> bool:
    """Whether a lock's owner is a process of this host that no longer runs."""
    if owner is None:
        return False
    host, pid = owner
    return host == socket.gethostname() and pid != os.getpid() and not _running(pid)


def _take_over(lock: Path, owner: tuple[str, int]) -> bool:
    """Move a stale lock aside (one process wins the rename); True if it was ``owner``'s."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True  # another process removed it first: try to take the lock again
    if _read_owner(aside) != owner:  # a live lock was taken meanwhile: give it back
        with contextlib.suppress(OSError):
            os.rename(aside, lock)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def acquire(target: str | os.PathLike) -> Path:
    """Take the lock of the output ``target``; its path. An :class:`OutputBusyError` if held.

    The folder holding ``target`` is created if needed.
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    for _ in range(3):
        try:
            os.mkdir(lock)
        except FileExistsError:
            owner = _read_owner(lock)
            if _stale(owner) and _take_over(lock, owner):
                continue
            who = f"process {owner[1]} on {owner[0]}" if owner else "another process"
            raise OutputBusyError(
                f"{target} is being written by {who}; wait for it to finish (or remove {lock} "
                "if no such process runs)") from None
        (lock / "owner").write_text(_owner_line() + "\n")
        return lock
    raise OutputBusyError(f"{target}: cannot take the lock {lock}; try again")


def release(lock: Path) -> None:
    """Remove a lock taken by :func:`acquire` (if it is still this process's)."""
    owner = _read_owner(lock)
    if owner is None or owner == (socket.gethostname(), os.getpid()):
        shutil.rmtree(lock, ignore_errors=True)


def clean_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging leftovers of ``target``; call it only while holding the lock.

    Removes ``.NAME.tmp-*`` (and for a file ``.STEM.tmp-*SUFFIX``), and
    ``.NAME.old-*`` only while ``target`` exists: without it, an ``.old-*`` may be
    the one copy a crash mid-replace left (:func:`nettransplant.training.checkpoint.recover`
    moves it back). Returns the paths removed.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    markers = STAGING_MARKERS if target.exists() else STAGING_MARKERS[:1]
    prefixes = [f".{target.name}{marker}" for marker in markers]
    if target.suffix:
        prefixes.append(f".{target.stem}.tmp-")
    removed = []
    for path in target.parent.iterdir():
        if not any(path.name.startswith(p) for p in prefixes):
            continue
        if path.name.startswith(f".{target.stem}.tmp-") and not path.name.endswith(
                target.suffix):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def exclusive_output(target: str | os.PathLike) -> Iterator[Path]:
    """Hold ``target``'s lock for the block, after removing stale staging leftovers.

    Yields the absolute path of ``target``. A second writer of the same output
    gets an :class:`OutputBusyError` (one line) instead of racing this one.
    """
    target = Path(target).expanduser().absolute()
    lock = acquire(target)
    try:
        clean_staging(target)
        yield target
    finally:
        release(lock)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, flag: str) -> None:
    """A PermissionError (one line naming ``flag``) unless files can be created in ``folder``."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {folder}: cannot create files in {existing} "
                              "(permission denied)")


def check_output(target: str | os.PathLike, *, flag: str = "--out",
                 overwrite: bool | None = None,
                 replaceable: Callable[[Path], bool] | None = None, what: str = "output"
                 ) -> Path:
    """Check an output path before any work; its absolute path.

    Args:
      target: the file or folder to write.
      flag: the command-line flag that named it (errors name it).
      overwrite: False: ``target`` must not exist (the error names ``--overwrite``);
        None: an existing one is replaced without asking.
      replaceable: whether an existing ``target`` is of the kind this command
        writes (a net, a folder of overlays); anything else is never replaced.
      what: what the command writes, for the errors.
    Raises:
      FileExistsError, PermissionError, NotADirectoryError: one line naming ``flag``.
    """
    path = Path(target).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if replaceable is not None and not replaceable(path):
            raise FileExistsError(f"{flag} {path} exists and is not a {what}; refusing to "
                                  "replace it (choose another path)")
        if overwrite is False:
            raise FileExistsError(f"{flag} {path} already exists; pass --overwrite to "
                                  "replace it")
    check_writable_folder(path.parent, flag)
    return path


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the file it names and what went wrong."""
    reason = DISK_ERRORS.get(err.errno) or err.strerror or str(err)
    where = err.filename if err.filename is not None else ""
    return f"{where}: {reason}" if where else reason
