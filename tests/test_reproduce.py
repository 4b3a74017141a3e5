"""The main job: `launch.reproduce` on the quick config, teacher reuse and resume, reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nettransplant import experiments
from nettransplant.configs import silhouettes
from nettransplant.core import modules
from nettransplant.core.adapter import Adapter
from nettransplant.data import benchmarks
from nettransplant.experiments import paper, report
from nettransplant.training import checkpoint, teachers
from nettransplant.transplant import objectives, problem
from nettransplant.transplant.wiring import Transplant

METHODS = {"back-distill", "direct-learn", "distill", "jacobian", "back-distill-random-init"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reproduce")
    config = silhouettes.get_config("quick")
    return workdir, config, experiments.run(config, workdir, progress=False)


def test_quick_run_writes_every_output_in_the_documented_layout(quick_run):
    workdir, config, results = quick_run
    for name in ("results.json", "results.md", "fig5_pca.png", "learning_curves.png",
                 "learning_curves.json", "samples.png"):
        assert (workdir / name).is_file(), name
    assert json.loads((workdir / "results.json").read_text())["exp1"] == results["exp1"]
    assert set(results["teachers"]) == {"cat", "dog"}
    for metrics in results["teachers"].values():
        assert 0 <= metrics["cls_error"] <= 100 and 0 <= metrics["seg_pixel_acc"] <= 100
    for adapter in ("1conv", "3conv"):
        cells = results["exp1"][adapter]
        assert set(cells) <= METHODS and set(cells["back-distill"]) == {"0", "10"}
        assert set(cells["back-distill"]["10"]) == {"cat", "dog", "avg"}
        assert "0" not in cells["direct-learn"]
    assert set(results["exp2"]) == {"back-distill", "direct-learn", "jacobian",
                                    "back-distill-random-init"}
    assert set(results["exp3"]) == METHODS
    assert set(results["table4"]) == {"classification", "segmentation"}
    assert set(results["table4"]["segmentation"]["distill"]["10"]) == {"cat", "avg"}
    assert results["runtime_s"] > 0
    stages = results["stage_seconds"]
    assert {"data", "teachers", "teachers_compile", "transplants", "transplants_compile",
            "outputs"} <= set(stages)
    assert 0 < stages["teachers_compile"] < stages["teachers"]
    # Summed over the threads that compiled: up to their number × the stage's time.
    assert stages["transplant_threads"] == config.concurrent_cells == 2
    assert 0 < stages["transplants_compile"] < 2 * stages["transplants"]
    assert stages["transplant_cells_run"] == paper.num_runs(config)
    # Where the transplant stage's time went, per experiment and method; every cell once.
    breakdown = stages["transplant_breakdown"]
    assert set(breakdown) == {"exp1_1conv", "exp1_3conv", "exp2", "exp3",
                              "table4_classification", "table4_segmentation"}
    assert sum(row.get("runs", 0) for rows in breakdown.values()
               for row in rows.values()) == stages["transplant_cells_run"]
    for rows in breakdown.values():
        assert rows["problem"]["setup_s"] > 0
        for method, row in rows.items():
            if method == "problem":
                continue
            assert 0 <= row["images"] <= row["steps"] * config.transplant.batch_size
            assert row["train_s"] >= 0 and row["eval_s"] > 0 and row["compile_s"] >= 0
    assert sum(stages[k] for k in ("data", "teachers", "transplants", "outputs")) <= \
        results["runtime_s"]
    assert json.loads((workdir / "results.json").read_text())["stage_seconds"] == stages
    # Back-distill from the baselines' initialisation is a row of its own.
    assert set(results["exp1"]["1conv"]["back-distill-random-init"]) == {"10"}
    # Exp. 1's 3-conv adapter also runs from random initialisation with 0 samples.
    assert set(results["exp1"]["3conv"]["back-distill-random-init"]) == {"0", "10"}
    residual = results["warm_start_residual"]
    assert set(residual) == {"exp1_1conv", "exp1_3conv", "exp2", "exp3",
                             "table4_classification", "table4_segmentation"}
    assert all(r >= 0 for cells in residual.values() for r in cells.values())
    swap = results["exp2_head_swap"]
    assert set(swap) == {"cat", "avg"}
    assert -1 <= swap["cat"]["fc8_cosine"] <= 1 and swap["cat"]["residual_with_own_head"] >= 0
    fit = results["train_fit"]
    assert set(fit) == set(residual)
    assert set(fit["exp3"]) == METHODS and set(fit["exp3"]["distill"]) == {"10"}
    assert all(0 <= v <= 100 for by_m in fit.values() for by_n in by_m.values()
               for cells in by_n.values() for v in cells.values())
    # The teacher on every run's samples; segmentation runs are held to it.
    teacher = results["teacher_fit"]
    assert set(teacher) == set(fit)
    assert set(teacher["exp3"]) == set(fit["exp3"]["direct-learn"])
    assert set(teacher["exp2"]["10"]) == {"cat", "avg"}
    assert all(0 <= v <= 100 for by_n in teacher.values() for row in by_n.values()
               for v in row.values())
    # Exp. 1's two adapter depths share their teachers and labelled samples.
    assert teacher["exp1_1conv"] == teacher["exp1_3conv"]
    # One seed: its results are the tables; restarts, fits and the first attempts per seed.
    assert results["seeds"] == [0] and set(results["per_seed"]) == {"0"}
    seed = results["per_seed"]["0"]
    assert seed["exp2"] == results["exp2"] and seed["train_fit"] == fit
    assert results["intervals"]["exp2"]["back-distill"]["10"] == {"cat": None, "avg": None}
    assert {c["verdict"] for c in results["verdicts"]} <= {"holds", "does not hold",
                                                          "inconclusive"}
    assert {(c["table"], c["samples"], c["baseline"]) for c in results["verdicts"]} >= {
        ("exp2", 10, "direct-learn"), ("exp2", 10, "jacobian"), ("exp3", 10, "distill"),
        ("exp1/1conv", 0, "teacher"), ("table4/segmentation", 10, "back-distill-random-init")}
    assert set(results["no_restarts"]) == {"exp1", "exp2", "exp3", "table4"}
    rates = results["fit_rates"]
    assert sum(r["runs"] for by_m in rates.values() for r in by_m.values()) == sum(
        1 for by_m in fit.values() for by_n in by_m.values() for row in by_n.values()
        for c in row if c != "avg")
    made = results["provenance"]
    assert made["version"] and made["device_count"] >= 1 and made["platform"] == "cpu"
    # Every training attempt is logged, per seed and experiment; restarts beside theirs.
    logs = workdir / "logs" / "seed0"
    assert (logs / "exp2" / "cat_direct-learn_n10.jsonl").is_file()
    # Restarts (config.transplant.restarts): only unfit runs, the kept attempt the best one.
    redrawn = [(e, t, m, n, fits) for e, by_t in seed["restarts"].items()
               for t, by_m in by_t.items() for m, by_n in by_m.items()
               for n, fits in by_n.items()]
    assert redrawn
    for e, t, m, n, fits in redrawn:
        done = [f for f in fits if f is not None]
        assert len(fits) <= 1 + config.transplant.restarts
        assert (logs / e / f"{t}_{m}_n{n}_restart1.jsonl").is_file()
        if e in ("exp3", "table4_segmentation"):
            assert fits[0] < teacher[e][n][t] - 2 and fit[e][m][n][t] == max(done)
        else:
            assert fits[0] > 10 and fit[e][m][n][t] == min(done)
    # Exp. 1: a single conv undoes the reorder exactly, at any adapter depth.
    assert residual["exp1_1conv"]["avg"] < 1e-3 and residual["exp1_3conv"]["avg"] < 1e-3
    md = (workdir / "results.md").read_text()
    assert "Table 2" in md and "Table 3" in md and "Table 4" in md and "(1.6)" in md


def test_zero_sample_single_conv_adapter_reproduces_its_teacher(quick_run):
    # Exp. 1's ideal adapter undoes the reorder exactly; the closed form finds it.
    _, _, results = quick_run
    for category, metrics in results["teachers"].items():
        assert results["exp1"]["1conv"]["back-distill"]["0"][category] == pytest.approx(
            metrics["cls_error"], abs=0.5)


def test_rerun_reuses_the_teacher_checkpoints(quick_run, monkeypatch):
    workdir, config, results = quick_run
    config = silhouettes.get_config("quick")
    config.experiments = ()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished teacher was trained again")

    monkeypatch.setattr(teachers, "train_teacher", forbidden)
    again = experiments.run(config, workdir, progress=False)
    assert again["teachers"] == results["teachers"]
    assert not list((workdir / "teachers").glob("*.partial"))
    meta = checkpoint.load_metadata(workdir / "teachers" / "cat")
    assert meta["category"] == "cat" and meta["metrics"] == results["teachers"]["cat"]
    assert meta["config"]["teacher"]["num_steps"] == config.teacher.num_steps


def test_an_interrupted_teacher_resumes_to_the_uninterrupted_parameters(tmp_path, monkeypatch):
    config = silhouettes.get_config("quick")
    config.experiments = ()
    config.categories, config.target_categories = ("cat",), ()
    config.generic_category = "dog"
    bench = benchmarks.make_benchmark(config)
    straight = experiments.TeacherZoo(config, tmp_path / "a", bench, progress=False)
    expected = straight.category("cat")

    original = teachers.train_teacher

    def interrupted(*args, on_checkpoint, **kwargs):
        def save_then_crash(state, history):
            on_checkpoint(state, history)
            raise KeyboardInterrupt

        return original(*args, on_checkpoint=save_then_crash, **kwargs)

    zoo = experiments.TeacherZoo(config, tmp_path / "b", bench, progress=False)
    monkeypatch.setattr(teachers, "train_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.category("cat")
    assert (tmp_path / "b" / "teachers" / "cat.partial").is_dir()
    assert not (tmp_path / "b" / "teachers" / "cat").exists()
    monkeypatch.setattr(teachers, "train_teacher", original)
    resumed = experiments.TeacherZoo(config, tmp_path / "b", bench, progress=False).category("cat")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 expected, resumed)
    assert not (tmp_path / "b" / "teachers" / "cat.partial").exists()


@pytest.mark.parametrize("field, value, message", [
    ("generic_category", "cat", "config.generic_category"),
    ("target_categories", ("cat", "unicorn"), "config.target_categories"),
    ("experiments", ("exp9",), "config.experiments"),
    ("sample_counts", (20, 10), "config.sample_counts"),
    ("data", "imagenet", "config.data"),
    ("pretrain.weights", "/nonexistent/vgg16.pth", "config.pretrain.weights"),
    ("teacher.renderings", 0, "config.teacher.renderings"),
    ("teacher.seg_batch_size", 0, "config.teacher.seg_batch_size"),
    ("pretrain.num_steps", -1, "config.pretrain.num_steps"),
])
def test_bad_configs_fail_naming_the_field(field, value, message):
    config = silhouettes.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=message):
        experiments.validate_config(config)


def test_dead_draws_are_dropped_and_the_bank_keeps_its_size():
    teacher = jnp.stack([jnp.zeros((2, 2)), jnp.ones((2, 2)), jnp.zeros((2, 2)),
                         2 * jnp.ones((2, 2))])
    cache = objectives.ChainCache(teacher + 10, teacher, jnp.arange(4))
    kept = problem.drop_dead_draws(cache, 4)
    np.testing.assert_array_equal(kept.mask_keys, [1, 3, 1, 3])
    with pytest.raises(ValueError, match="all 4"):
        problem.drop_dead_draws(objectives.ChainCache(teacher, 0 * teacher, None), 2)


def test_experiment_dummies_follow_the_paper():
    from nettransplant.core.modules import ClassificationTaskModule
    module = ClassificationTaskModule(width=0.125, input_size=32)
    assert problem.task_dummies("exp1", module) == "random_mask"
    exp2 = problem.task_dummies("exp2", module)
    assert exp2 == {"default": "identity", module.relu_names()[0]: "random_mask"}
    assert problem.task_dummies("exp3", module) == "identity"


def test_report_tables_put_the_paper_beside_ours_and_check_the_claims():
    row = {"cat": 3.0, "cow": 5.0, "avg": 4.0}
    results = {
        "teachers": {"cat": {"cls_error": 3.0, "seg_pixel_acc": 90.0},
                     "cow": {"cls_error": 5.0, "seg_pixel_acc": 91.0}},
        "config": {"categories": ["cat", "cow"]},
        "exp1": {"1conv": {"back-distill": {"0": row, "10": row},
                           "direct-learn": {"10": {"cat": 20.0, "cow": 30.0, "avg": 25.0}}}},
        "exp3": {"back-distill": {"10": {"cat": 80.0, "avg": 80.0}},
                 "direct-learn": {"10": {"cat": 78.0, "avg": 78.0}}},
    }
    md = report.results_markdown(results)
    assert ("| 10 | **back-distill** (closed-form warm start) | 3.0 (1.6) | 5.0 (0.5) | 4.0 (1.6) |"
            in md)
    # Results without the seeds' verdicts: decided now, category by category, same rule.
    verdicts = {c["claim"]: c for c in report.claims(results)}
    zero = verdicts["Exp. 1, 1-conv, 0 samples: back-distill within 2 points of its teachers"]
    assert zero["verdict"] == "holds" and zero["ci"] == [0.0, 0.0]  # 0 points given up
    ten = verdicts["Exp. 1, 1-conv, 10 samples: back-distill lower error than direct-learn"]
    # Two pairs, 17 and 25 points: t with one degree of freedom leaves zero inside.
    assert ten["difference"] == 21.0 and ten["pairs"] == 2 and ten["verdict"] == "inconclusive"
    one = verdicts["Exp. 3, 10 samples: back-distill higher pixel accuracy than direct-learn"]
    assert one["pairs"] == 1 and one["ci"] is None and one["verdict"] == "inconclusive"
    assert "| Exp. 1, 1-conv, 10 samples: back-distill lower error than direct-learn | " \
        "+21.0 [" in md
    results["config"]["generic_category"] = "cow"
    results["exp2"] = {"back-distill": {"20": {"cat": 40.0, "avg": 40.0}}}
    results["warm_start_residual"] = {"exp1_1conv": {"cat": 0.0, "avg": 0.0},
                                      "exp2": {"cat": 0.9, "avg": 0.9}}
    findings = "\n".join(report.findings(results))
    assert "exp1_1conv 0.00, exp2 0.90" in findings
    assert "nearly unrelated to the targets' (0.90" in findings
    results["exp2_head_swap"] = {"cat": {"fc8_cosine": 0.05, "residual_with_own_head": 0.2},
                                 "avg": {"fc8_cosine": 0.05, "residual_with_own_head": 0.2}}
    findings = "\n".join(report.findings(results))
    assert "each target teacher's averages 0.05" in findings
    assert "would leave 0.20 unexplained instead of 0.90. So the layers below" in findings
    assert '"cow vs the rest"' in findings
    results["exp2_head_swap"]["avg"]["residual_with_own_head"] = 0.8
    assert "So the layers below" not in "\n".join(report.findings(results))
    results["warm_start_residual"]["exp3"] = {"cat": 0.4, "avg": 0.4}
    assert "category (with the share its warm start leaves unexplained): cat +2.0 (0.40)." in \
        "\n".join(report.findings(results))


def test_training_fit_scores_the_real_labelled_rows_only():
    """``training_fit`` is the test metric on the run's own samples, padding dropped."""
    net = modules.make_teacher(width=1 / 8, input_size=32)
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    task = net.classification_module
    tp = Transplant(net.category_module, Adapter(8, 1, 3, reorder_seed=None), task, task)
    frozen = {"category_module": params["category_module"],
              "student_task_module": params["classification_module"],
              "teacher_task_module": params["classification_module"]}
    adapter = tp.adapter.ideal_params(1.0)
    x = problem.features(net.category_module, params["category_module"],
                             np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(
                                 np.float32))
    scalars = objectives.TransplantScalars(jnp.float32(1), jnp.float32(1), jnp.float32(1))
    case = problem.TransplantProblem(tp, frozen, scalars, None, adapter, x,
                                            np.zeros(6, np.int64), 1.0)
    predicted = np.asarray(problem._student_predictions(tp, adapter, frozen, 1.0, x))
    # 4 real rows labelled with the net's own predictions, 2 padding rows labelled wrong.
    labels = np.concatenate([predicted[:4], 1 - predicted[4:]])
    data = objectives.TransferData(x, jnp.asarray(labels), jnp.ones(6), jnp.asarray(
        [1, 1, 1, 1, 0, 0], jnp.float32), None, None, None)
    assert problem.training_fit(case, adapter, data, 4) == 0.0
    assert problem.training_fit(case, adapter, data, 6) == pytest.approx(100 / 3)
    assert problem.score(case, adapter, x[:4], 1 - predicted[:4]) == 100.0
    with pytest.raises(ValueError, match="num_samples must be in"):
        problem.training_fit(case, adapter, data, 0)


@pytest.mark.parametrize("variant", [None, "quick", "seeds5", "no_restarts", "converged"])
def test_every_config_variant_validates(variant):
    experiments.validate_config(silhouettes.get_config(variant))


def test_an_unknown_config_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown variant 'fast'.*'quick'.*'converged'"):
        silhouettes.get_config("fast")
