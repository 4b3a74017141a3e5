"""Numpy batches with a leading batch axis (shardable across devices), host-side prefetch.

Every batch is a dict of arrays with exactly ``batch_size`` rows plus a
``"valid"`` float32 ``(batch_size,)`` mask: 1 for real rows, 0 for the zero
padding of a final partial batch (all ones with ``drop_remainder``). Since
``batch_size`` is a multiple of the device count, the batch axis can be split
across devices as is (``jax.device_put`` with a ``NamedSharding`` over a
``("batch",)`` mesh). The row order is a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer left


def batch_indices(num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True,
                  drop_remainder: bool = False, num_epochs: int | None = 1
                  ) -> Iterator[np.ndarray]:
    """Row indices of each batch; epoch ``e`` is ordered by ``default_rng([seed, e])``.

    Args:
      num_examples: rows to draw from.
      batch_size: rows per batch (the last one may be shorter unless
        ``drop_remainder``).
      seed: order seed.
      shuffle: permute each epoch (else ``0..N-1``).
      drop_remainder: skip each epoch's final partial batch.
      num_epochs: passes over the data; None repeats forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 0:
        raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
    epochs = itertools.count() if num_epochs is None else range(num_epochs)
    for epoch in epochs:
        order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
                 else np.arange(num_examples))
        stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
        for start in range(0, stop, batch_size):
            yield order[start: start + batch_size]


def make_batch(arrays: Mapping[str, np.ndarray], rows: np.ndarray, batch_size: int
               ) -> dict[str, np.ndarray]:
    """Gathers ``rows``, zero-pads to ``batch_size`` rows and adds the ``"valid"`` mask."""
    batch = {k: np.asarray(v)[rows] for k, v in arrays.items()}
    pad = batch_size - len(rows)
    if pad:
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
    batch["valid"] = (np.arange(batch_size) < len(rows)).astype(np.float32)
    return batch


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                    shuffle: bool = True, drop_remainder: bool = False,
                    num_epochs: int | None = 1, device_count: int = 1, prefetch: int = 2,
                    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                    | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches of ``arrays``, prepared on a background thread.

    Args:
      arrays: name → array, all with the same leading size N (e.g.
        ``{"images": view.images, "labels": view.labels}``).
      batch_size: rows per batch; a multiple of ``device_count``.
      seed, shuffle, drop_remainder, num_epochs: see :func:`batch_indices`.
      device_count: devices the batch axis will be split over
        (``jax.device_count()``).
      prefetch: batches prepared ahead on a host thread (0: no thread).
      transform: applied to each batch on that thread (e.g. normalising
        images), after padding.

    Yields:
      ``{name: (batch_size, ...) array, "valid": (batch_size,) float32}``.
    """
    sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
    if not sizes:
        raise ValueError("arrays is empty")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading size, got {sizes}")
    if "valid" in arrays:
        raise ValueError("'valid' is reserved for the padding mask")
    if device_count < 1 or batch_size % device_count:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of the device count {device_count}")
    n = next(iter(sizes.values()))
    rows_iter = batch_indices(n, batch_size, seed=seed, shuffle=shuffle,
                              drop_remainder=drop_remainder, num_epochs=num_epochs)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for rows in rows_iter:
            batch = make_batch(arrays, rows, batch_size)
            yield transform(batch) if transform else batch

    if prefetch <= 0:
        yield from batches()
        return
    yield from _prefetch(batches(), prefetch)


def _prefetch(items: Iterator, size: int) -> Iterator:
    """Runs ``items`` on a daemon thread, ``size`` ahead; errors surface in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # re-raised in the consumer
            put(err)
            return
        put(done)

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a consumer that leaves early releases the producer
        thread.join(timeout=1.0)
