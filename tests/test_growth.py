"""Growing a net end to end: the task-module choice study and the fine-tuning forgetting study."""

import json

import pytest

from nettransplant.configs import net_growth
from nettransplant.experiments import growth


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    config = net_growth.get_config("quick")
    config.pretrain.num_steps = 0
    config.teacher.num_steps = 4
    config.transplant.num_draws = 8
    config.transplant.closed_form_draws = 8
    config.transplant.num_steps = 3
    config.transplant.beta_images = 16
    config.growth.fine_tune_steps = 5
    config.growth.fine_tune_learning_rate = 1e-2  # large enough to move a few steps
    workdir = tmp_path_factory.mktemp("growth")
    return growth.run(config, workdir, progress=False), workdir


def test_every_target_is_ranked_and_transplanted_onto_every_other_category(results):
    out, workdir = results
    stored = json.loads((workdir / "growth" / "results.json").read_text())
    choice = stored["choice"]["classification"]
    assert set(choice["targets"]) == {"cat", "cow"}
    for target, row in choice["targets"].items():
        candidates = [c["task_module"] for c in row["candidates"]]
        assert sorted(candidates) == sorted(f"{c}.classification"
                                            for c in ("cat", "cow", "dog") if c != target)
        residuals = [c["residual"] for c in row["candidates"]]
        assert residuals == sorted(residuals) and all(0 <= r <= 1.01 for r in residuals)
        assert all(0 <= c["metric"] <= 100 for c in row["candidates"])
        assert row["first_choice"] == candidates[0]
    assert choice["spearman_pooled"] is None or -1 <= choice["spearman_pooled"] <= 1
    assert "Choosing the task module" in (workdir / "growth" / "results.md").read_text()


def test_transplanting_forgets_nothing_and_fine_tuning_changes_only_the_module_s_routes(results):
    forgetting = results[0]["forgetting"]
    assert forgetting["transplanting_changed_no_route"] is True
    routes = forgetting["routes"]
    assert set(routes) == {"cat → cat.segmentation", "cat → dog.classification",
                           "cow → cow.segmentation", "cow → dog.classification",
                           "dog → dog.classification", "dog → dog.segmentation"}
    for key, route in routes.items():
        if not route["through_fine_tuned_module"]:
            assert route["change"] == 0.0, key  # other task modules are not touched
    assert forgetting["fine_tuned_on"] == ["cat"]


def test_spearman_is_undefined_below_three_points_and_follows_the_order():
    assert growth.spearman([0.1, 0.2], [1.0, 2.0]) is None
    assert growth.spearman([0.1, 0.2, 0.3], [5.0, 6.0, 9.0]) == pytest.approx(1.0)
    assert growth.spearman([0.1, 0.2, 0.3], [9.0, 6.0, 5.0]) == pytest.approx(-1.0)
