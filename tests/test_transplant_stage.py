"""The transplant stage's schedule: one compiled step per experiment × method, batches of
real rows, runs that end once they fit, and a runs axis that gives the numbers of runs
trained one at a time.

Every check is against an independent computation: the batched runs against the same
runs one after another (:func:`nettransplant.transplant.step.train_adapter`), an early end against
the same run stopped by hand at that step, trace counts against the shapes a problem's
runs need.
"""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import pytest
from job_configs import trimmed_quick_config

import nettransplant.transplant.step
from nettransplant.experiments import fit_probe
from nettransplant.experiments.cell_training import ProblemSetup, batched_runs
from nettransplant.experiments.cells import Cell
from nettransplant.experiments.config import validate_config
from nettransplant.training.loop import NonFiniteError, create_train_state
from nettransplant.transplant import problem, runs
from nettransplant.transplant.step import objective_loss, train_adapter

# The one-at-a-time and the batched runs sum their floats in other orders.
RTOL, ATOL = 1e-4, 1e-5
COUNTS = (10, 20, 50)  # below, at and above the batch size of 16


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """Exp. 3 (segmentation: all four objectives) of the trimmed quick config."""
    config = trimmed_quick_config()
    config.transplant.num_steps = 6
    return fit_probe.build_cell(config, tmp_path_factory.mktemp("stage"), "exp3", "cat", 10)


@pytest.fixture(scope="module")
def labelled(cell):
    return {n: cell.runner.labelled(cell.problem, "exp3", "cat", n) for n in COUNTS}


def _init(cell, method):
    return cell.warm_start if method == "back-distill" else cell.problem.adapter_init


def _one_at_a_time(cell, method, data, n, *, rate=None, scalars=None, stop_when=None,
                   check_every=0, num_steps=6):
    tc, prob = cell.config.transplant, cell.problem
    steps = cell.runner.trainer.steps("segmentation")
    state = create_train_state(_init(cell, method), steps.optimizer)
    if rate is not None:
        state = problem.with_learning_rate(state, rate)
    try:
        state, history = train_adapter(
            steps(prob.transplant, method), state, prob.frozen, scalars or prob.scalars,
            num_steps=num_steps, data=data, num_samples=n, batch_size=tc.batch_size,
            draws=prob.cache if method == "back-distill" else None,
            draws_per_step=tc.draws_per_step, seed=cell.config.seed + n, progress=False,
            log_every=tc.log_every, mesh=cell.runner.mesh, stop_when=stop_when,
            check_every=check_every)
        return state, history, None
    except NonFiniteError as e:
        return e.state, [], e


def _run(cell, method, data, n, *, rate=None, scalars=None, stop_when=None, num_steps=6):
    steps = cell.runner.trainer.steps("segmentation")
    state = create_train_state(_init(cell, method), steps.optimizer)
    if rate is not None:
        state = problem.with_learning_rate(state, rate)
    return runs.Run(state, scalars or cell.problem.scalars, data, n, cell.config.seed + n,
                    num_steps, stop_when)


def _stop_after(calls: int):
    """A ``stop_when`` that holds at its ``calls``-th check (whatever the params)."""
    seen = [0]

    def stop(_params):
        seen[0] += 1
        return seen[0] >= calls
    return stop


def _count_traces(monkeypatch, module, *, n: int) -> list:
    """Every loss ``module`` makes from here on, wrapped in ``chex.assert_max_traces(n)``;
    returns the list they are added to."""
    made = []
    loss = objective_loss
    chex.clear_trace_counter()

    def counted(*args, **kwargs):
        made.append(chex.assert_max_traces(loss(*args, **kwargs), n=n))
        return made[-1]

    monkeypatch.setattr(module, "objective_loss", counted)
    return made


@pytest.mark.parametrize("method", problem.SEGMENTATION_METHODS)
def test_batched_runs_equal_the_same_runs_one_at_a_time(cell, labelled, method):
    """Every objective; runs of 10 (fewer than a batch: padded, masked rows), 20 and 50
    samples, one ending early at its first check and one diverging (a NaN rate)."""
    tc, prob = cell.config.transplant, cell.problem
    check_every = 2
    plans = [dict(n=10), dict(n=20, stop=1), dict(n=50), dict(n=20, rate=float("nan"))]
    alone, batch = [], []
    for plan in plans:
        n = plan["n"]
        stop = functools.partial(_stop_after, plan["stop"]) if "stop" in plan else None
        alone.append(_one_at_a_time(cell, method, labelled[n], n, rate=plan.get("rate"),
                                    stop_when=stop() if stop else None,
                                    check_every=check_every))
        batch.append(_run(cell, method, labelled[n], n, rate=plan.get("rate"),
                          stop_when=stop() if stop else None))
    step = cell.runner.trainer.steps("segmentation").runs(prob.transplant, method)
    results = runs.train_runs(step, batch, prob.frozen, batch_size=tc.batch_size,
                              draws=prob.cache if method == "back-distill" else None,
                              draws_per_step=tc.draws_per_step, log_every=tc.log_every,
                              check_every=check_every)
    for plan, (state, history, error), result in zip(plans, alone, results, strict=True):
        if "rate" in plan:  # diverged: the same first bad step, the same last good state
            assert error is not None and result.error is not None, plan
            assert result.error.step == error.step
        else:
            assert error is None and result.error is None, plan
        chex.assert_trees_all_close(result.state.params, state.params, rtol=RTOL, atol=ATOL)
        assert int(result.state.step) == int(state.step)
        if error is not None:
            continue  # train_adapter raises: its history stays with the error
        assert [h["step"] for h in result.history] == [h["step"] for h in history]
        np.testing.assert_allclose([h["loss"] for h in result.history],
                                   [h["loss"] for h in history], rtol=RTOL, atol=ATOL)
    assert results[1].steps == check_every  # ended at its first check
    assert results[0].steps == 6


def test_an_early_end_is_the_run_stopped_by_hand_at_that_step(cell, labelled):
    """The fit criterion ends a run; the same run trained for exactly those steps ends
    with the same parameters and the same logged curve."""
    n, every = 20, 2
    prob = cell.problem
    fits = cell.runner.trainer.fitted(prob, labelled[n], n, reference=0.0)  # any accuracy fits
    state, history, error = _one_at_a_time(cell, "direct-learn", labelled[n], n,
                                           stop_when=fits, check_every=every, num_steps=50)
    assert error is None and int(state.step) == every  # it fits at the first check
    by_hand, by_hand_history, _ = _one_at_a_time(cell, "direct-learn", labelled[n], n,
                                                 num_steps=every)
    chex.assert_trees_all_equal(state.params, by_hand.params)
    assert history == by_hand_history


def test_one_compiled_step_per_method_for_every_count_rate_and_restart(cell, labelled,
                                                                       monkeypatch):
    """A problem's runs of one method, at every sample count, at other rates (restarts)
    and with other λ, trace the step once per batch shape: 10 rows and 16 rows.

    (chex counts the traces of every loss made at one place together: two methods, two
    shapes each.)"""
    made = _count_traces(monkeypatch, nettransplant.transplant.step, n=4)
    runner = cell.runner
    runner.trainer._steps.clear()  # steps made from here on are counted
    prob = cell.problem
    weaker = prob.scalars.replace(lam=prob.scalars.lam * 0.1)
    for method in ("back-distill", "jacobian"):
        for n in COUNTS:
            for rate, scalars in ((None, None), (1e-3, weaker)):
                _, _, error = _one_at_a_time(cell, method, labelled[n], n, rate=rate,
                                             scalars=scalars, num_steps=2)
                assert error is None
    assert len(made) == 2  # one step per method, each traced at most twice
    chex.clear_trace_counter()


def test_the_batched_path_traces_one_step_per_method(cell, labelled, monkeypatch):
    made = _count_traces(monkeypatch, runs, n=1)
    cell.runner.trainer._steps.clear()
    prob, tc = cell.problem, cell.config.transplant
    step = cell.runner.trainer.steps("segmentation").runs(prob.transplant, "direct-learn")
    for rate in (None, 1e-3):  # a round of restarts at another rate: the same step
        runs.train_runs(step, [_run(cell, "direct-learn", labelled[n], n, rate=rate,
                                    num_steps=2) for n in COUNTS],
                        prob.frozen, batch_size=tc.batch_size, log_every=1)
    assert len(made) == 1
    chex.clear_trace_counter()


def test_a_fit_check_computes_only_the_runs_own_samples(cell, labelled, monkeypatch):
    """training_fit predicts the n real rows (in chunks of one shape), never the padding
    of the data's fixed size."""
    seen = []
    predict = problem._student_predictions

    def recording(transplant, params, frozen, beta, x):
        seen.append(x.shape[0])
        return predict(transplant, params, frozen, beta, x)

    monkeypatch.setattr(problem, "_student_predictions", recording)
    problem.training_fit(cell.problem, cell.problem.adapter_init, labelled[20], 20)
    assert labelled[20].size == max(cell.config.sample_counts)  # padded storage
    assert sum(seen) == -(-20 // problem.CHUNK) * problem.CHUNK
    assert set(seen) == {problem.CHUNK}


def test_runs_axis_is_validated_by_name():
    config = trimmed_quick_config()
    config.transplant.runs_axis = "sideways"
    with pytest.raises(ValueError, match=r"config\.transplant\.runs_axis must be one of "
                                         r"auto, batched, one_at_a_time, got 'sideways'"):
        validate_config(config)
    config.transplant.runs_axis = "auto"
    assert batched_runs(config) == (jax.default_backend() != "cpu")
    config.transplant.early_end_every = -1
    with pytest.raises(ValueError, match="early_end_every"):
        validate_config(config)


def test_the_job_in_either_mode_gives_the_same_cells(cell, tmp_path):
    """The Runner's cells of every method, trained one at a time and on a runs axis
    (with the fit check every 2 steps and restarts), agree."""
    runner, prob = cell.runner, cell.problem
    transfer = {n: runner.labelled(prob, "exp3", "cat", n) for n in (10, 20)}
    setup = ProblemSetup(prob, cell.warm_start, True, 0.0, transfer,
                         {n: float(problem.teacher_fit(prob, t, n))
                          for n, t in transfer.items()})
    out = {}
    for mode in ("one_at_a_time", "batched"):
        runner.config.transplant.runs_axis = mode
        out[mode] = {m: runner.trainer.run_cells(
            setup, [Cell("exp3", "cat", m, n, runner.seed, (1, 1))
                    for n in ((0, 10, 20) if m == "back-distill" else (10, 20))], 1.0)
            for m in problem.SEGMENTATION_METHODS}
    runner.config.transplant.runs_axis = "auto"
    for method, cells in out["one_at_a_time"].items():
        for alone, batched in zip(cells, out["batched"][method], strict=True):
            assert batched.cell.samples == alone.cell.samples
            assert batched.metric == pytest.approx(alone.metric, abs=0.05)
            assert batched.train_fit == pytest.approx(alone.train_fit, abs=0.05) \
                if alone.train_fit is not None else batched.train_fit is None
            assert len(batched.attempt_fits or []) == len(alone.attempt_fits or [])
            for k, v in alone.arrays().items():
                np.testing.assert_allclose(batched.arrays()[k], v, rtol=1e-3, atol=1e-4)
            assert alone.timing["steps"] > 0 or alone.cell.samples == 0
