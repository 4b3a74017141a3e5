"""config.transplant.restarts: an unfit classification run from random init is retrained
from re-drawn initialisations, chosen by its train fit alone.

Attempt k starts from ``random_adapter(fold_in(key, k))``, or for back-distill's fixed
warm start trains from it at a smaller rate (both checked by redoing them by hand), the
kept run is the attempt with the lowest train fit, a run that fits is
left alone, 0 restarts keeps the cell fingerprints of before the field, and the
job's results name every re-drawn run.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from job_configs import trimmed_quick_config

from nettransplant import problem, report
from nettransplant.experiments import fit_probe, paper
from nettransplant.experiments.config import validate_config


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    return fit_probe.build_cell(trimmed_quick_config(), tmp_path_factory.mktemp("restarts"),
                                "exp1_1conv", "cat", 10)


@contextlib.contextmanager
def restarts(config, count):
    config.transplant.restarts = count
    try:
        yield
    finally:
        config.transplant.restarts = 0


def _fit(cell, init):
    params, history = cell.runner.fit(cell.problem, "direct-learn", cell.labelled, 10, init,
                                      "test", None)
    return params, history, problem.training_fit(cell.problem, params, cell.labelled, 10)


def test_the_random_initialisation_does_not_depend_on_the_map_size(cell):
    transplant, key = cell.problem.transplant, jax.random.PRNGKey(3)
    big = transplant.adapter.init(key, jnp.zeros((1, 16, 16, transplant.adapter.channels)))
    small = problem.random_adapter(transplant, key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, big["params"], small)


def test_an_unfit_run_is_retrained_from_redrawn_inits_and_the_best_is_kept(cell):
    params, history, fit = _fit(cell, cell.problem.adapter_init)
    key = jax.random.PRNGKey(11)
    with restarts(cell.config, 2):
        # Forced: a first attempt reported as unfit, whatever it reached in 4 steps.
        kept, kept_history, fits = cell.runner._restart_unfit(
            cell.problem, "direct-learn", cell.labelled, 10, params, history, 100.0, key,
            cell.warm_start, "test")
    assert fits[0] == 100.0 and 2 <= len(fits) <= 3
    for attempt, value in enumerate(fits[1:], start=1):  # each attempt, redone by hand
        init = problem.random_adapter(cell.problem.transplant, jax.random.fold_in(key, attempt))
        assert _fit(cell, init)[2] == value
    if len(fits) == 2:  # it stopped early: attempt 1 fitted
        assert fits[1] <= paper.FIT_ERROR
    best = min(fits)
    assert problem.training_fit(cell.problem, kept, cell.labelled, 10) == best
    assert len(kept_history) == len(history)


def _weaker(prob, attempt):
    """``prob`` with λ as a back-distill row's restart ``attempt`` weighs it."""
    return dataclasses.replace(prob, scalars=prob.scalars.replace(
        lam=prob.scalars.lam * paper.RETRY_LAMBDA_FACTOR ** attempt))


def test_the_warm_start_is_retrained_from_itself_at_a_smaller_rate_and_lambda(cell):
    prob, runner = cell.problem, cell.runner
    params, history = runner.fit(prob, "back-distill", cell.labelled, 10, cell.warm_start,
                                 "test", None)
    with restarts(cell.config, 1):
        kept, _, fits = runner._restart_unfit(
            prob, "back-distill", cell.labelled, 10, params, history, 100.0,
            jax.random.PRNGKey(0), cell.warm_start, "test")
    assert len(fits) == 2
    rate = cell.config.transplant.learning_rate / paper.RETRY_RATE_DIVISOR
    steps = problem.StepCache(optax.adam(rate), mesh=runner.mesh,
                              weights=paper.jacobian_weights(cell.config))
    by_hand, by_hand_history = runner.fit(_weaker(prob, 1), "back-distill", cell.labelled, 10,
                                          cell.warm_start, "test", None, steps=steps)
    assert problem.training_fit(prob, by_hand, cell.labelled, 10) == fits[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, by_hand)
    # The weaker λ is what trained: the first step's term is λ0's times the factor.
    _, at_lambda0 = runner.fit(prob, "back-distill", cell.labelled, 10, cell.warm_start,
                               "test", None, steps=steps, num_steps=1)
    assert by_hand_history[0]["back_distill"] == pytest.approx(
        paper.RETRY_LAMBDA_FACTOR * at_lambda0[0]["back_distill"], rel=1e-5)
    assert runner.steps("classification", 1) is runner.steps("classification", 1)


def test_back_distill_from_random_init_redraws_and_weakens_lambda(cell):
    prob, runner = cell.problem, cell.runner
    key = jax.random.PRNGKey(5)
    params, history = runner.fit(prob, paper.RANDOM_INIT, cell.labelled, 10, prob.adapter_init,
                                 "test", None)
    with restarts(cell.config, 2):
        kept, _, fits = runner._restart_unfit(
            prob, paper.RANDOM_INIT, cell.labelled, 10, params, history, 100.0, key,
            cell.warm_start, "test")
    assert 2 <= len(fits) <= 3
    for attempt, value in enumerate(fits[1:], start=1):  # each attempt, redone by hand
        init = problem.random_adapter(prob.transplant, jax.random.fold_in(key, attempt))
        by_hand, _ = runner.fit(_weaker(prob, attempt), paper.RANDOM_INIT, cell.labelled, 10,
                                init, "test", None)
        assert problem.training_fit(prob, by_hand, cell.labelled, 10) == value
    assert problem.training_fit(prob, kept, cell.labelled, 10) == min(fits)


def test_segmentation_trains_at_its_own_rate(cell):
    config, runner = cell.config, cell.runner
    tc = config.transplant
    assert paper.learning_rate(config, "classification") == tc.learning_rate
    assert paper.learning_rate(config, "segmentation") == tc.learning_rate_segmentation
    without = trimmed_quick_config()
    del without.transplant["learning_rate_segmentation"]  # a config that predates the field
    assert paper.learning_rate(without, "segmentation") == without.transplant.learning_rate
    # Each task's steps hold their own Adam: one update of 1 moves a parameter by the rate.
    for task_name in ("classification", "segmentation"):
        optimizer = runner.steps(task_name).optimizer
        params = {"w": jnp.zeros(())}
        update, _ = optimizer.update({"w": jnp.ones(())}, optimizer.init(params), params)
        assert float(update["w"]) == pytest.approx(-paper.learning_rate(config, task_name),
                                                  rel=1e-4)  # Adam's ε


def test_only_back_distill_classification_cells_name_the_lambda_retry(cell):
    config, runner = cell.config, cell.runner
    spec = {"experiment": "exp1_1conv"}
    for count in (0, 2):
        with restarts(config, count):
            for task_name in ("classification", "segmentation"):
                for method in ("direct-learn", "jacobian", "distill", "back-distill",
                               paper.RANDOM_INIT):
                    cell_spec = runner.cell_spec(spec, method, 10, False, task_name)
                    named = (count and task_name == "classification"
                             and method in ("back-distill", paper.RANDOM_INIT))
                    assert cell_spec.get("retry_lambda_factor") == (
                        paper.RETRY_LAMBDA_FACTOR if named else None), (count, task_name, method)
                    assert {k: v for k, v in cell_spec.items()
                            if k != "retry_lambda_factor"} == {
                        **spec, "method": method, "samples": 10, "fig5": False}


def test_a_run_that_fits_is_left_alone(cell):
    params, history, _ = _fit(cell, cell.problem.adapter_init)
    with restarts(cell.config, 3):
        kept, kept_history, fits = cell.runner._restart_unfit(
            cell.problem, "direct-learn", cell.labelled, 10, params, history,
            paper.FIT_ERROR, jax.random.PRNGKey(0), cell.warm_start, "test")
    assert fits == [paper.FIT_ERROR] and kept is params and kept_history is history


def test_zero_restarts_keep_the_fingerprints_and_some_change_them(cell):
    args = ("exp1_1conv", cell.config.adapters.exp1_1conv, "exp1", "cat",
            "cat.classification", "cat.classification")
    config = cell.config
    without = trimmed_quick_config()
    assert "restarts" in without.transplant  # the shipped config has the field
    with restarts(config, 0):
        zero = cell.runner._fingerprint(*args)
    with restarts(config, 2):
        two = cell.runner._fingerprint(*args)
    assert "restarts" not in zero["transplant"] and two["transplant"]["restarts"] == 2
    assert {k: v for k, v in two["transplant"].items() if k != "restarts"} \
        == zero["transplant"]


def test_the_job_records_every_redrawn_run(cell):
    config = cell.config
    with restarts(config, 1):
        cell.runner.run("exp1_1conv", config.adapters.exp1_1conv, "exp1", "cat",
                        "cat.classification", "cat.classification", 1.0, [10], "restarted")
    fit = cell.runner.train_fit["exp1_1conv"]["cat"]
    redrawn = cell.runner.restarts.get("exp1_1conv", {}).get("cat", {})
    assert redrawn  # 4 steps: some run is unfit and retrained
    for method, value in fit.items():
        if value["10"] > paper.FIT_ERROR or method in redrawn:
            fits = redrawn[method]["10"]
            assert len(fits) == 2 and fits[0] > paper.FIT_ERROR
            assert value["10"] == min(f for f in fits if f is not None)


@pytest.mark.parametrize("value", [-1, 101])
def test_a_bad_restart_count_is_refused_by_name(value):
    config = trimmed_quick_config()
    config.transplant.restarts = value
    with pytest.raises(ValueError, match=r"config\.transplant\.restarts"):
        validate_config(config)


def test_the_report_counts_the_retrained_runs():
    results = {"config": {"transplant": {"num_steps": 5, "restarts": 2}},
               "train_fit": {"exp2": {"direct-learn": {"10": {"cat": 0.0, "cow": 50.0,
                                                              "avg": 25.0}}}},
               "restarts": {"exp2": {"cat": {"direct-learn": {"10": [50.0, 0.0]}},
                                     "cow": {"direct-learn": {"10": [50.0, None, 50.0]}}}}}
    unfit, retrained = report._fit_findings(results)
    assert unfit.startswith("1 of 2 runs did not fit") and "exp2 direct-learn: cow@10" in unfit
    assert "in 5 steps and up to 2 restarts (classification)" in unfit
    assert retrained.startswith("2 classification runs did not fit at their first attempt")
    assert "1 of them then fit, 1 at the first restart" in retrained
