"""Growing a transplant net on the embedded data: which task module to transplant onto, and
what fine-tuning a shared task module costs the other routes.

:func:`run` is what ``nettransplant growth`` calls (``nettransplant/configs/net_growth.py``):

* **choosing the task module** — the paper leaves open which existing task
  module a new category should be transplanted onto. The library's proxy is the
  zero-sample back-distillation residual (:func:`~nettransplant.net.operations.
  rank_task_modules`: the share of the teacher's pseudo-gradients that the best
  single 1×1 conv cannot reproduce). Here every target is transplanted onto every
  other category's task module and the residual's order is compared with the
  transplants' test metrics (Spearman's ρ per target and pooled; whether the
  residual's first choice is the best transplant);
* **fine-tuning and forgetting** (paper §5) — the generic category's teacher
  with every target transplanted onto its task modules; its classification
  module is fine-tuned on a few categories and every route is scored before and
  after. Transplanting alone changes no existing route (bit-identical); the
  routes of the categories left out of the fine-tuning measure its forgetting.

:func:`run` first checks the config (:func:`validate_config`: the main job's
fields and the ``growth`` section) and refuses a bad field with one line naming
it before any teacher is trained or any data loaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from nettransplant import data
from nettransplant.core import tasks
from nettransplant.data import benchmarks
from nettransplant.experiments import config as job_config
from nettransplant.experiments.workdir import WorkdirLock, check_writable
from nettransplant.experiments.zoo import TeacherZoo
from nettransplant.net import TaskTrainingSettings, TransplantNet, TransplantSettings, operations
from nettransplant.net.graph import TeacherParts
from nettransplant.runtime import config_checks as check
from nettransplant.runtime.files import write_atomically
from nettransplant.runtime.progress import progress_bar


def _samples(view: data.ImageSet, task: str) -> tuple[np.ndarray, np.ndarray]:
    return view.images, tasks.get(task).targets(view)


class _Views:
    """The benchmark's labelled views of one task, cached per (category, split)."""

    def __init__(self, benchmark: benchmarks.Benchmark, task: str):
        self.benchmark, self.task, self._cache = benchmark, task, {}

    def __call__(self, category: str, split: str) -> data.ImageSet:
        if (category, split) not in self._cache:
            # A benchmark has one view method per task, named after it.
            self._cache[category, split] = getattr(self.benchmark, self.task)(category, split)
        return self._cache[category, split]

    def few(self, category: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return _samples(data.few_shot(self(category, "train"), n, seed=seed), self.task)

    def test(self, category: str) -> tuple[np.ndarray, np.ndarray]:
        return _samples(self(category, "test"), self.task)


def spearman(a, b) -> float | None:
    """Spearman's ρ of two sequences (None with fewer than 3 points or a constant one)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(stats.spearmanr(a, b).statistic)


def _beta(config, benchmark, source: TeacherParts, target: TeacherParts) -> float:
    """β of a transplant of ``target``'s category module onto a task module of ``source``'s
    (unlabelled train images of both categories)."""
    n = config.transplant.beta_images
    return operations.estimate_beta(
        source.category_module, source.input.normalize(benchmark.unlabelled([source.name], n)),
        target.category_module, target.input.normalize(benchmark.unlabelled([target.name], n)))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _net_of(teachers: dict[str, TeacherParts], names) -> TransplantNet:
    net = TransplantNet()
    for name in names:
        net = net.add_teacher(teachers[name])
    return net


def choose_task_modules(config, teachers: dict[str, TeacherParts], benchmark, settings,
                        bar) -> dict[str, Any]:
    """Residual ranking vs actual transplant metric, per task and target."""
    g, out = config.growth, {}
    for task in g.tasks:
        views = _Views(benchmark, task)
        higher_is_better = tasks.get(task).higher_is_better
        rows, residuals, metrics = {}, [], []
        for target in config.target_categories:
            others = [c for c in config.categories if c != target]
            net = _net_of(teachers, others)
            betas = {f"{c}.{task}": _beta(config, benchmark, teachers[c], teachers[target])
                     for c in others}
            bar.set_postfix_str(f"rank {task} {target}")
            ranking = operations.rank_task_modules(net, teachers[target], task=task,
                                                   candidates=sorted(betas), betas=betas,
                                                   settings=settings)
            cells = []
            for entry in ranking:
                bar.set_postfix_str(f"{task} {target} → {entry['task_module']}")
                _, report = operations.transplant(
                    net, teachers[target], onto=entry["task_module"],
                    samples=views.few(target, g.samples, config.seed), beta=entry["beta"],
                    settings=settings, test=views.test(target))
                metric = next(iter(report["metrics"].values()))
                cells.append({**entry, "metric": metric})
                residuals.append(entry["residual"])
                metrics.append(metric)
                bar.update()
            best = (max if higher_is_better else min)(cells, key=lambda c: c["metric"])
            # ρ(residual, error) > 0 means the residual orders candidates as the errors do;
            # for pixel accuracy (higher is better) the sign is flipped so the same holds.
            sign = -1.0 if higher_is_better else 1.0
            rho = spearman([c["residual"] for c in cells], [sign * c["metric"] for c in cells])
            rows[target] = {"candidates": cells, "spearman": rho,
                            "first_choice_is_best": cells[0]["task_module"] == best["task_module"],
                            "first_choice": cells[0]["task_module"],
                            "best": best["task_module"]}
        sign = -1.0 if higher_is_better else 1.0
        out[task] = {"metric": tasks.get(task).metric_name,
                     "targets": rows,
                     "spearman_pooled": spearman(residuals, [sign * m for m in metrics]),
                     "spearman_mean": _mean([r["spearman"] for r in rows.values()]),
                     "first_choice_is_best": sum(r["first_choice_is_best"]
                                                 for r in rows.values()),
                     "targets_count": len(rows)}
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _scores(net: TransplantNet, views: dict[str, _Views]) -> dict[str, float]:
    return {f"{r.category} → {r.task_module}": net.evaluate(
        *views[r.task].test(r.category), category=r.category, task=r.task_module)
        for r in net.routes()}


def fine_tuning_forgetting(config, teachers: dict[str, TeacherParts], benchmark, settings,
                           bar) -> dict[str, Any]:
    """Every route's test metric: after transplanting, and after fine-tuning the generic
    classification module on ``growth.fine_tune_categories``."""
    g, generic = config.growth, config.generic_category
    views = {task: _Views(benchmark, task) for task in ("classification", "segmentation")}
    net = TransplantNet().add_teacher(teachers[generic])
    before_growth = None
    for target in config.target_categories:
        for i, task in enumerate(g.tasks):
            bar.set_postfix_str(f"grow {target} → {generic}.{task}")
            beta = _beta(config, benchmark, teachers[generic], teachers[target])
            samples = views[task].few(target, g.samples, config.seed)
            if before_growth is None:
                before_growth = _scores(net, views)
            if i == 0:
                net, _ = operations.transplant(net, teachers[target], onto=f"{generic}.{task}",
                                               samples=samples, beta=beta, settings=settings)
            else:
                net, _ = operations.connect(net, target, f"{generic}.{task}", samples=samples,
                                            beta=beta, settings=settings)
            bar.update()
    transplanted = _scores(net, views)
    unchanged = all(transplanted[k] == v for k, v in before_growth.items())
    module = f"{generic}.classification"
    tuned_on = list(g.fine_tune_categories)
    data_ = {c: views["classification"].few(c, g.fine_tune_samples, config.seed + 1)
             for c in tuned_on}
    bar.set_postfix_str(f"fine-tune {module}")
    tuned, report = operations.fine_tune(net, module, data=data_, settings=TaskTrainingSettings(
        num_steps=g.fine_tune_steps, learning_rate=g.fine_tune_learning_rate,
        batch_size=g.fine_tune_batch_size, seed=config.seed))
    bar.update()
    after = _scores(tuned, views)
    routes = {}
    for key, value in transplanted.items():
        category, task_module = key.split(" → ")
        routes[key] = {"before": value, "after": after[key],
                       "change": after[key] - value,
                       "fine_tuned_on": category in tuned_on,
                       "through_fine_tuned_module": task_module == module}
    others = [r["change"] for r in routes.values()
              if r["through_fine_tuned_module"] and not r["fine_tuned_on"]]
    tuned_routes = [r["change"] for r in routes.values() if r["fine_tuned_on"]
                    and r["through_fine_tuned_module"]]
    return {"fine_tuned_module": module, "fine_tuned_on": tuned_on,
            "schedule": {k: report[k] for k in ("num_steps", "learning_rate", "samples")},
            "metric": "error % (classification), pixel accuracy % (segmentation)",
            "transplanting_changed_no_route": unchanged,
            "routes": routes,
            "mean_error_change_other_routes": _mean(others),
            "mean_error_change_fine_tuned_routes": _mean(tuned_routes)}


def results_markdown(results: dict) -> str:
    """The two tables a person reads: the ranking and the forgetting."""
    lines = ["# Growing the transplant net", "",
             "## Choosing the task module by the zero-sample residual", ""]
    for task, r in results["choice"].items():
        lines += [f"### {task} ({r['metric']} after back-distill with "
                  f"{results['config']['growth']['samples']} samples)", "",
                  "| target | candidate (residual order) | residual | β | metric |",
                  "|---|---|---:|---:|---:|"]
        for target, row in r["targets"].items():
            for c in row["candidates"]:
                best = " **best**" if c["task_module"] == row["best"] else ""
                lines.append(f"| {target} | {c['task_module']}{best} | {c['residual']:.3f} | "
                             f"{c['beta']:.2f} | {c['metric']:.1f} |")
        rho = r["spearman_pooled"]
        lines += ["", f"Spearman ρ (residual vs {r['metric']}, sign so that > 0 means the "
                      f"residual orders as the metric): pooled {_fmt(rho)}, mean per target "
                      f"{_fmt(r['spearman_mean'])}; "
                      f"the first choice is the best transplant for "
                      f"{r['first_choice_is_best']} of {r['targets_count']} targets.", ""]
    f = results["forgetting"]
    lines += ["## Fine-tuning a shared task module and forgetting", "",
              f"Transplanting changed no existing route: "
              f"{'yes' if f['transplanting_changed_no_route'] else 'NO'} (without fine-tuning "
              "nothing is forgotten). Then `" + f["fine_tuned_module"] + "` was fine-tuned on "
              f"{', '.join(f['fine_tuned_on'])} ({f['schedule']['num_steps']} steps, "
              f"lr {f['schedule']['learning_rate']}, {f['schedule']['samples']} samples).", "",
              "| route | fine-tuned on | before | after | change |", "|---|---|---:|---:|---:|"]
    for key, r in f["routes"].items():
        lines.append(f"| {key} | {'yes' if r['fine_tuned_on'] else 'no'} | {r['before']:.1f} | "
                     f"{r['after']:.1f} | {r['change']:+.1f} |")
    other, tuned = f["mean_error_change_other_routes"], f["mean_error_change_fine_tuned_routes"]
    lines += ["", "Mean change of the classification error through the fine-tuned module: "
                  f"routes left out {_fmt(other, '+.1f')} points (forgetting), routes "
                  f"fine-tuned on {_fmt(tuned, '+.1f')} points.", ""]
    return "\n".join(lines)


def validate_config(config) -> None:
    """Check a growth config (``nettransplant/configs/net_growth.py``): the main job's fields
    (:func:`nettransplant.experiments.config.validate_config`) and the ``growth`` section.

    ``growth.tasks`` among the tasks, sample counts, steps and the batch size >= 1, the
    fine-tuning rate finite and > 0, the fine-tuned categories among the net's (the
    generic category and the targets; a target only through a grown classification
    module).

    Raises:
      ValueError: one line naming the first bad field and what it must be.
    """
    job_config.validate_config(config)
    grown = check.choices(config, "growth.tasks", tasks.TASKS)
    check.count(config, "growth.samples", 1, check.MAX_SAMPLES)
    check.count(config, "growth.fine_tune_samples", 1, check.MAX_SAMPLES)
    check.count(config, "growth.fine_tune_steps", 1, check.MAX_STEPS)
    check.positive(config, "growth.fine_tune_learning_rate")
    check.count(config, "growth.fine_tune_batch_size", 1, check.MAX_BATCH)
    if len(config.categories) < 2:
        raise ValueError(f"config.categories must hold at least 2 categories (a target is "
                         f"transplanted onto the others' task modules), got "
                         f"{list(config.categories)}")
    routed = [config.generic_category]
    if "classification" in grown:
        routed += list(config.target_categories)
    tuned = check.sequence(config, "growth.fine_tune_categories", unique=True)
    bad = [c for c in tuned if c not in routed]
    if bad:
        raise ValueError(f"config.growth.fine_tune_categories: {bad} have no route through "
                         f"{config.generic_category}.classification; choose from {routed}")


def run(config, workdir: str | Path, progress: bool = True) -> dict:
    """Both studies; writes ``W/growth/results.json`` and ``results.md`` and returns the dict.

    The config is checked first (:func:`validate_config`)."""
    validate_config(config)
    start = time.perf_counter()
    workdir = Path(workdir)
    out = workdir / "growth"
    out.mkdir(parents=True, exist_ok=True)
    check_writable(workdir, out)
    with WorkdirLock(workdir):  # the teachers are shared with the main job
        return _run(config, workdir, out, start, progress)


def _run(config, workdir: Path, out: Path, start: float, progress: bool) -> dict:
    benchmark = benchmarks.make_benchmark(config)
    zoo = TeacherZoo(config, workdir, benchmark, progress)
    names = list(dict.fromkeys([*config.categories, config.generic_category,
                                *config.target_categories]))
    if config.pretrain.num_steps:
        zoo.backbone()
    teachers = {}
    for name in names:
        zoo.category(name)
        teachers[name] = zoo.parts(name)
    settings = TransplantSettings.from_config(config.transplant, seed=config.seed)
    g = config.growth
    n_targets = len(config.target_categories)
    total = (len(g.tasks) * n_targets * (len(config.categories) - 1)
             + n_targets * len(g.tasks) + 1)
    bar = progress_bar(total, "growth", enabled=progress)
    results = {"config": config.to_dict(),
               "teachers": {n: zoo.metrics.get(n, {}) for n in names}}
    results["choice"] = choose_task_modules(config, teachers, benchmark, settings, bar)
    results["forgetting"] = fine_tuning_forgetting(config, teachers, benchmark, settings, bar)
    bar.close()
    results["runtime_s"] = time.perf_counter() - start
    write_atomically(out / "results.json", json.dumps(results, indent=2))
    write_atomically(out / "results.md", results_markdown(results))
    return results
