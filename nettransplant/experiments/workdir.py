"""The main job's workdir: one run at a time, writable before any work, files replaced whole.

* :class:`WorkdirLock` — an exclusive ``fcntl.flock`` on ``W/.lock`` holding the
  PID of its owner. A second run on the same workdir refuses at once, naming
  the lock file and the PID; the kernel drops the lock when its process dies,
  so the lock of a killed run never blocks the next one.
* :func:`check_writable` — fails before any teacher is trained when the
  workdir (or a folder the job writes in it) cannot take a new file.
* :func:`~nettransplant.runtime.files.write_atomically` /
  :func:`~nettransplant.runtime.files.atomic_path`
  (re-exported) — files replaced whole, so a full disk or a kill leaves the
  previous version intact.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from nettransplant.runtime.files import atomic_path, write_atomically  # noqa: F401 - re-exported

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


COMPILATION_CACHE = "jax_cache"


def use_compilation_cache(workdir: str | os.PathLike) -> Path | None:
    """Keep XLA's compiled programs in ``workdir/jax_cache`` (JAX's persistent compilation
    cache), so a resumed or repeated run loads them instead of compiling again.

    Every program is kept, however quickly it compiled: the job's are many and small.
    A cache the user set (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
    Returns the cache folder in use (None: none could be made).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if current and current != _cache_set_here[0]:
        return Path(current)
    directory = Path(workdir) / COMPILATION_CACHE
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a cache is an optimisation: without one the job only compiles more
    if str(directory) != current:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()  # a process that compiled before decided without one
        _cache_set_here[0] = str(directory)
    return directory


_cache_set_here: list[str | None] = [None]  # the folder use_compilation_cache chose last
