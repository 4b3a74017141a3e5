"""The main job's workdir: one run at a time, writable before any work, files replaced whole.

* :class:`WorkdirLock` — an exclusive ``fcntl.flock`` on ``W/.lock`` holding the
  PID of its owner. A second run on the same workdir refuses at once, naming
  the lock file and the PID; the kernel drops the lock when its process dies,
  so the lock of a killed run never blocks the next one.
* :func:`check_writable` — fails before any teacher is trained when the
  workdir (or a folder the job writes in it) cannot take a new file.
* :func:`write_atomically` / :func:`atomic_path` — a file is written under a
  temporary name beside it and renamed over the old one only once complete, so
  a full disk or a kill leaves the previous version intact, never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on ``workdir/.lock``; use as a context manager.

    Args:
      workdir: the run's folder (must exist).
    Raises (on enter):
      WorkdirLockedError: another process holds the lock (the message names the
        lock file and that process's PID).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirLockedError(
                f"{self.path} is held by process {holder}: another run is using this workdir; "
                "wait for it to finish or choose another --workdir") from None
        # The PID is for the message above only; the flock itself is the lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_writable(*folders: str | os.PathLike) -> None:
    """Create and remove a probe file in each existing folder of ``folders``.

    Raises:
      PermissionError: a folder refuses new files (named, with the reason).
    """
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as e:
            raise PermissionError(f"cannot write in {folder}: {e.strerror or e}; the run "
                                  "needs a writable workdir (see --workdir)") from None


def _temporary_sibling(path: Path) -> Path:
    # The same suffix keeps writers that choose a format by extension (matplotlib) working.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` on success.

    On an error inside the block the temporary file is removed and ``path``
    keeps its previous content.
    """
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        yield temporary
        with open(temporary, "rb+") as f:  # on disk before it replaces the old file
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace ``path`` with ``content`` (text is UTF-8) in one rename."""
    data = content.encode() if isinstance(content, str) else content
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
