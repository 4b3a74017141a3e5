"""config.concurrent_cells: the cells of one problem train in threads, with the numbers
they get one after another.

Checked against the same cells run serially (every number, curve and fit equal),
on a failing cell (its error reaches the job, the cells not started are not run),
and on where threads are not used (several devices or processes).
"""

from __future__ import annotations

import threading
import types

import numpy as np
import optax
import pytest
from job_configs import trimmed_quick_config

from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments import fit_probe, paper
from nettransplant.experiments.config import validate_config
from nettransplant.training.loop import Trainings
from nettransplant.transplant import problem

COUNTS = [0, 10, 20]


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    return fit_probe.build_cell(trimmed_quick_config(), tmp_path_factory.mktemp("threads"),
                                "exp1_1conv", "cat", 10)


def _run(runner, workers: int, store_dir, curve_key: str):
    """Exp. 1's cells of ``cat`` with ``workers`` threads and an empty cell store."""
    runner.trainings, runner.store = Trainings(workers), cells_lib.CellStore(store_dir)
    config = runner.config
    out, live = runner.run("exp1_1conv", config.adapters.exp1_1conv, "exp1", "cat",
                           "cat.classification", "cat.classification", 1.0, COUNTS, curve_key)
    return out, live


def test_cells_in_threads_give_the_numbers_of_cells_run_one_after_another(
        cell, tmp_path, monkeypatch):
    runner = cell.runner
    threads = set()
    run_cell = runner._run_cell

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return run_cell(*args, **kwargs)

    serial = _run(runner, 1, tmp_path / "serial", "serial")
    serial_fit = runner.train_fit["exp1_1conv"]["cat"]
    runner.train_fit = {}
    monkeypatch.setattr(runner, "_run_cell", recording)
    threaded = _run(runner, 2, tmp_path / "threaded", "threaded")
    assert len(threads) == 2 and all(t.startswith("training") for t in threads)
    assert threaded == serial
    assert runner.train_fit["exp1_1conv"]["cat"] == serial_fit
    assert runner.curves["threaded"] == runner.curves["serial"]
    # Stored in the same order under the same keys: each cell's parameters are equal.
    for method in serial[0]:
        for n in serial[0][method]:
            name, found = f"{method}_n{n}", {}
            for kind in ("serial", "threaded"):
                (path,) = (tmp_path / kind).rglob(f"{name}*.npz")
                with np.load(path) as arrays:
                    found[kind] = dict(arrays)
            assert found["serial"].keys() == found["threaded"].keys()
            for key, value in found["serial"].items():
                np.testing.assert_array_equal(value, found["threaded"][key], err_msg=name)


def test_a_failing_cell_reaches_the_job_and_closing_cancels_the_cells_not_started(
        cell, tmp_path, monkeypatch):
    runner = cell.runner
    started, release = [], threading.Event()

    def failing(built, experiment, target, method, n, fig5, beta):
        started.append((method, n))
        if len(started) == 2:
            raise RuntimeError("boom in a cell")
        if len(started) > 2:  # the workers' next cells wait until the job has closed
            release.wait(timeout=30)
        return {"live_draw_fraction": 1.0}, {}

    monkeypatch.setattr(runner, "_run_cell", failing)
    monkeypatch.setattr(runner, "_absorb", lambda *args: None)
    try:
        with pytest.raises(RuntimeError, match="boom in a cell"):
            _run(runner, 2, tmp_path / "store", "failing")
        threading.Timer(0.5, release.set).start()
        runner.close()  # what the job does after an error (paper._run_locked)
    finally:
        release.set()
    # Of the 11 cells, the first was stored, the second failed, and only the two the
    # workers had taken since then ran; the rest were cancelled.
    assert len(started) == 4
    assert len(list((tmp_path / "store").rglob("*.json"))) == 1


def test_threads_are_used_on_one_device_of_one_process_only():
    config = trimmed_quick_config()
    config.concurrent_cells = 3
    one = types.SimpleNamespace(devices=np.zeros(1))
    assert paper.concurrent_cells(config, one) == 3
    assert paper.concurrent_cells(config, types.SimpleNamespace(devices=np.zeros((2, 1)))) == 1
    del config.concurrent_cells
    assert paper.concurrent_cells(config, one) == 1


@pytest.mark.parametrize("value", [0, 65])
def test_a_bad_thread_count_is_refused_by_name(value):
    config = trimmed_quick_config()
    config.concurrent_cells = value
    with pytest.raises(ValueError, match=r"config\.concurrent_cells"):
        validate_config(config)


def test_one_worker_runs_each_training_in_the_callers_thread_when_asked():
    ran = []
    with Trainings(1) as trainings:
        result = trainings.submit(lambda: ran.append(threading.current_thread()) or 7)
        assert ran == []
        assert result() == 7 and ran == [threading.current_thread()]
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        Trainings(0)


def test_threads_share_one_step_per_transplant_and_method(cell):
    steps = problem.StepCache(optax.adam(1e-2), mesh=cell.runner.mesh)
    got, barrier = [], threading.Barrier(8)

    def take():
        barrier.wait()
        got.append(steps(cell.problem.transplant, "direct-learn"))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(step is got[0] for step in got)
