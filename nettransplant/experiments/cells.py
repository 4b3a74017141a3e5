"""The main job's transplant cells: what one runs (:class:`Cell`), what it produced
(:class:`CellResult`), and where finished ones are kept so an interrupted job resumes.

A *cell* is one (experiment, category, method, sample count) run of the main
job under one seed. As each finishes, :class:`CellStore` writes it to ``W/cells/``::

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

import dataclasses
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


# Back-distillation from the baselines' random initialisation instead of the closed-form
# warm start: the same objective, so a reader sees what each part contributes.
RANDOM_INIT = "back-distill-random-init"


def zero_sample_rows(experiment: str) -> tuple[str, ...]:
    """The rows that run with 0 labelled samples: back-distill from its warm start, and
    in Exp. 1's 3-conv adapter also from random initialisation (the paper's start there)."""
    return ("back-distill", RANDOM_INIT) if experiment == "exp1_3conv" else ("back-distill",)


def objective_of(method: str) -> str:
    """The training objective of a row: the method, or back-distill for RANDOM_INIT."""
    return "back-distill" if method == RANDOM_INIT else method


def fig5_count(config) -> int:
    """The sample count of Fig. 5's cells: 20 where the config runs it."""
    positive = [n for n in config.sample_counts if n > 0]
    return 20 if 20 in positive else (positive[0] if positive else 0)


@dataclasses.dataclass(frozen=True)
class Cell:
    """What one cell runs: ``method`` on ``samples`` labelled samples of ``category`` in
    ``experiment`` under the transplant ``seed``, with an ``adapter`` of (convs, kernel).

    ``fig5``: the cell's hidden features feed Fig. 5; ``exported``: its adapter joins
    the transplant net (back-distill at its problem's largest sample count); ``key``:
    its fingerprint in the :class:`CellStore`.
    """

    experiment: str
    category: str
    method: str
    samples: int
    seed: int
    adapter: tuple[int, int]
    fig5: bool = False
    exported: bool = False
    key: str = ""

    @property
    def name(self) -> str:
        """Its name within its category in the store: ``back-distill_n10``."""
        return f"{self.method}_n{self.samples}"

    @property
    def what(self) -> str:
        """How messages and errors name it."""
        return f"{self.experiment} {self.category} {self.method} n={self.samples}"

    @property
    def log(self) -> str:
        """Its metric log's name under a seed's logdir."""
        return f"{self.experiment}/{self.category}_{self.method}_n{self.samples}"

    @property
    def objective(self) -> str:
        return objective_of(self.method)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one cell produced, run now or read back from the store.

    ``metric``: the test metric of the attempt kept; ``first_attempt_metric``: with
    the first attempt's parameters (the job without restarts); ``train_fit``: the best
    attempt's metric on its own samples (None with 0 samples); ``teacher_fit``: the
    teacher's on them; ``attempt_fits``: each attempt's train fit (None with 0 samples
    or a diverged run); ``failed``: ``{"step", "message"}`` of a diverged run;
    ``timing``: its :class:`~nettransplant.experiments.timing.CellClock`; ``params``:
    the learned adapter, flattened (:func:`flatten`; None once the job no longer needs
    it); ``features``: Fig. 5's hidden features. ``reused``: read back from the store;
    ``store_s``: the seconds writing it took.
    """

    cell: Cell
    task: str
    metric_name: str
    metric: float
    first_attempt_metric: float
    train_fit: float | None
    teacher_fit: float | None
    attempt_fits: tuple[float | None, ...] | None
    losses: tuple[float, ...]
    beta: float
    scalars: Mapping[str, float]
    warm_start_residual: float
    live_draw_fraction: float | None
    failed: Mapping[str, Any] | None
    timing: Mapping[str, float]
    params: Mapping[str, np.ndarray] | None = None
    features: np.ndarray | None = None
    reused: bool = False
    store_s: float = 0.0

    def record(self) -> dict[str, Any]:
        """The JSON record the store keeps."""
        c = self.cell
        return {"experiment": c.experiment, "category": c.category, "method": c.method,
                "samples": c.samples, "seed": c.seed, "metric": self.metric,
                "task": self.task, "metric_name": self.metric_name,
                "first_attempt_metric": self.first_attempt_metric,
                "train_fit": self.train_fit, "teacher_fit": self.teacher_fit,
                "attempt_fits": None if self.attempt_fits is None else list(self.attempt_fits),
                "losses": list(self.losses), "beta": self.beta, "scalars": dict(self.scalars),
                "warm_start_residual": self.warm_start_residual,
                "live_draw_fraction": self.live_draw_fraction,
                "failed": None if self.failed is None else dict(self.failed),
                "timing": dict(self.timing)}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the store keeps: ``params/<path>`` and, for Fig. 5, ``fig5``."""
        arrays = {f"params/{k}": v for k, v in (self.params or {}).items()}
        if self.features is not None:
            arrays["fig5"] = self.features
        return arrays

    @classmethod
    def from_stored(cls, cell: Cell, record: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> CellResult:
        """The result of ``cell`` as :meth:`CellStore.load` read it back."""
        fits = record.get("attempt_fits")
        return cls(cell, record["task"], record["metric_name"], record["metric"],
                   record["first_attempt_metric"], record["train_fit"],
                   record.get("teacher_fit"), None if fits is None else tuple(fits),
                   tuple(record["losses"]), record["beta"], record["scalars"],
                   record["warm_start_residual"], record["live_draw_fraction"],
                   record["failed"], record.get("timing", {}),
                   {k.split("/", 1)[1]: v for k, v in arrays.items()
                    if k.startswith("params/")},
                   arrays.get("fig5"), reused=True)


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

    def load_result(self, cell: Cell) -> CellResult | None:
        """:meth:`load` of ``cell`` as a :class:`CellResult` (None: not finished)."""
        stored = self.load(cell.experiment, cell.category, cell.name, cell.key)
        return None if stored is None else CellResult.from_stored(cell, *stored)

    def save_result(self, result: CellResult) -> None:
        """:meth:`save` of a cell's result under its name and fingerprint."""
        c = result.cell
        self.save(c.experiment, c.category, c.name, c.key, result.record(), result.arrays())

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
