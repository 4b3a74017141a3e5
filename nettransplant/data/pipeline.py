"""Batches with a leading batch axis (shardable across devices), host-side prefetch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping

import numpy as np


def batch_indices(num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True,
                  drop_remainder: bool = False, num_epochs: int = 1) -> Iterator[np.ndarray]:
    """Row indices of each batch, in a deterministic order (epoch ``e`` uses ``(seed, e)``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for epoch in range(num_epochs):
        order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
                 else np.arange(num_examples))
        stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
        for start in range(0, stop, batch_size):
            yield order[start: start + batch_size]


def make_batch(arrays: Mapping[str, np.ndarray], rows: np.ndarray, batch_size: int
               ) -> dict[str, np.ndarray]:
    """Gather ``rows``, pad to ``batch_size`` and add a ``"valid"`` 0/1 mask."""
    batch = {k: np.asarray(v)[rows] for k, v in arrays.items()}
    pad = batch_size - len(rows)
    if pad:
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
    batch["valid"] = (np.arange(batch_size) < len(rows)).astype(np.float32)
    return batch


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                    shuffle: bool = True, drop_remainder: bool = False, num_epochs: int = 1,
                    device_count: int = 1, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches of ``arrays`` (same leading size), prefetched on a thread.

    Every batch has exactly ``batch_size`` rows (the last one padded, with
    ``"valid"`` marking real rows), and ``batch_size`` must be a multiple of
    ``device_count`` so the batch axis can be sharded.
    """
    sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading size, got {sizes}")
    if batch_size % device_count:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of the device count {device_count}")
    n = next(iter(sizes.values()))
    rows_iter = batch_indices(n, batch_size, seed=seed, shuffle=shuffle,
                              drop_remainder=drop_remainder, num_epochs=num_epochs)
    if prefetch <= 0:
        for rows in rows_iter:
            yield make_batch(arrays, rows, batch_size)
        return
    buffer: queue.Queue = queue.Queue(maxsize=prefetch)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for rows in rows_iter:
                if stop.is_set():
                    return
                buffer.put(make_batch(arrays, rows, batch_size))
        except BaseException as err:  # surfaced in the consumer
            buffer.put(err)
        buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
