"""Batches: fixed size with a validity mask, shardable, deterministic, prefetched on a thread."""

import threading
import time

import numpy as np
import pytest

from nettransplant.data import pipeline


def _arrays(n=10):
    return {"x": np.arange(n)[:, None].astype(np.float32), "y": np.arange(n)}


def test_order_is_deterministic_for_a_seed_and_prefetch_does_not_change_it():
    plain = list(pipeline.iterate_batches(_arrays(), 4, seed=1, prefetch=0))
    prefetched = list(pipeline.iterate_batches(_arrays(), 4, seed=1, prefetch=2))
    assert len(plain) == 3
    for a, b in zip(plain, prefetched, strict=True):
        assert a.keys() == b.keys() == {"x", "y", "valid"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = list(pipeline.iterate_batches(_arrays(), 4, seed=2, prefetch=0))
    assert not np.array_equal(plain[0]["y"], other[0]["y"])


def test_last_batch_is_padded_with_a_validity_mask_or_dropped():
    batches = list(pipeline.iterate_batches(_arrays(), 4, seed=1, prefetch=0))
    assert all(b["x"].shape == (4, 1) for b in batches)
    assert batches[-1]["valid"].tolist() == [1, 1, 0, 0]
    assert batches[-1]["x"][2:].tolist() == [[0.0], [0.0]]
    seen = np.concatenate([b["y"][b["valid"] == 1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    dropped = list(pipeline.iterate_batches(_arrays(), 4, seed=1, drop_remainder=True))
    assert len(dropped) == 2 and all(b["valid"].all() for b in dropped)


def test_batch_size_must_split_over_devices_and_arrays_must_agree():
    batches = list(pipeline.iterate_batches(_arrays(12), 6, device_count=3, prefetch=0))
    assert [b["y"].shape for b in batches] == [(6,), (6,)]
    with pytest.raises(ValueError, match="multiple of the device count 3"):
        next(pipeline.iterate_batches(_arrays(), 4, device_count=3))
    with pytest.raises(ValueError, match="leading size"):
        next(pipeline.iterate_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))
    with pytest.raises(ValueError, match="reserved"):
        next(pipeline.iterate_batches({"valid": np.zeros(3)}, 2))


def test_epochs_reshuffle_and_none_repeats_forever():
    two = list(pipeline.iterate_batches(_arrays(), 5, seed=0, num_epochs=2, prefetch=0))
    assert len(two) == 4
    first = np.concatenate([b["y"] for b in two[:2]])
    second = np.concatenate([b["y"] for b in two[2:]])
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)
    forever = pipeline.iterate_batches(_arrays(), 5, num_epochs=None)
    assert len([next(forever) for _ in range(9)]) == 9
    forever.close()


def test_transform_runs_on_the_prefetch_thread_and_errors_reach_the_consumer():
    threads = set()

    def scale(batch):
        threads.add(threading.current_thread().name)
        return {**batch, "x": batch["x"] * 2}

    batches = list(pipeline.iterate_batches(_arrays(), 5, shuffle=False, transform=scale))
    assert batches[0]["x"][:, 0].tolist() == [0, 2, 4, 6, 8]
    assert threads == {"batch-prefetch"}

    def fail(batch):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        list(pipeline.iterate_batches(_arrays(), 5, transform=fail))


def test_a_consumer_that_stops_early_releases_the_producer_thread():
    before = threading.active_count()
    batches = pipeline.iterate_batches(_arrays(1000), 1, num_epochs=None, prefetch=2)
    next(batches)
    batches.close()
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_batches_shard_over_the_devices_along_the_batch_axis():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))
    batch_size = 2 * len(devices)
    for batch in pipeline.iterate_batches(_arrays(), batch_size, device_count=len(devices)):
        on_devices = jax.device_put(batch, sharding)
        assert on_devices["x"].shape == (batch_size, 1)
        assert on_devices["x"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(on_devices["y"]), batch["y"])
