"""Finished cells on disk: a good cell reads back bit-exactly; a damaged one is set aside.

Each kind of damage (flipped bytes or a cut in the ``.npz``, an edited metric or
a deleted checksum in the JSON, invalid JSON, a cell of the older format) makes
``CellStore.load`` rename both files ``*.damaged`` (never delete them), print
one notice line and return None, so the cell runs again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nettransplant.experiments.cells import CHECKSUM, CellStore

EXPERIMENT, CATEGORY, NAME, KEY = "exp1_1conv", "sheep", "back-distill_n10", "0123456789abcdef"


def _cell():
    record = {"metric": 12.5, "fit": {"train": 100.0, "samples": 10}, "curve": [3.0, 1.5, 0.25],
              "residual": 0.1 + 0.2, "failed": None, "diverged_at": math.nan,
              "by_count": {1: 0.5, 10: 0.75}, "betas": (1.0, 2.0)}
    rng = np.random.default_rng(0)
    arrays = {"params/conv/kernel": rng.normal(size=(1, 1, 8, 8)).astype(np.float32),
              "params/conv/bias": np.arange(8, dtype=np.float32),
              "fig5": rng.normal(size=(5, 3)).astype(np.float64),
              "steps": np.array([1, 2, 3], np.int32)}
    return record, arrays


@pytest.fixture
def stored(tmp_path):
    store = CellStore(tmp_path)
    record, arrays = _cell()
    store.save(EXPERIMENT, CATEGORY, NAME, KEY, record, arrays)
    folder = tmp_path / "cells" / EXPERIMENT / CATEGORY
    return store, folder / f"{NAME}_{KEY}.json", folder / f"{NAME}_{KEY}.npz"


def test_a_good_cell_round_trips_bit_exactly(stored):
    store, json_path, _ = stored
    record, arrays = _cell()
    loaded = store.load(EXPERIMENT, CATEGORY, NAME, KEY)
    assert loaded is not None
    got_record, got_arrays = loaded
    assert got_record["metric"] == record["metric"] and got_record["curve"] == record["curve"]
    assert got_record["residual"] == record["residual"] and math.isnan(got_record["diverged_at"])
    assert got_record["by_count"] == {"1": 0.5, "10": 0.75} and got_record["betas"] == [1.0, 2.0]
    assert isinstance(got_record[CHECKSUM], str) and len(got_record[CHECKSUM]) == 64
    assert sorted(got_arrays) == sorted(arrays)
    for name, value in arrays.items():
        assert got_arrays[name].dtype == value.dtype and got_arrays[name].shape == value.shape
        assert got_arrays[name].tobytes() == value.tobytes()
    # Loading again reads the same files: nothing was set aside.
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is not None
    assert not list(json_path.parent.glob("*.damaged*"))


def test_a_cell_without_arrays_round_trips(tmp_path):
    store = CellStore(tmp_path)
    store.save("exp2_head_swap", "cow", "head_swap", KEY, {"head_swap": {"cos": 0.5}}, {})
    record, arrays = store.load("exp2_head_swap", "cow", "head_swap", KEY)
    assert record["head_swap"] == {"cos": 0.5} and arrays == {}


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(200, 216):  # inside the first array's bytes (the kernel's, 256 of them)
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_metric(path: Path) -> None:
    record = json.loads(path.read_text())
    record["metric"] = 99.0
    path.write_text(json.dumps(record, indent=1))


def _delete_checksum(path: Path) -> None:
    record = json.loads(path.read_text())
    del record[CHECKSUM]
    path.write_text(json.dumps(record, indent=1))


def _invalid_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


def _edit_array(path: Path) -> None:  # a valid zip whose arrays differ from what was written
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["steps"] = arrays["steps"] + 1
    np.savez(path, **arrays)


DAMAGE = {"npz flipped bytes": ("npz", _flip_bytes), "npz truncated": ("npz", _truncate),
          "npz arrays edited": ("npz", _edit_array),
          "json metric edited": ("json", _edit_metric),
          "json checksum deleted": ("json", _delete_checksum),
          "json invalid": ("json", _invalid_json)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cell_is_set_aside_and_runs_again(stored, damage, capsys):
    store, json_path, npz_path = stored
    which, damage_fn = DAMAGE[damage]
    damage_fn(json_path if which == "json" else npz_path)
    damaged = {p: p.read_bytes() for p in (json_path, npz_path)}
    capsys.readouterr()
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is None
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if line.strip()]
    assert len(notice) == 1 and "set aside, running it again" in notice[0], err
    assert "Traceback" not in err
    for path, content in damaged.items():
        assert not path.exists()
        aside = path.with_name(path.name + ".damaged")
        assert aside.read_bytes() == content  # moved, never deleted or changed
    # The cell is missing now: it runs again, and a new save reads back.
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is None
    store.save(EXPERIMENT, CATEGORY, NAME, KEY, *_cell())
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is not None


def test_a_second_damage_takes_a_free_name(stored, capsys):
    store, json_path, npz_path = stored
    first = json_path.read_bytes()
    _edit_metric(json_path)
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is None
    store.save(EXPERIMENT, CATEGORY, NAME, KEY, *_cell())
    _flip_bytes(npz_path)
    second_npz = npz_path.read_bytes()
    assert store.load(EXPERIMENT, CATEGORY, NAME, KEY) is None
    assert json.loads(json_path.with_name(json_path.name + ".damaged").read_text())["metric"] \
        == 99.0 != json.loads(first)["metric"]
    assert npz_path.with_name(npz_path.name + ".damaged.1").read_bytes() == second_npz
    assert json_path.with_name(json_path.name + ".damaged.1").exists()


def test_a_cell_of_the_older_format_is_recomputed(tmp_path, capsys):
    """A cell written without a checksum (the older format) is set aside, not trusted."""
    folder = tmp_path / "cells" / EXPERIMENT / CATEGORY
    folder.mkdir(parents=True)
    record, arrays = _cell()
    np.savez(folder / f"{NAME}_{KEY}.npz", **arrays)
    (folder / f"{NAME}_{KEY}.json").write_text(json.dumps(
        {**record, "fingerprint": KEY, "arrays": sorted(arrays)}))
    assert CellStore(tmp_path).load(EXPERIMENT, CATEGORY, NAME, KEY) is None
    assert "no checksum" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [f"{NAME}_{KEY}.json.damaged",
                                                       f"{NAME}_{KEY}.npz.damaged"]
