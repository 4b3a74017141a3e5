"""Finished transplant cells on disk, so an interrupted main job resumes where it stopped.

A *cell* is one (experiment, category, method, sample count) run of the main
job. As each finishes, :class:`CellStore` writes it to ``W/cells/``::

    W/cells/<experiment>/<category>/<method>_n<samples>_<fingerprint>.json
    W/cells/<experiment>/<category>/<method>_n<samples>_<fingerprint>.npz

The JSON holds every number the results derive from the cell (test metric,
fit on its own samples, loss curve, the problem's warm-start residual, live
draw fraction, β and scalars, and, for a run that diverged, the step and
message); the ``.npz`` holds arrays: the learned adapter parameters
(``params/<path>``, what the exported transplant net needs) and, where the
cell feeds Fig. 5, the student's hidden features (``fig5``). The ``.npz`` is
written first and the JSON last, each by one rename, so a JSON on disk means a
complete cell.

The JSON also holds a ``checksum``: SHA-256 over the record (every field but the
checksum, as sorted JSON) and each array's name, dtype, shape and bytes, in
name order. A cell whose files fail to load (a damaged zip, invalid JSON,
other arrays than recorded) or whose checksum is missing or does not match (an
edited metric, flipped bytes) is damaged: both files are set aside (renamed
``*.damaged``, or ``*.damaged.1``, … when that name is taken; never deleted)
with a one-line notice, and the cell runs again. A cell stored without a
checksum (by an older version) is treated the same way: set aside and
recomputed.

The fingerprint covers everything that changes the cell's numbers: the seed,
data, model and transplant settings, the adapter, the protocol, the modules
involved and their teachers' parameter hashes. A cell of another configuration
is never overwritten or deleted: it lives beside, under its own fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nettransplant.runtime import parallel
from nettransplant.runtime.cli import one_line
from nettransplant.runtime.files import write_atomically
from nettransplant.runtime.progress import message

CELLS_DIR = "cells"
CHECKSUM = "checksum"

# What reading a damaged cell raises: unreadable files, invalid JSON or zip, a
# record of the wrong shape, a truncated array.
_DAMAGE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile,
           zlib.error)


def fingerprint(spec: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``spec`` as sorted JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` → ``{"a/b": x}`` (nested dicts of arrays)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def checksum(record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a cell: ``record`` without its ``checksum`` field, as sorted JSON,
    then each array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    body = {k: v for k, v in record.items() if k != CHECKSUM}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(b"\0" + json.dumps([name, array.dtype.str, list(array.shape)]).encode()
                      + b"\0")
        digest.update(array.tobytes())
    return digest.hexdigest()


def _set_aside(path: Path) -> None:
    """Rename ``path`` to ``<name>.damaged`` (``.damaged.1``, … if taken); never deletes."""
    target = path.with_name(path.name + ".damaged")
    i = 0
    while target.exists():
        i += 1
        target = path.with_name(f"{path.name}.damaged.{i}")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process set it aside first
        pass


def _read(record_path: Path, arrays_path: Path
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A cell's record and arrays, checked against its checksum (ValueError if damaged)."""
    record = json.loads(record_path.read_text())
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    expected = record.get(CHECKSUM)
    if not isinstance(expected, str):
        raise ValueError("no checksum (stored by an older version)")
    names = record.get("arrays") or []
    if not isinstance(names, list):
        raise ValueError("its list of arrays is not a list")
    arrays: dict[str, np.ndarray] = {}
    if names:
        with np.load(arrays_path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
        if sorted(arrays) != sorted(names):
            raise ValueError(f"{arrays_path.name} holds other arrays than recorded")
    if checksum(record, arrays) != expected:
        raise ValueError("checksum mismatch: the record or its arrays changed after they "
                         "were written")
    return record, arrays


class CellStore:
    """Reads and writes finished cells under ``workdir/cells``.

    Args:
      workdir: the main job's folder.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.root = Path(workdir) / CELLS_DIR

    def _paths(self, experiment: str, category: str, name: str, key: str) -> tuple[Path, Path]:
        stem = self.root / experiment / category / f"{name}_{key}"
        return stem.with_suffix(".json"), stem.with_suffix(".npz")

    def load(self, experiment: str, category: str, name: str, key: str
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``(record, arrays)`` of a finished cell, or None if it has not finished.

        ``name`` is the cell's name within its category (``back-distill_n10``),
        ``key`` its fingerprint. A damaged cell (files that do not load, a missing or
        mismatched checksum) is set aside (renamed ``*.damaged``, never deleted) with a
        one-line notice, and runs again: None.
        """
        record_path, arrays_path = self._paths(experiment, category, name, key)
        if not record_path.is_file():
            return None
        try:
            return _read(record_path, arrays_path)
        except _DAMAGE as e:
            for path in (record_path, arrays_path):
                if path.exists():
                    _set_aside(path)
            message(one_line(f"cell {experiment} {category} {name}: unreadable ({e}); set "
                             "aside, running it again"))
            return None

    def save(self, experiment: str, category: str, name: str, key: str,
             record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Write a finished cell: the arrays first, then the JSON that marks it complete.

        The JSON's ``checksum`` covers the record and the arrays as they will be read
        back. In a multi-process run process 0 writes (every process computed the same
        cell).
        """
        if not parallel.is_primary():
            return
        record_path, arrays_path = self._paths(experiment, category, name, key)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        stored: dict[str, np.ndarray] = {}
        if arrays:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            content = buffer.getvalue()
            with np.load(io.BytesIO(content), allow_pickle=False) as read_back:
                stored = {k: read_back[k] for k in read_back.files}
            write_atomically(arrays_path, content)
        # The record as it reads back (tuples become lists, keys strings).
        full = json.loads(json.dumps({**record, "fingerprint": key, "arrays": sorted(arrays)}))
        full.pop(CHECKSUM, None)
        full[CHECKSUM] = checksum(full, stored)
        write_atomically(record_path, json.dumps(full, indent=1))
