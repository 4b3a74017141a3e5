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
from nettransplant.experiments import fit_probe
from nettransplant.experiments.config import validate_config
from nettransplant.experiments.results import Results
from nettransplant.experiments.runner import concurrent_cells
from nettransplant.training.loop import Trainings
from nettransplant.transplant import problem

COUNTS = [0, 10, 20]


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    return fit_probe.build_cell(trimmed_quick_config(), tmp_path_factory.mktemp("threads"),
                                "exp1_1conv", "cat", 10)


def _run(runner, workers: int, store_dir):
    """Exp. 1's cells of ``cat`` with ``workers`` threads, an empty cell store and new
    results; returns those results."""
    runner.trainings, runner.store = Trainings(workers), cells_lib.CellStore(store_dir)
    runner.results = Results(runner.config)
    config = runner.config
    runner.run("exp1_1conv", config.adapters.exp1_1conv, "exp1", "cat", "cat.classification",
               "cat.classification", 1.0, COUNTS)
    return runner.results


def test_cells_in_threads_give_the_numbers_of_cells_run_one_after_another(
        cell, tmp_path, monkeypatch):
    runner = cell.runner
    threads = set()
    run_cells = runner._run_cells

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return run_cells(*args, **kwargs)

    serial = _run(runner, 1, tmp_path / "serial")
    monkeypatch.setattr(runner, "_run_cells", recording)
    threaded = _run(runner, 2, tmp_path / "threaded")
    assert len(threads) == 2 and all(t.startswith("training") for t in threads)
    seed = runner.seed
    assert threaded.of_seed(seed) == serial.of_seed(seed)
    assert threaded.curves(seed) == serial.curves(seed)
    # Stored in the same order under the same keys: each cell's parameters are equal.
    for method, by_n in serial.by_cell(seed, "metric")["exp1_1conv"]["cat"].items():
        for n in by_n:
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
    real = runner._run_cells

    def failing(setup, cells, beta):
        started.append((cells[0].method, cells[0].samples))
        if len(started) == 2:
            raise RuntimeError("boom in a cell")
        if len(started) > 2:  # the workers' next cells wait until the job has closed
            release.wait(timeout=30)
        return real(setup, cells, beta) if len(started) == 1 else [None]

    monkeypatch.setattr(runner, "_run_cells", failing)
    try:
        with pytest.raises(RuntimeError, match="boom in a cell"):
            _run(runner, 2, tmp_path / "store")
        threading.Timer(0.5, release.set).start()
        runner.close()  # what the job does after an error (paper.transplant_seed)
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
    assert concurrent_cells(config, one) == 3
    assert concurrent_cells(config, types.SimpleNamespace(devices=np.zeros((2, 1)))) == 1
    del config.concurrent_cells
    assert concurrent_cells(config, one) == 1


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
