"""Files replaced whole: written under a temporary name beside them, renamed when complete.

A full disk, a crash or a kill leaves the previous version of the file intact,
never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
