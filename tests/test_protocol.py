"""The main job's training protocol (nettransplant.transplant.protocol): one rule for every method.

A run that has not fit its labelled samples is retrained from a re-drawn start — a
fresh random initialisation, or back-distill's warm start plus ``restart_noise`` times
that draw — with the same objective, λ, rate and budget (each attempt redone by hand
here), the attempt that fits best is kept, a run that fits is left alone, and the job
records every attempt, the first attempts' test metrics (the no-restart ablation) and
the fit rates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from job_configs import trimmed_quick_config

from nettransplant.experiments import fit_probe, report
from nettransplant.experiments.cell_training import CellRun
from nettransplant.experiments.cells import RANDOM_INIT, Cell
from nettransplant.experiments.config import validate_config
from nettransplant.experiments.results import Results
from nettransplant.experiments.runner import Runner
from nettransplant.experiments.timing import CellClock
from nettransplant.transplant import problem
from nettransplant.transplant.protocol import Protocol

METHODS = ("direct-learn", "jacobian", "back-distill", RANDOM_INIT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("protocol")


def _config():
    """The trimmed config without the early end (tests/test_transplant_stage.py has it): a
    restart redone by hand trains its whole budget."""
    config = trimmed_quick_config()
    config.transplant.early_end_every = 0
    config.transplant.restarts = 2
    return config


@pytest.fixture(scope="module")
def cell(workdir):
    return fit_probe.build_cell(_config(), workdir, "exp1_1conv", "cat", 10)


@pytest.fixture(scope="module")
def seg_cell(workdir):  # the same teachers
    return fit_probe.build_cell(_config(), workdir, "exp3", "cat", 10)


@pytest.fixture
def never_fits(monkeypatch):
    """Every attempt counts as unfit, so every restart runs."""
    monkeypatch.setattr(problem, "fits_samples", lambda *args, **kwargs: False)


def _restart(cell, method, first_fit, key, reference=None):
    """The runner's restarts of one ``method`` run whose first attempt is trained here;
    returns ``(first params, kept params, kept history, fits)``."""
    prob, trainer = cell.problem, cell.runner.trainer
    init = cell.warm_start if method == "back-distill" else prob.adapter_init
    params, history = trainer.fit(prob, method, cell.labelled, 10, init, "test")
    run = CellRun(Cell(cell.experiment, cell.target, method, 10, cell.runner.seed, (1, 1)),
                  cell.labelled, reference, CellClock(), params=params, history=history,
                  fits=[first_fit])
    trainer.restart_rounds(prob, method, [run], key, cell.warm_start)
    return params, run.params, run.history, run.fits


def _by_hand_init(cell, key, attempt, centre=None):
    """Restart ``attempt``'s start written out: He-normal convs and zero biases drawn from
    ``fold_in(key, attempt)``; around ``centre`` scaled by ``restart_noise``."""
    transplant = cell.problem.transplant
    draw = transplant.adapter.init(jax.random.fold_in(key, attempt),
                                   jnp.zeros((1, 1, 1, transplant.adapter.channels)))["params"]
    if centre is None:
        return draw
    noise = cell.config.transplant.restart_noise
    return jax.tree_util.tree_map(lambda c, d: c + noise * d, centre, draw)


def test_the_random_initialisation_does_not_depend_on_the_map_size(cell):
    transplant, key = cell.problem.transplant, jax.random.PRNGKey(3)
    big = transplant.adapter.init(key, jnp.zeros((1, 16, 16, transplant.adapter.channels)))
    small = problem.random_adapter(transplant, key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, big["params"], small)


def test_the_protocol_is_read_from_the_config_once():
    config = _config()
    rule = Protocol.from_config(config.transplant)
    tc = config.transplant
    assert rule == Protocol(tc.num_steps, tc.learning_rate, tc.learning_rate_segmentation,
                            0, 2, tc.restart_noise)
    assert rule.rate("classification") == tc.learning_rate
    assert rule.rate("segmentation") == tc.learning_rate_segmentation
    assert not rule.fits("classification", None, None)  # a diverged attempt never fits
    assert rule.better(problem_task("classification"), 5.0, 10.0)
    assert not rule.better(problem_task("classification"), 10.0, 10.0)  # ties keep the first
    assert rule.better(problem_task("segmentation"), 91.0, 90.0)
    assert not rule.better(problem_task("segmentation"), None, 0.0)


def problem_task(name):
    from nettransplant.core import tasks
    return tasks.get(name)


@pytest.mark.parametrize("method", METHODS)
def test_an_unfit_run_restarts_from_redrawn_starts_with_its_own_lambda_and_rate(
        cell, never_fits, method):
    key = jax.random.PRNGKey(11)
    first, kept, kept_history, fits = _restart(cell, method, 100.0, key)
    assert fits[0] == 100.0 and len(fits) == 3
    prob, trainer = cell.problem, cell.runner.trainer
    trained = {0: first}
    for attempt in (1, 2):  # each attempt redone by hand: the same problem (λ), rate, steps
        start = _by_hand_init(cell, key, attempt,
                              centre=cell.warm_start if method == "back-distill" else None)
        by_hand, history = trainer.fit(prob, method, cell.labelled, 10, start, "test")
        assert problem.training_fit(prob, by_hand, cell.labelled, 10) == fits[attempt]
        assert history[-1]["step"] == cell.config.transplant.num_steps - 1
        trained[attempt] = by_hand
    best = min(range(3), key=lambda i: (fits[i], i))
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, trained[best])
    # Restarts train with the task's one step cache.
    assert set(trainer._steps) <= {"classification", "segmentation"}


def test_a_run_that_fits_is_left_alone(cell):
    first, kept, _, fits = _restart(cell, "direct-learn", problem.FIT_ERROR,
                                    jax.random.PRNGKey(0))
    assert fits == [problem.FIT_ERROR] and kept is first


def test_a_segmentation_run_below_its_teacher_restarts_and_keeps_the_highest_fit(seg_cell):
    cell, key = seg_cell, jax.random.PRNGKey(9)
    prob = cell.problem
    reference = problem.teacher_fit(prob, cell.labelled, 10)
    _, kept, _, fits = _restart(cell, "direct-learn", 0.0, key, reference)
    assert fits[0] == 0.0 and 2 <= len(fits) <= 3
    if len(fits) == 2:
        assert fits[1] >= reference - problem.FIT_MARGIN
    assert problem.training_fit(prob, kept, cell.labelled, 10) == max(fits)
    _, _, _, fits = _restart(cell, "direct-learn", reference - problem.FIT_MARGIN, key,
                             reference)
    assert fits == [reference - problem.FIT_MARGIN]  # within the margin: left alone


def test_the_teacher_fit_is_the_teachers_pixel_accuracy_on_the_samples(seg_cell):
    prob, labelled = seg_cell.problem, seg_cell.labelled
    y = prob.transplant.teacher_task_module.apply(
        {"params": prob.frozen["teacher_task_module"]}, labelled.features[:10])[0]
    masks = np.asarray(labelled.labels)[:10]
    by_hand = 100 * np.mean(np.argmax(np.asarray(y), axis=-1) == masks)
    assert problem.teacher_fit(prob, labelled, 10) == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(ValueError, match="num_samples"):
        problem.teacher_fit(prob, labelled, labelled.size + 1)
    assert problem.fits_samples("segmentation", 88.0, 90.0)
    assert not problem.fits_samples("segmentation", 87.9, 90.0)
    assert problem.fits_samples("classification", 10.0)
    assert not problem.fits_samples("classification", 10.1)
    with pytest.raises(ValueError, match="teacher_fit"):
        problem.fits_samples("segmentation", 88.0)


def test_each_task_trains_at_its_own_rate(cell):
    trainer = cell.runner.trainer
    for task_name in ("classification", "segmentation"):
        optimizer = trainer.steps(task_name).optimizer
        params = {"w": jnp.zeros(())}
        update, _ = optimizer.update({"w": jnp.ones(())}, optimizer.init(params), params)
        assert float(update["w"]) == pytest.approx(-trainer.protocol.rate(task_name),
                                                  rel=1e-4)  # Adam's ε


def test_cells_name_the_rule_and_nothing_else_of_the_restarts(cell):
    spec = {"experiment": "exp1_1conv"}
    for method in METHODS:
        assert cell.runner.cell_spec(spec, method, 10, False) == {
            **spec, "method": method, "samples": 10, "fig5": False, "rule": Runner.RULE}


def test_the_job_records_every_attempt_the_first_attempts_metric_and_the_fit_rates(cell):
    config, runner = cell.config, cell.runner
    runner.results = Results(config)
    two = runner.trainer.protocol
    runner.trainer.protocol = dataclasses.replace(two, restarts=1)
    try:
        done = runner.run("exp1_1conv", config.adapters.exp1_1conv, "exp1", "cat",
                          "cat.classification", "cat.classification", 1.0, [10])
    finally:
        runner.trainer.protocol = two
    metric = {r.cell.method: r.metric for r in done}
    seed = runner.results.of_seed(runner.seed)
    fit = runner.results.by_cell(runner.seed, "train_fit")["exp1_1conv"]["cat"]
    redrawn = seed["restarts"].get("exp1_1conv", {}).get("cat", {})
    first = runner.results.by_cell(runner.seed, "first_attempt_metric")["exp1_1conv"]["cat"]
    rates = seed["fit_rates"]["exp1_1conv"]
    for method, value in fit.items():
        fits = redrawn.get(method, {}).get("10")
        if fits is None:  # fitted at once: nothing redrawn, the first attempt is the cell
            assert value["10"] <= problem.FIT_ERROR and first[method]["10"] == metric[method]
        else:
            assert len(fits) == 2 and fits[0] > problem.FIT_ERROR
            assert value["10"] == min(f for f in fits if f is not None)
        assert rates[method]["runs"] >= 1
        assert rates[method]["fit_first"] <= rates[method]["fit_kept"] <= rates[method]["runs"]


@pytest.mark.parametrize("field,value", [
    ("transplant.restarts", -1), ("transplant.restarts", 101),
    ("transplant.restart_noise", -0.1), ("transplant.restart_noise", float("nan")),
    ("evidence.confidence", 1.0), ("evidence.margin", -1.0),
    ("evidence.teacher_margin", float("inf"))])
def test_a_bad_protocol_or_evidence_field_is_refused_by_name(field, value):
    config = trimmed_quick_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=rf"config\.{section}\.{name}"):
        validate_config(config)


@pytest.mark.parametrize("seeds", [(), (0, 0), (-1,), (1.5,)])
def test_bad_seeds_are_refused_by_name(seeds):
    config = trimmed_quick_config()
    config.seeds = seeds
    with pytest.raises(ValueError, match=r"config\.seeds"):
        validate_config(config)


def test_learning_curves_average_the_steps_every_run_of_a_row_has(tmp_path, monkeypatch):
    """A run kept from the longer last restart logs more steps than its row's others: the
    row's curve is the mean over the steps they all have."""
    import matplotlib.axes
    plotted = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        plotted.append((kwargs.get("label"), np.asarray(args[0])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    curves = {"teachers": {}, "transplants": {"exp2": {"direct-learn": {
        "10": [[4.0, 2.0, 1.0], [2.0, 1.0, 0.5, 0.2, 0.1, 0.05]]}}}}
    report.plot_learning_curves(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    (label, mean), = plotted
    assert label == "direct-learn n=10"
    np.testing.assert_allclose(mean, [3.0, 1.5, 0.75])


def test_a_checkpoint_callback_that_returns_true_ends_the_training():
    from nettransplant.training.loop import train_loop

    def step(state, x):
        return state + x, {"loss": jnp.asarray(state, jnp.float32), "finite": jnp.asarray(True)}

    seen = []

    def on_checkpoint(state, history):
        seen.append(int(state))
        return int(state) >= 8

    state, history = train_loop(step, jnp.asarray(0), lambda i: (jnp.asarray(1),),
                                num_steps=20, log_every=3, checkpoint_every=4,
                                on_checkpoint=on_checkpoint, progress=False)
    assert int(state) == 8 and seen == [4, 8]
    assert [h["step"] for h in history] == [0, 3, 6, 7]  # the step it ended at is logged
    state, history = train_loop(step, jnp.asarray(0), lambda i: (jnp.asarray(1),),
                                num_steps=20, log_every=3, checkpoint_every=4,
                                on_checkpoint=lambda *_: None, progress=False)
    assert int(state) == 20 and [h["step"] for h in history][-2:] == [18, 19]
