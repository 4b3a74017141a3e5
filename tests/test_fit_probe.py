"""launch.fit_probe: one cell of the main job retrained with other optimisers.

With the main job's own optimiser and budget the probe reproduces the main job's
cell (its train fit and parameters; the probe shows a validation metric, never the
test one); its identity initialisation passes the
re-ordered, re-scaled features through; bad input is refused by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from job_configs import trimmed_quick_config

from nettransplant.experiments import fit_probe
from nettransplant.experiments.zoo import generic_name
from nettransplant.transplant import problem

REPO = Path(__file__).resolve().parents[1]


def _config():
    config = trimmed_quick_config()
    config.transplant.restarts = 0  # the probe retrains a cell's first attempt
    config.experiments = ("exp3", "table4")  # Table 4's leave-one-out module too
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def cell(workdir):
    return fit_probe.build_cell(_config(), workdir, "exp1_1conv", "cat", 10)


def test_the_main_jobs_optimiser_reproduces_the_main_jobs_cell(cell):
    config = cell.config
    done = {r.cell.method: r for r in cell.runner.run(
        "exp1_1conv", config.adapters.exp1_1conv, "exp1", "cat", "cat.classification",
        "cat.classification", 1.0, [10])}
    spec = f"adam@{config.transplant.learning_rate}"
    for method in ("direct-learn", "back-distill"):
        (record,) = fit_probe.probe(cell, method, [spec], config.transplant.num_steps)
        assert "test" not in record
        assert record["train_fit"] == done[method].train_fit
        assert record["init"] == ("warm_start" if method == "back-distill" else "random")
        assert len(record["logits_positive"]) + len(record["logits_negative"]) == 10
        assert 0 <= record["active_start"] <= 1 and 0 <= record["active_end"] <= 1
    # The job's back-distill adapter scores on the validation split what the probe's does.
    params = cell.runner.results.learned(cell.runner.seed)["exp1_1conv"]["cat"].params
    assert record["validation"] == problem.score(cell.problem, params, *cell.validation)


def test_the_validation_split_is_training_images_no_run_has_labelled(cell):
    from nettransplant import data
    runner = cell.runner
    view = runner.view("exp1_1conv", cell.problem.task, "cat", "train")
    largest = max(cell.config.sample_counts)
    held = set(data.few_shot_indices(view, largest, seed=runner.seed).tolist())
    validation = data.validation_set(view, largest, seed=runner.seed)
    assert len(validation) == min(data.tasks.VALIDATION_IMAGES, len(view) - largest)
    labelled = {view.images[i].tobytes() for i in held}
    assert not labelled & {image.tobytes() for image in validation.images}
    assert cell.validation[0].shape[0] == len(validation)


@pytest.mark.parametrize("experiment,task", [("table4_classification", "classification"),
                                             ("table4_segmentation", "segmentation")])
def test_table4_cells_are_the_main_jobs_and_train_at_their_tasks_rate(cell, workdir,
                                                                      experiment, task):
    config = _config()
    table4 = fit_probe.build_cell(config, workdir, experiment, "cat", 10)
    assert fit_probe.job_optimizer(table4).learning_rate == (
        config.transplant.learning_rate_segmentation if task == "segmentation"
        else config.transplant.learning_rate)
    student = generic_name("cat")
    runner = table4.runner
    beta = runner.beta(student, runner.benchmark.leave_one_out_categories("cat"), "cat")
    protocol = "exp3" if task == "segmentation" else "exp2"
    done = {r.cell.method: r for r in runner.run(
        experiment, config.adapters[protocol], protocol, "cat", f"{student}.{task}",
        f"cat.{task}", beta, [10])}
    (record,) = fit_probe.probe(table4, "direct-learn", [fit_probe.job_optimizer(table4)],
                                config.transplant.num_steps)
    assert record["train_fit"] == done["direct-learn"].train_fit


def test_every_optimiser_runs_and_the_table_names_it(cell):
    specs = [f"{name}@1e-2" for name in fit_probe.OPTIMIZERS]
    records = fit_probe.probe(cell, "direct-learn", specs, 3, init="identity")
    assert [r["optimizer"] for r in records] == [f"{name}@0.01" for name in
                                                 fit_probe.OPTIMIZERS]
    assert all(r["init"] == "identity" and r["steps"] == 3 for r in records)
    assert all(np.isfinite(r["losses"]).all() for r in records)
    text = fit_probe.table(cell, "direct-learn", records)
    assert all(f"| {name}@0.01 | identity | 3 |" in text for name in fit_probe.OPTIMIZERS)


def test_the_identity_initialisation_passes_its_reordered_rescaled_input_through(cell):
    adapter = cell.problem.transplant.adapter
    params = problem.identity_adapter(cell.problem.transplant)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 5, 5, adapter.channels))  # ≥ 0
    y, _ = adapter.apply({"params": params}, x, beta=1.5)
    np.testing.assert_allclose(y, 1.5 * np.asarray(x)[..., adapter.permutation()], rtol=1e-6)


@pytest.mark.parametrize("text, named", [("adam", "NAME@RATE"), ("lion@1e-3", "lion"),
                                         ("adam@fast", "fast"), ("adam@0", "> 0")])
def test_a_bad_optimizer_is_refused_by_name(text, named):
    with pytest.raises(ValueError, match=named):
        fit_probe.OptimizerSpec.parse(text)


def test_bad_cells_are_refused_by_name(cell, tmp_path):
    config = trimmed_quick_config()
    with pytest.raises(ValueError, match="exp9"):
        fit_probe.build_cell(config, tmp_path, "exp9", "cat", 10)
    with pytest.raises(ValueError, match="'zebra'"):
        fit_probe.build_cell(config, tmp_path, "exp1_1conv", "zebra", 10)
    with pytest.raises(ValueError, match="samples 51"):
        fit_probe.build_cell(config, tmp_path, "exp1_1conv", "cat", 51)
    with pytest.raises(ValueError, match="'distill'"):  # segmentation only
        fit_probe.probe(cell, "distill", ["adam@1e-2"], 2)
    with pytest.raises(ValueError, match="'zeros'"):
        fit_probe.probe(cell, "direct-learn", ["adam@1e-2"], 2, init="zeros")


def test_the_command_refuses_a_bad_optimizer_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.fit_probe", f"--workdir={tmp_path}",
         "--optimizers=adam@1e-2,lion@1e-3"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "lion@1e-3" in line
