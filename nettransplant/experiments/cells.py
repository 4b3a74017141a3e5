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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nettransplant import parallel
from nettransplant.files import write_atomically
from nettransplant.progress import message

CELLS_DIR = "cells"


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
        ``key`` its fingerprint. A cell whose files cannot be read is set aside
        (renamed ``*.damaged``, never deleted) with a one-line notice, and runs again.
        """
        record_path, arrays_path = self._paths(experiment, category, name, key)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            arrays = {}
            if record.get("arrays"):
                with np.load(arrays_path, allow_pickle=False) as stored:
                    arrays = {k: stored[k] for k in stored.files}
                if sorted(arrays) != sorted(record["arrays"]):
                    raise ValueError(f"{arrays_path.name} holds other arrays than recorded")
        except (OSError, ValueError, KeyError) as e:
            for path in (record_path, arrays_path):
                if path.exists():
                    os.replace(path, path.with_name(path.name + ".damaged"))
            message(f"cell {experiment} {category} {name}: unreadable ({e}); set aside, "
                    "running it again")
            return None
        return record, arrays

    def save(self, experiment: str, category: str, name: str, key: str,
             record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Write a finished cell: the arrays first, then the JSON that marks it complete.

        In a multi-process run process 0 writes (every process computed the same cell).
        """
        if not parallel.is_primary():
            return
        record_path, arrays_path = self._paths(experiment, category, name, key)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        if arrays:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_atomically(arrays_path, buffer.getvalue())
        write_atomically(record_path, json.dumps({**record, "fingerprint": key,
                                                  "arrays": sorted(arrays)}, indent=1))
