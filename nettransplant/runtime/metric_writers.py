"""Training metrics as they happen: a plain JSON-lines log always, TensorBoard when available.

A :class:`MetricWriter` takes ``write_scalars(step, {name: value})``. The
training loop (:func:`nettransplant.training.loop.train_loop`) calls it at every
logged step, so a long run can be watched live:

* :class:`JsonlWriter` appends one JSON object per line to a file
  (``{"step": 100, "loss": 0.31, "time": …}``) — readable with ``tail -f``,
  parseable with ``pandas.read_json(lines=True)``;
* :class:`TensorBoardWriter` writes event files with ``tensorboardX`` (no
  TensorFlow needed): ``tensorboard --logdir W/logs``;
* :func:`open_writer` gives both (TensorBoard only when ``tensorboardX`` is
  installed: ``pip install "nettransplant[tensorboard]"``).

Only process 0 of a multi-process run writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class JsonlWriter:
    """Appends ``{"step", "time", **scalars}`` lines to ``path`` (non-finite values → null)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: tail -f sees each line

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), "time": round(time.time(), 3),
                  **{k: _finite_or_none(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """TensorBoard event files in ``logdir`` via ``tensorboardX``."""

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard event files need tensorboardX: "
                              'pip install "nettransplant[tensorboard]"') from e
        self._writer = SummaryWriter(str(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter:
    """Forwards every call to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


class NullWriter:
    """Writes nothing (other processes of a multi-process run; tests)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


def open_writer(logdir: str | os.PathLike, name: str, *,
                tensorboard: bool | None = None) -> MetricWriter:
    """``logdir/name.jsonl`` plus TensorBoard events in ``logdir/name/`` when available.

    Args:
      logdir: the run's log folder (``W/logs``).
      name: one training (``teacher_cat``, ``exp2_cat_back-distill_10``); ``/`` nests.
      tensorboard: force TensorBoard on/off; default: on when ``tensorboardX`` imports.
    """
    import jax
    if jax.process_index() != 0:
        return NullWriter()
    root = Path(logdir)
    writers: list[MetricWriter] = [JsonlWriter(root / f"{name}.jsonl")]
    if tensorboard if tensorboard is not None else tensorboard_available():
        writers.append(TensorBoardWriter(root / name))
    return MultiWriter(writers)
