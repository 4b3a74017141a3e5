"""The paper's experiments end to end (the main job): teachers, Exps. 1-3, Table 4, outputs.

:func:`run` is what ``python -m launch.reproduce`` calls:

1. the :class:`~nettransplant.experiments.zoo.TeacherZoo` trains or reuses every
   teacher, and all of them join one :class:`~nettransplant.net.TransplantNet`
   (the *zoo net*: ``cat``, ``cat.classification``, ``cat.segmentation``, …);
2. a :class:`Runner` builds each transplant problem from the zoo net's modules
   by id (:func:`nettransplant.net.operations.build_problem`) and runs every
   method at every sample count of the config;
3. the results, paper-format tables, plots, and the *transplant net* the
   experiments grew (Exps. 2-3, back-distill, the largest sample count: the
   generic category's task modules serving every target) are written to the
   workdir.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from nettransplant import data, modules, parallel, problem, report
from nettransplant.adapter import Adapter
from nettransplant.data import benchmarks
from nettransplant.experiments.config import EXPERIMENTS, validate_config
from nettransplant.experiments.zoo import TeacherZoo, generic_name, stable_hash
from nettransplant.net import operations
from nettransplant.net.graph import ModuleRef, TransplantNet
from nettransplant.progress import progress_bar

__all__ = ["EXPERIMENTS", "Runner", "run", "validate_config"]


def problem_key(config, experiment: str, target: str):
    """The key of one transplant problem's draws and initialisation."""
    return jax.random.fold_in(jax.random.key(config.seed), stable_hash(f"{experiment}/{target}"))


def fig5_count(config) -> int:
    positive = [n for n in config.sample_counts if n > 0]
    return 20 if 20 in positive else (positive[0] if positive else 0)


def table4_segmentation_counts(config) -> list[int]:
    """The paper's Table 4 segmentation uses 10 and 20 samples."""
    chosen = [n for n in config.sample_counts if n in (10, 20)]
    return chosen or [n for n in config.sample_counts if n > 0][:2]


def num_runs(config) -> int:
    """How many (experiment, category, method, sample count) cells the config runs."""
    counts = list(config.sample_counts)
    labelled = [n for n in counts if n > 0]
    cls, seg = len(problem.CLASSIFICATION_METHODS), len(problem.SEGMENTATION_METHODS)
    per_cls = (0 in counts) + cls * len(labelled)
    per_seg = (0 in counts) + seg * len(labelled)
    per_cls_transfer = cls * len(labelled)
    total = 0
    if "exp1" in config.experiments:
        total += 2 * len(config.categories) * per_cls
    targets = len(config.target_categories)
    if "exp2" in config.experiments:
        total += targets * per_cls_transfer
    if "exp3" in config.experiments:
        total += targets * per_seg
    if "table4" in config.experiments:
        total += targets * (per_cls_transfer + seg * len(table4_segmentation_counts(config)))
    return total


def with_avg(per_category: dict) -> dict:
    """``{category: {method: {n: v}}}`` → ``{method: {n: {category: v, "avg": mean}}}``."""
    out: dict = {}
    for category, methods in per_category.items():
        for method, cells in methods.items():
            for n, value in cells.items():
                out.setdefault(method, {}).setdefault(n, {})[category] = value
    for cells in out.values():
        for row in cells.values():
            row["avg"] = float(np.mean(list(row.values())))
    return out


class Runner:
    """Builds each transplant problem from the zoo net and runs its methods and sample counts.

    Args:
      config: the main job's config.
      net: the zoo net (every teacher, by id).
      benchmark: the data views.
      bar: the stage's progress bar (one update per finished cell).
    """

    def __init__(self, config, net: TransplantNet, benchmark: benchmarks.Benchmark, bar):
        self.config, self.net, self.benchmark, self.bar = config, net, benchmark, bar
        tc = config.transplant
        self.settings = operations.TransplantSettings.from_config(tc, seed=config.seed)
        self.mesh = parallel.mesh_from_config(config.get("mesh"))  # adapters train data parallel
        self.steps = problem.StepCache(optax.adam(tc.learning_rate), mesh=self.mesh)
        self.channels = modules.category_channels(config.model.width)
        self.pad_to = max(tc.batch_size, max(config.sample_counts))
        self.curves: dict = {}
        self.fig5: dict = {}
        # {experiment: {target: back-distillation loss of the warm start / λ0}}: the
        # share of the teacher's pseudo-gradient the best single conv leaves unexplained.
        self.residual: dict = {}
        # {experiment: {target: {method: {n: %}}}}: each run's metric on its own labelled
        # samples, to tell a method that generalises badly from one that has not fit.
        self.train_fit: dict = {}
        # {experiment: {target: (adapter, params, beta, provenance)}}: back-distill at the
        # largest sample count, for the exported transplant net.
        self.learned: dict = {}

    def adapter(self, spec) -> Adapter:
        num_convs, kernel = spec
        return Adapter(self.channels, num_convs, kernel, reorder_seed=self.config.seed)

    def beta(self, source: str, source_categories, target: str) -> float:
        """β = E_S‖f_S(I)‖ / E_T‖f(I)‖ on unlabelled train images (paper Sec. 3).

        ``source``: the category module feeding the student task module;
        ``target``: the transplanted category's module (ids in the zoo net).
        """
        n = self.config.transplant.beta_images
        images_s = self.benchmark.unlabelled(source_categories, n)
        images_t = self.benchmark.unlabelled([target], n)
        return operations.estimate_beta(self.net.category_ref(source),
                                        data.normalize_images(images_s),
                                        self.net.category_ref(target),
                                        data.normalize_images(images_t))

    def problem(self, experiment: str, adapter_spec, protocol: str, target: str,
                student: ModuleRef, reference: ModuleRef, beta: float):
        """One transplant problem, back-distillation's warm start and its residual.

        Returns ``(problem, warm_start, exact, residual)``; ``residual`` is the
        back-distillation loss of the warm start / λ0.
        """
        c, tc = self.config, self.config.transplant
        task = student.module.task
        lambda0 = (tc.lambda0_segmentation if task.name == "segmentation"
                   else tc.lambda0_classification)
        settings = dataclasses.replace(self.settings, protocol=protocol, lambda0=lambda0)
        view = (self.benchmark.segmentation if task.name == "segmentation"
                else self.benchmark.classification)(target, "test")
        prob = operations.build_problem(
            self.net.category_ref(target), student, reference, self.adapter(adapter_spec),
            settings=settings, image_size=c.model.image_size,
            key=problem_key(c, experiment, target), beta=beta,
            test_images=data.normalize_images(view.images), test_targets=task.targets(view))
        warm_start, exact = problem.zero_sample_solution(
            prob, ridge=tc.closed_form_ridge, num_draws=tc.closed_form_draws, mesh=self.mesh)
        residual = operations.warm_start_residual(prob, warm_start, lambda0)
        return prob, warm_start, exact, residual

    def run(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
            reference: str, beta: float, counts, curve_key: str):
        """All methods × ``counts`` for one target category; returns ``{method: {n: %}}``."""
        c, tc = self.config, self.config.transplant
        prob, warm_start, exact, residual = self.problem(
            experiment, adapter_spec, protocol, target, self.net.task_ref(student),
            self.net.task_ref(reference), beta)
        self.residual.setdefault(experiment, {})[target] = residual
        key = problem_key(c, experiment, target)
        task = prob.task
        pool = (self.benchmark.segmentation if task.name == "segmentation"
                else self.benchmark.classification)(target, "train")
        out: dict = {}
        for n in counts:
            shots = data.few_shot(pool, n, seed=c.seed)
            targets = task.targets(shots).astype(np.int32) if task.name == "segmentation" \
                else task.targets(shots)
            transfer = None
            if n:
                transfer = problem.transfer_data(
                    prob, data.normalize_images(shots.images), targets,
                    key=jax.random.fold_in(key, n), pad_to=self.pad_to)
            for method in problem.methods_for(task):
                if n == 0 and method != "back-distill":
                    continue
                self.bar.set_postfix_str(f"{experiment} {target} {method} n={n}")
                if method == "back-distill" and n == 0 and exact:
                    params, history = warm_start, []
                else:
                    init = warm_start if method == "back-distill" else prob.adapter_init
                    params, history = problem.fit(
                        prob, method, self.steps, data=transfer, num_samples=n, init=init,
                        num_steps=tc.num_steps, batch_size=tc.batch_size,
                        draws_per_step=tc.draws_per_step, seed=c.seed + n,
                        log_every=tc.log_every)
                out.setdefault(method, {})[str(n)] = problem.evaluate(prob, params)
                if n:
                    self.train_fit.setdefault(experiment, {}).setdefault(target, {}).setdefault(
                        method, {})[str(n)] = problem.training_fit(prob, params, transfer, n)
                if history:
                    self.curves.setdefault(curve_key, {}).setdefault(method, {}).setdefault(
                        str(n), []).append([h["loss"] for h in history])
                if experiment == "exp1_3conv" and target == c.categories[0] and \
                        method in ("back-distill", "direct-learn") and n == fig5_count(c):
                    self.fig5[method] = problem.hidden_features(prob, params)
                if method == "back-distill" and n == max(counts):
                    self.learned.setdefault(experiment, {})[target] = (
                        prob.transplant.adapter, params, beta, {
                            "operation": "transplant", "experiment": experiment,
                            "method": method, "samples": n, **prob.scalars.as_dict(),
                            "warm_start_residual": residual,
                            "live_draw_fraction": prob.live_draw_fraction,
                            "metrics": {task.metric_name: out[method][str(n)]}})
                self.bar.update()
        return out, prob.live_draw_fraction

    def head_swap(self, student: str, teacher: str, target: str, beta: float) -> dict:
        """Exp. 2's diagnostic: are the two classification heads (fc8) what differs?

        Returns the cosine between the student's and the teacher's fc8 kernels
        and Exp. 2's warm-start residual with the teacher's own fc8 swapped into
        the student's classification module (everything below fc8 stays the
        student's). A residual that falls from near 1 to near 0 with the swap
        says the lower task layers are related and only the heads are not.
        """
        c = self.config
        s_ref, t_ref = self.net.task_ref(student), self.net.task_ref(teacher)
        a, b = (np.ravel(np.asarray(ref.params["fc8"]["kernel"])) for ref in (s_ref, t_ref))
        swapped = ModuleRef(s_ref.module, {**s_ref.params, "fc8": t_ref.params["fc8"]})
        self.bar.set_postfix_str(f"exp2 head swap {target}")
        *_, residual = self.problem("exp2", c.adapters.exp2, "exp2", target, swapped, t_ref,
                                    beta)  # Exp. 2's draws
        return {"fc8_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                "residual_with_own_head": residual}


def train_teachers(config, zoo: TeacherZoo, progress: bool) -> TransplantNet:
    """Every teacher the config needs, trained or reused, in one zoo net."""
    needed = list(dict.fromkeys([*config.categories, config.generic_category,
                                 *config.target_categories]))
    generic_needed = "table4" in config.experiments
    stage = progress_bar(1 + len(needed) + generic_needed * len(config.target_categories),
                         "teachers", enabled=progress)
    if config.pretrain.num_steps:
        zoo.backbone()
    stage.update()
    net = TransplantNet()
    for category in needed:
        stage.set_postfix_str(category)
        zoo.category(category)
        net = net.add_teacher(zoo.parts(category))
        stage.update()
    if generic_needed:
        for category in config.target_categories:
            stage.set_postfix_str(f"generic without {category}")
            zoo.leave_one_out(category)
            net = net.add_teacher(zoo.parts(generic_name(category)))
            stage.update()
    stage.close()
    return net


def product_net(config, zoo_net: TransplantNet, runner: Runner) -> TransplantNet | None:
    """The transplant net the experiments grew: the generic category's teacher, and every
    target's category module connected to its task modules by the adapters back-distill
    learned with the most samples in Exps. 2 (classification) and 3 (segmentation)."""
    learned = {e: runner.learned.get(e, {}) for e in ("exp2", "exp3")}
    if not any(learned.values()):
        return None
    generic = config.generic_category
    net = TransplantNet().add_teacher(_parts_of(zoo_net, generic))
    for experiment, task in (("exp2", "classification"), ("exp3", "segmentation")):
        for target, (adapter, params, beta, provenance) in learned[experiment].items():
            if target not in net.category_modules:
                node = zoo_net.category(target)
                net = net.add_category_module(target, node.module,
                                              zoo_net.category_params(target),
                                              input=node.input, provenance=node.provenance)
            net = net.add_adapter(target, f"{generic}.{task}", adapter, params, beta=beta,
                                  provenance=provenance)
    return net


def _parts_of(net: TransplantNet, name: str):
    from nettransplant.net.graph import TeacherParts
    return TeacherParts(name, net.category_ref(name),
                        {t.split(".", 1)[1]: net.task_ref(t) for t in
                         net.task_modules_of(name, direct=True)},
                        net.category(name).input, dict(net.category(name).provenance))


def run(config, workdir: Path, progress: bool = True) -> dict:
    """Everything; returns the ``results.json`` dict."""
    validate_config(config)
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    benchmark = benchmarks.make_benchmark(config)
    zoo = TeacherZoo(config, workdir, benchmark, progress)
    zoo_net = train_teachers(config, zoo, progress)
    needed = [c for c in zoo_net.category_modules if not c.startswith("generic_without_")]
    generic_names = {c: generic_name(c) for c in config.target_categories
                     if generic_name(c) in zoo_net.category_modules}

    results: dict = {"teachers": {c: zoo.metrics[c] for c in needed},
                     **({"backbone": zoo.metrics["backbone"]} if "backbone" in zoo.metrics
                        else {}),
                     "generic_modules": {c: zoo.metrics[g] for c, g in generic_names.items()},
                     "config": config.to_dict()}
    live: dict = {}
    bar = progress_bar(num_runs(config), "transplants", enabled=progress)
    runner = Runner(config, zoo_net, benchmark, bar)
    counts = [int(n) for n in config.sample_counts]
    labelled = [n for n in counts if n > 0]
    generic = config.generic_category

    if "exp1" in config.experiments:
        results["exp1"] = {}
        for name, spec in (("1conv", config.adapters.exp1_1conv),
                           ("3conv", config.adapters.exp1_3conv)):
            cells = {}
            for category in config.categories:
                own = f"{category}.classification"
                cells[category], live[f"exp1_{name}/{category}"] = runner.run(
                    f"exp1_{name}", spec, "exp1", category, own, own, 1.0, counts,
                    f"exp1_{name}")
            results["exp1"][name] = with_avg(cells)

    betas: dict = {}

    def transfer(experiment, task, spec, protocol, student_of, source_categories_of, counts_):
        cells = {}
        for category in config.target_categories:
            student = student_of(category)
            beta = betas[experiment, category] = runner.beta(
                student, source_categories_of(category), category)
            cells[category], live[f"{experiment}/{category}"] = runner.run(
                experiment, spec, protocol, category, f"{student}.{task}",
                f"{category}.{task}", beta, counts_, experiment)
        return with_avg(cells)

    if "exp2" in config.experiments:
        results["exp2"] = transfer("exp2", "classification", config.adapters.exp2, "exp2",
                                   lambda c: generic, lambda c: [generic], labelled)
        swaps = {c: runner.head_swap(f"{generic}.classification", f"{c}.classification", c,
                                     betas["exp2", c])
                 for c in config.target_categories}
        results["exp2_head_swap"] = {
            **swaps, "avg": {k: float(np.mean([v[k] for v in swaps.values()]))
                             for k in ("fc8_cosine", "residual_with_own_head")}}
    if "exp3" in config.experiments:
        results["exp3"] = transfer("exp3", "segmentation", config.adapters.exp3, "exp3",
                                   lambda c: generic, lambda c: [generic], counts)
    if "table4" in config.experiments:
        results["table4"] = {
            "classification": transfer(
                "table4_classification", "classification", config.adapters.exp2, "exp2",
                generic_name, benchmark.leave_one_out_categories, labelled),
            "segmentation": transfer(
                "table4_segmentation", "segmentation", config.adapters.exp3, "exp3",
                generic_name, benchmark.leave_one_out_categories,
                table4_segmentation_counts(config)),
        }
    bar.close()
    results["live_draw_fraction"] = live
    results["warm_start_residual"] = {
        e: {**r, "avg": float(np.mean(list(r.values())))} for e, r in runner.residual.items()}
    results["train_fit"] = {e: with_avg(cells) for e, cells in runner.train_fit.items()}
    results["runtime_s"] = time.perf_counter() - start
    write_outputs(config, workdir, results, zoo, runner, product_net(config, zoo_net, runner))
    return results


def write_outputs(config, workdir: Path, results: dict, zoo: TeacherZoo, runner: Runner,
                  net: TransplantNet | None) -> None:
    """results.json, results.md, the curves, Fig. 5 and the transplant net ``W/net``."""
    from nettransplant.net import io as net_io
    if net is not None:  # every process: orbax writes collectively
        net_io.export_net(net, workdir / "net", overwrite=True)
    if not parallel.is_primary():  # result files come from process 0
        return
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "results.md").write_text(report.results_markdown(results))
    curves: dict[str, Any] = {"teachers": zoo.curves, "transplants": runner.curves}
    (workdir / "learning_curves.json").write_text(json.dumps(curves))
    report.plot_learning_curves(curves, workdir / "learning_curves.png")
    if len(runner.fig5) == 2:
        report.plot_fig5(runner.fig5, workdir / "fig5_pca.png",
                         title=f"Exp. 1, 3-conv adapter, {config.categories[0]}, "
                               f"{fig5_count(config)} samples")
