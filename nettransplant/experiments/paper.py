"""The paper's experiments end to end (the main job): teachers, Exps. 1-3, Table 4, outputs.

:func:`run` is what ``nettransplant reproduce`` calls:

1. the :class:`~nettransplant.experiments.zoo.TeacherZoo` trains or reuses every
   teacher, and all of them join one :class:`~nettransplant.net.TransplantNet`
   (the *zoo net*: ``cat``, ``cat.classification``, ``cat.segmentation``, …);
2. for each of ``config.seeds``, a :class:`Runner` builds each transplant problem
   from the zoo net's modules by id (:func:`nettransplant.net.operations.build_problem`)
   and runs every method at every sample count of the config under the one
   training rule of :mod:`nettransplant.protocol`; a seed re-draws the labelled
   samples, the initialisations, the back-distillation draws and the batch order
   (the teachers are shared by every seed);
3. the results (every seed's cells, their means with 95 % intervals and the
   claims' verdicts, :mod:`nettransplant.evidence`), paper-format tables, plots,
   and the *transplant net* the experiments grew (Exps. 2-3, back-distill, the
   largest sample count, the first seed: the generic category's task modules
   serving every target) are written to the workdir, each file replaced in one
   rename.

The job is resumable and safe to interrupt: it holds ``W/.lock``
(:mod:`~nettransplant.experiments.workdir`), finished teachers are reused, and
every finished cell is kept in ``W/cells`` (:mod:`~nettransplant.experiments.cells`)
and read back by the next run. A cell whose training diverges is recorded as
failed (``results.json`` ``failed_cells``) and the job goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nettransplant import data
from nettransplant.core import modules
from nettransplant.core.adapter import Adapter
from nettransplant.data import benchmarks
from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments import evidence, report
from nettransplant.experiments.config import EXPERIMENTS, validate_config
from nettransplant.experiments.workdir import (
    WorkdirLock,
    atomic_path,
    check_writable,
    use_compilation_cache,
    write_atomically,
)
from nettransplant.experiments.zoo import TeacherZoo, generic_name, stable_hash
from nettransplant.net import operations
from nettransplant.net.graph import ModuleRef, TransplantNet
from nettransplant.runtime import metric_writers, parallel
from nettransplant.runtime.progress import message, progress_bar
from nettransplant.training.loop import NonFiniteError, Trainings, create_train_state
from nettransplant.transplant import problem
from nettransplant.transplant import runs as runs_lib
from nettransplant.transplant.protocol import RESTART_SALT, Protocol
from nettransplant.transplant.step import batch_rows, train_adapter

__all__ = ["EXPERIMENTS", "Runner", "run", "validate_config"]


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # tracing + lowering + XLA compilation, this process
_thread_compile = threading.local()  # the same, per thread (a cell's own compiles)


def _count_compilation(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration
        _thread_compile.seconds = getattr(_thread_compile, "seconds", 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling with XLA so far."""
    return _compile_seconds[0]


def thread_compile_seconds() -> float:
    """Seconds the calling thread has spent tracing, lowering and compiling so far."""
    return getattr(_thread_compile, "seconds", 0.0)


class CellClock:
    """Where one cell's time goes: compile, train (steps run and images computed, every
    attempt included) and evaluation, each in seconds of its own thread.

    ``with clock.phase("train"):`` charges the block's wall time to ``train`` less the
    compiles inside it, which go to ``compile``.
    """

    def __init__(self):
        self.seconds = {"compile": 0.0, "train": 0.0, "eval": 0.0}
        self.steps = self.images = self.attempts = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        start, compiled = time.perf_counter(), thread_compile_seconds()
        try:
            yield
        finally:
            compile_s = thread_compile_seconds() - compiled
            self.seconds["compile"] += compile_s
            self.seconds[name] = (self.seconds.get(name, 0.0)
                                  + time.perf_counter() - start - compile_s)

    def as_dict(self) -> dict:
        return {**{f"{k}_s": v for k, v in self.seconds.items()}, "steps": self.steps,
                "images": self.images, "attempts": self.attempts}


def problem_key(seed: int, experiment: str, target: str):
    """The key of one transplant problem's draws and initialisation under ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), stable_hash(f"{experiment}/{target}"))


def batch_seed(seed: int, n: int) -> int:
    """The seed of a run's batch order: its sample count under the job's ``seed``."""
    return seed * 1_000_003 + n


def batched_runs(config) -> bool:
    """Whether a problem's runs of one method train at once on a runs axis
    (``config.transplant.runs_axis``): ``"batched"``, ``"one_at_a_time"``, or
    ``"auto"`` (default), batched on a GPU or TPU and one at a time on a CPU, where
    one small run already keeps the cores busy (``nettransplant benchmark``
    measures both side by side)."""
    mode = config.transplant.get("runs_axis", "auto")
    if mode == "auto":
        return jax.default_backend() != "cpu"
    return mode == "batched"


# Back-distillation from the baselines' random initialisation instead of the closed-form
# warm start: the same objective, so a reader sees what each part contributes.
RANDOM_INIT = "back-distill-random-init"


def zero_sample_rows(experiment: str) -> tuple[str, ...]:
    """The rows that run with 0 labelled samples: back-distill from its warm start, and
    in Exp. 1's 3-conv adapter also from random initialisation (the paper's start there)."""
    return ("back-distill", RANDOM_INIT) if experiment == "exp1_3conv" else ("back-distill",)


def objective_of(method: str) -> str:
    """The training objective of a row: the method, or back-distill for RANDOM_INIT."""
    return "back-distill" if method == RANDOM_INIT else method


def jacobian_weights(config):
    """The Jacobian-matching baseline's loss weights (``config.jacobian_baseline``)."""
    from nettransplant.transplant.objectives import ObjectiveWeights
    jb = config.get("jacobian_baseline")
    if jb is None:
        return None
    return ObjectiveWeights(task=float(jb.task), jacobian=float(jb.jacobian),
                            output_matching=float(jb.output_matching))


def fig5_count(config) -> int:
    positive = [n for n in config.sample_counts if n > 0]
    return 20 if 20 in positive else (positive[0] if positive else 0)


def table4_segmentation_counts(config) -> list[int]:
    """The paper's Table 4 segmentation uses 10 and 20 samples."""
    chosen = [n for n in config.sample_counts if n in (10, 20)]
    return chosen or [n for n in config.sample_counts if n > 0][:2]


def concurrent_cells(config, mesh: jax.sharding.Mesh) -> int:
    """How many transplant cells train at once, each in its own thread.

    ``config.concurrent_cells`` (default 1) where the adapters train on one
    device of one process: a cell's steps are small, and a second cell fills
    the cores while the first waits on Python or on a sync. 1 on a mesh of
    several devices, whose steps use them all already, and in a multi-process
    run, whose hosts must issue their collectives in one order. Each cell's
    numbers are those it gets alone: it owns its state, data and batch order.
    """
    if mesh.devices.size > 1 or jax.process_count() > 1:
        return 1
    return int(config.get("concurrent_cells", 1))


def num_runs(config) -> int:
    """How many (experiment, category, method, sample count) cells the config runs."""
    counts = list(config.sample_counts)
    labelled = [n for n in counts if n > 0]
    cls, seg = len(problem.CLASSIFICATION_METHODS), len(problem.SEGMENTATION_METHODS)
    cls, seg = cls + 1, seg + 1  # + back-distill from the random initialisation
    per_cls = (0 in counts) + cls * len(labelled)
    per_seg = (0 in counts) + seg * len(labelled)
    per_cls_transfer = cls * len(labelled)
    total = 0
    if "exp1" in config.experiments:
        total += (2 * per_cls + (0 in counts)) * len(config.categories)
    targets = len(config.target_categories)
    if "exp2" in config.experiments:
        total += targets * per_cls_transfer
    if "exp3" in config.experiments:
        total += targets * per_seg
    if "table4" in config.experiments:
        total += targets * (per_cls_transfer + seg * len(table4_segmentation_counts(config)))
    return total


def _once(result: Callable[[], Any]) -> Callable[[], Any]:
    """``result`` called at most once; later calls return (or raise) what it gave."""
    memo: list = []

    def once():
        if not memo:
            try:
                memo.append((True, result()))
            except BaseException as e:  # noqa: B036 - re-raised to every caller
                memo.append((False, e))
        ok, value = memo[0]
        if not ok:
            raise value
        return value
    return once


def _best_fit(task, fits) -> float:
    """The best of a run's attempts' train fits (None: an attempt that diverged)."""
    done = [f for f in fits if f is not None]
    return max(done) if task.higher_is_better else min(done)


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


@dataclasses.dataclass
class _CellRun:
    """One cell's run while it trains: its samples, its kept attempt and its clock."""

    n: int
    fig5: bool
    what: str
    transfer: Any  # its labelled samples (TransferData), None with 0 samples
    reference: float | None  # the teacher's fit of its samples
    clock: CellClock
    params: Any = None
    history: list = dataclasses.field(default_factory=list)
    fits: list = dataclasses.field(default_factory=list)  # train fit of each attempt
    failed: dict | None = None
    log: str = ""  # its metric log's name under the logdir ("" : not logged)


@dataclasses.dataclass
class _Attempt:
    """One training of a run: where it starts, its name and log, and its early end (the
    problem, rate and budget are the run's: :mod:`nettransplant.protocol`)."""

    run: _CellRun
    init: Any
    what: str | None = None
    writer: Any = None
    stop_when: Callable[[Any], bool] | None = None
    check_every: int = 0

    def __post_init__(self):
        self.what = self.what or self.run.what


class Runner:
    """Builds each transplant problem from the zoo net and runs its methods and sample counts.

    Args:
      config: the main job's config.
      net: the zoo net (every teacher, by id).
      benchmark: the data views.
      bar: the stage's progress bar (one update per finished cell).
      store: where finished cells are kept and read back (resuming).
      logdir: where each training's metrics are logged (None: not logged).
      seed: the transplant seed (default ``config.seed``): the labelled samples,
        initialisations, draws and batch order.

    Up to :func:`concurrent_cells` cells train at once (:meth:`submit`); they are
    stored and added to the results in their fixed order, so the job's outputs
    do not depend on how many ran together. :meth:`close` after an error.
    """

    def __init__(self, config, net: TransplantNet, benchmark: benchmarks.Benchmark, bar,
                 store: cells_lib.CellStore, logdir: Path | None = None,
                 seed: int | None = None):
        self.config, self.net, self.benchmark, self.bar = config, net, benchmark, bar
        self.store, self.logdir = store, logdir
        self.seed = int(config.seed if seed is None else seed)
        tc = config.transplant
        self.protocol = Protocol.from_config(tc)
        self.settings = operations.TransplantSettings.from_config(tc, seed=self.seed)
        self.mesh = parallel.mesh_from_config(config.get("mesh"))  # adapters train data parallel
        # The cells in flight, in threads where that helps (concurrent_cells).
        self.trainings = Trainings(concurrent_cells(config, self.mesh))
        self._steps_lock = threading.Lock()  # cells in threads share the step caches
        # One step cache per task: the rate is in the optimiser's state (problem.adam),
        # so restarts at other rates reuse its compiled steps.
        self._steps: dict[str, problem.StepCache] = {}
        self.channels = modules.category_channels(config.model.width)
        self.pad_to = max(tc.batch_size, max(config.sample_counts))
        self.curves: dict = {}
        self.fig5: dict = {}
        # {experiment: {target: back-distillation loss of the warm start / λ0}}: the
        # share of the teacher's pseudo-gradient the best single conv leaves unexplained.
        self.residual: dict = {}
        # {experiment: {target: {"alpha", "beta", "lambda"}}}: each transplant problem's scalars.
        self.scalars: dict = {}
        # {experiment: {target: {method: {n: %}}}}: each run's metric on its own labelled
        # samples, to tell a method that generalises badly from one that has not fit.
        self.train_fit: dict = {}
        # {experiment: {target: {n: %}}}: the teacher's metric on a run's samples; for
        # segmentation the reference its train_fit is held to (problem.fits_samples).
        self.teacher_fit: dict = {}
        # {experiment: {target: {method: {n: [train_fit per attempt]}}}}: the runs that
        # restarted (config.transplant.restarts).
        self.restarts: dict = {}
        # {experiment: {target: {method: {n: metric}}}}: each cell's test metric with its
        # first attempt's parameters, i.e. the same job without restarts.
        self.first_attempt: dict = {}
        # {experiment: {method: {"runs", "fit_first", "fit_kept"}}}: how many runs with
        # labelled samples fit them at their first attempt and with the attempt kept.
        self.fit_rates: dict = {}
        # {experiment: {target: (adapter, params, beta, provenance)}}: back-distill at the
        # largest sample count, for the exported transplant net.
        self.learned: dict = {}
        # Cells whose training diverged: {experiment, category, method, samples, step, message}.
        self.failed: list[dict] = []
        self.cells_run = self.cells_reused = 0
        # {experiment: {method or "problem": {compile_s, train_s, eval_s, io_s, setup_s,
        # steps, images, attempts, runs}}}: where the stage's time went (cells run now).
        self.breakdown: dict = {}

    @staticmethod
    def view_name(experiment: str) -> str:
        return "versus_scenes" if experiment == "table4_classification" else "standard"

    def view(self, experiment: str, task, target: str, split: str):
        """The labelled images of ``target``'s task in ``experiment``: Table 4's
        classification is "target vs the generic modules' random images"
        (:meth:`~nettransplant.data.benchmarks.Benchmark.target_classification`)."""
        if task.name == "segmentation":
            return self.benchmark.segmentation(target, split)
        if experiment == "table4_classification":
            return self.benchmark.target_classification(target, split)
        return self.benchmark.classification(target, split)

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

    def draws(self, protocol: str) -> str:
        """How a problem's back-distillation draws are made: ``config.transplant.exp1_draws``
        for Exp. 1's protocol, ``"randomised"`` for every other."""
        return (self.config.transplant.get("exp1_draws", "randomised") if protocol == "exp1"
                else "randomised")

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
        settings = dataclasses.replace(self.settings, protocol=protocol, lambda0=lambda0,
                                       draws=self.draws(protocol))
        view = self.view(experiment, task, target, "test")
        prob = operations.build_problem(
            self.net.category_ref(target), student, reference, self.adapter(adapter_spec),
            settings=settings, image_size=c.model.image_size,
            key=problem_key(self.seed, experiment, target), beta=beta,
            test_images=data.normalize_images(view.images), test_targets=task.targets(view))
        warm_start, exact = problem.zero_sample_solution(
            prob, ridge=tc.closed_form_ridge, num_draws=tc.closed_form_draws, mesh=self.mesh)
        residual = operations.warm_start_residual(prob, warm_start, lambda0)
        return prob, warm_start, exact, residual

    def _fingerprint(self, experiment: str, adapter_spec, protocol: str, target: str,
                     student: str, reference: str) -> dict:
        """What a cell of this problem depends on, besides its method and sample count."""
        c = self.config
        teachers = sorted({target, student.split(".", 1)[0], reference.split(".", 1)[0]})
        # The draws this problem uses, not the field: changing exp1_draws leaves the other
        # experiments' cells valid, and the default's fingerprints are those of before it.
        transplant = c.transplant.to_dict()
        transplant.pop("exp1_draws", None)
        # How the runs are scheduled, not the field: "auto" means one thing per platform,
        # and one-at-a-time cells keep the fingerprints of before the field.
        transplant.pop("runs_axis", None)
        draws = self.draws(protocol)
        return {"experiment": experiment, "category": target, "seed": self.seed, "data": c.data,
                "data_version": self.benchmark.version, "model": c.model.to_dict(),
                "transplant": transplant, "adapter": list(adapter_spec),
                "protocol": protocol, "student": student, "reference": reference,
                "pad_to": self.pad_to, "view": self.view_name(experiment),
                "jacobian_weights": (None if (w := jacobian_weights(c)) is None
                                     else dataclasses.asdict(w)),
                "teachers": {t: self.net.category(t).provenance.get("params_sha256")
                             for t in teachers},
                **({} if draws == "randomised" else {"draws": draws}),
                **({"runs_axis": "batched"} if batched_runs(c) else {})}

    def run(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
            reference: str, beta: float, counts, curve_key: str):
        """All methods × ``counts`` for one target category; returns ``({method: {n: %}},
        live draw fraction)``. :meth:`submit` and its ``finish()`` in one call."""
        return self.submit(experiment, adapter_spec, protocol, target, student, reference,
                           beta, counts, curve_key)()

    def submit(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
               reference: str, beta: float, counts, curve_key: str
               ) -> Callable[[], tuple[dict, float | None]]:
        """Start all methods × ``counts`` for one target category; returns ``finish()``,
        which adds the cells to the results in their fixed order and returns
        ``({method: {n: %}}, live draw fraction)``.

        Each finished cell is stored (:class:`~nettransplant.experiments.cells.CellStore`)
        and a stored cell is read back instead of run again; the problem itself is
        built only when some cell still has to run. With threads
        (:func:`concurrent_cells`) the problem is built and its cells start now, so
        the problems of several categories overlap; with one, everything happens
        in ``finish()``, one problem in memory at a time.
        """
        spec = (experiment, adapter_spec, protocol, target, student, reference, beta, counts,
                curve_key)
        if self.trainings.workers == 1:
            return lambda: self._finish(self._start(*spec))
        return functools.partial(self._finish, self._start(*spec))

    def _start(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
               reference: str, beta: float, counts, curve_key: str) -> dict:
        """Read back the stored cells, build the problem if a cell has to run, and hand
        those cells to :attr:`trainings`; returns what :meth:`_finish` needs."""
        c = self.config
        problem_spec = self._fingerprint(experiment, adapter_spec, protocol, target, student,
                                         reference)
        task = self.net.task_ref(student).module.task
        cells = []  # (n, method, fig5, name, key, stored cell or what gives it)
        for n in counts:
            for method in problem.methods_for(task) + (RANDOM_INIT,):
                if not (n or method in zero_sample_rows(experiment)):
                    continue
                fig5 = (experiment == "exp1_3conv" and target == c.categories[0]
                        and method in ("back-distill", "direct-learn") and n == fig5_count(c))
                name = f"{method}_n{n}"
                key = cells_lib.fingerprint(self.cell_spec(problem_spec, method, n, fig5,
                                                           task.name))
                cells.append([n, method, fig5, name, key,
                              self.store.load(experiment, target, name, key)])
        to_run = [cell for cell in cells if cell[-1] is None]
        built: dict = {}  # the problem, its warm start, residual and labelled samples
        if to_run or not cells:  # with nothing to run, the problem's residual is still reported
            setup = CellClock()
            with setup.phase("setup"):
                prob, warm_start, exact, residual = self.problem(
                    experiment, adapter_spec, protocol, target, self.net.task_ref(student),
                    self.net.task_ref(reference), beta)
                built.update(problem=prob, warm_start=warm_start, exact=exact, residual=residual)
                # The labelled samples of each count and the teacher's fit of them, made here
                # once for the cells' threads (every method of a count shares them).
                built["transfer"] = {n: self.labelled(prob, experiment, target, n)
                                     for n in sorted({cell[0] for cell in to_run if cell[0]})}
                built["teacher_fit"] = {n: float(problem.teacher_fit(prob, transfer, n))
                                        for n, transfer in built["transfer"].items()}
            self._charge(experiment, "problem", setup.seconds)
        if batched_runs(c):  # a job per method: its cells train together on a runs axis
            for method in dict.fromkeys(cell[1] for cell in to_run):
                group = [cell for cell in to_run if cell[1] == method]
                result = _once(self.trainings.submit(functools.partial(
                    self._run_cells, built, experiment, target, method,
                    [(cell[0], cell[2]) for cell in group], beta)))
                for i, cell in enumerate(group):
                    cell[-1] = functools.partial(lambda r, i: r()[i], result, i)
        else:
            for cell in to_run:
                n, method, fig5 = cell[:3]
                cell[-1] = self.trainings.submit(functools.partial(
                    self._run_cell, built, experiment, target, method, n, fig5, beta))
        return {"experiment": experiment, "target": target, "adapter_spec": adapter_spec,
                "beta": beta, "counts": counts, "curve_key": curve_key, "cells": cells,
                "built": built}

    def _finish(self, started: dict) -> tuple[dict, float | None]:
        """Store each cell that ran and add every cell to the results, in order."""
        experiment, target = started["experiment"], started["target"]
        out: dict = {}
        live = None
        for n, method, fig5, name, key, stored in started["cells"]:
            self.bar.set_postfix_str(f"{experiment} {target} {method} n={n}")
            if callable(stored):  # run now: its result, waited for
                stored = stored()
                saving = time.perf_counter()
                self.store.save(experiment, target, name, key, *stored)
                timing = stored[0].get("timing", {})
                self._charge(experiment, method, {
                    **{k.removesuffix("_s"): v for k, v in timing.items() if k.endswith("_s")},
                    "io": time.perf_counter() - saving},
                    {k: v for k, v in timing.items() if not k.endswith("_s")})
                self.cells_run += 1
            else:
                self.cells_reused += 1
            record, arrays = stored
            live = record["live_draw_fraction"]
            self._absorb(record, arrays, experiment, target, method, n, started["counts"],
                         started["curve_key"], started["adapter_spec"], started["beta"],
                         fig5, out)
            self.bar.update()
        built = started["built"]
        if "problem" in built:
            self.residual.setdefault(experiment, {})[target] = built["residual"]
            live = built["problem"].live_draw_fraction
        return out, live

    def close(self) -> None:
        """Cancel the cells not started and wait for the running ones (after an error)."""
        self.trainings.close()

    def _charge(self, experiment: str, what: str, seconds: dict, counts: dict | None = None
                ) -> None:
        """Add a cell's (or a problem's set-up) seconds and counts to :attr:`breakdown`."""
        row = self.breakdown.setdefault(experiment, {}).setdefault(what, {})
        for k, v in seconds.items():
            row[f"{k}_s"] = row.get(f"{k}_s", 0.0) + float(v)
        for k, v in (counts or {}).items():
            row[k] = row.get(k, 0) + int(v)
        if counts is not None:
            row["runs"] = row.get("runs", 0) + 1

    # The training rule's version (nettransplant.protocol): cells of another rule are
    # other cells, even where the config's numbers agree.
    RULE = 2

    def cell_spec(self, problem_spec: dict, method: str, n: int, fig5: bool,
                  task_name: str) -> dict:
        """What one cell depends on: its problem, method, sample count, whether it
        feeds Fig. 5, and the training rule."""
        return {**problem_spec, "method": method, "samples": n, "fig5": fig5,
                "rule": self.RULE}

    def _run_cell(self, built: dict, experiment: str, target: str, method: str, n: int,
                  fig5: bool, beta: float) -> tuple[dict, dict]:
        """Train and evaluate one cell; returns its ``(record, arrays)`` for the store
        (:meth:`_run_cells` with one cell)."""
        return self._run_cells(built, experiment, target, method, [(n, fig5)], beta)[0]

    def _run_cells(self, built: dict, experiment: str, target: str, method: str,
                   cells: list[tuple[int, bool]], beta: float) -> list[tuple[dict, dict]]:
        """Train and evaluate one method's cells ``[(n, fig5), …]`` of a problem; returns
        each cell's ``(record, arrays)`` for the store, in order.

        Each round of trainings (the first attempts, then each restart of the runs
        still unfit) goes through :meth:`train_runs`: one after another, or as one
        batched computation (``config.transplant.runs_axis``).
        A run that diverges (:class:`~nettransplant.training.NonFiniteError`) is a
        *failed* cell: it keeps the last finite parameters, is evaluated with them
        and is named in ``record["failed"]``; the job goes on.
        """
        prob, warm_start, exact = built["problem"], built["warm_start"], built["exact"]
        task = prob.task
        runs: list[_CellRun] = []
        for n, fig5 in cells:
            what = f"{experiment} {target} {method} n={n}"
            # The teacher on the same samples: a segmentation run's reference
            # (fits_samples), and for classification what the report shows beside a
            # run that did not fit.
            runs.append(_CellRun(n, fig5, what, built["transfer"][n] if n else None,
                                 built["teacher_fit"][n] if n else None, CellClock(),
                                 log=f"{experiment}/{target}_{method}_n{n}"))
        to_train = []
        for run in runs:
            if method == "back-distill" and run.n == 0 and exact:
                run.params, run.history = warm_start, []
            else:
                to_train.append(run)
        writers = [self._writer(run) for run in to_train]
        try:
            # back-distill starts at the closed-form optimum (the library's warm start);
            # every other row, RANDOM_INIT included, at the same random initialisation.
            init = warm_start if method == "back-distill" else prob.adapter_init
            trained = self.train_runs(prob, method, [_Attempt(
                run, init, writer=writer, stop_when=self.fitted(
                    prob, run.transfer, run.n, run.reference),
                check_every=self.protocol.check_every) for run, writer in zip(
                    to_train, writers, strict=True)])
        finally:
            for writer in writers:
                if writer is not None:
                    writer.close()
        for run, (params, history, error) in zip(to_train, trained, strict=True):
            run.params, run.history = params, history
            if error is not None:
                run.failed = {"step": int(error.step), "message": str(error)}
                message(f"failed cell {run.what}: diverged at step {error.step}; kept its "
                        "last finite state and going on")
        for run in runs:
            if run.n:
                with run.clock.phase("eval"):
                    run.fits = [float(problem.training_fit(prob, run.params, run.transfer,
                                                           run.n))]
        first_metric = {}  # the test metric of a run's first attempt, where it restarts
        if self.protocol.restarts:
            restarting = [run for run in runs if run.n and run.failed is None
                          and not self.protocol.fits(task.name, run.fits[0], run.reference)]
            for run in restarting:
                with run.clock.phase("eval"):
                    first_metric[id(run)] = float(problem.evaluate(prob, run.params))
            self._restart_rounds(
                prob, method, restarting,
                jax.random.fold_in(problem_key(self.seed, experiment, target), RESTART_SALT),
                warm_start)
        out = []
        for run in runs:
            with run.clock.phase("eval"):
                metric = float(problem.evaluate(prob, run.params))
            record = {"experiment": experiment, "category": target, "method": method,
                      "samples": run.n, "seed": self.seed, "metric": metric,
                      "task": task.name, "metric_name": task.metric_name,
                      "first_attempt_metric": first_metric.get(id(run), metric),
                      "train_fit": _best_fit(task, run.fits) if run.fits else None,
                      "teacher_fit": run.reference,
                      "attempt_fits": run.fits if run.n and run.failed is None else None,
                      "losses": [h["loss"] for h in run.history], "beta": beta,
                      "scalars": prob.scalars.as_dict(),
                      "warm_start_residual": built["residual"],
                      "live_draw_fraction": prob.live_draw_fraction, "failed": run.failed}
            arrays = {f"params/{k}": v for k, v in cells_lib.flatten(run.params).items()}
            if run.fig5:
                with run.clock.phase("eval"):
                    arrays["fig5"] = np.asarray(problem.hidden_features(prob, run.params))
            record["timing"] = run.clock.as_dict()
            out.append((record, arrays))
        return out

    def _writer(self, run: _CellRun, suffix: str = ""):
        """The metric log of one attempt of ``run`` (None without a logdir):
        ``logdir/<experiment>/<category>_<method>_n<N><suffix>``, one folder per
        experiment."""
        if self.logdir is None or not run.log:
            return None
        return metric_writers.open_writer(self.logdir, run.log + suffix)

    def train_runs(self, prob, method: str, attempts: list[_Attempt]
                   ) -> list[tuple[Any, list, NonFiniteError | None]]:
        """Train ``attempts`` of ``method`` on ``prob``; ``(params, history, error)`` each.

        One after another (:meth:`fit`), or all at once on a runs axis
        (:func:`nettransplant.runs.train_runs`) when :func:`batched_runs` says so; the
        numbers agree within float tolerance. Each attempt's clock gets its time
        (batched: an equal share of the round's), steps and images.
        """
        if not attempts:
            return []
        if not batched_runs(self.config):
            out = []
            for a in attempts:
                try:
                    params, history = self.fit(
                        prob, method, a.run.transfer, a.run.n, a.init, a.what, a.writer,
                        stop_when=a.stop_when, check_every=a.check_every, clock=a.run.clock)
                    out.append((params, history, None))
                except NonFiniteError as e:
                    out.append((e.state.params, [], e))
            return out
        tc = self.config.transplant
        objective = objective_of(method)
        steps = self.steps(prob.task.name)
        shared = CellClock()
        with shared.phase("train"):
            jobs = []
            for a in attempts:
                state = create_train_state(a.init, steps.optimizer)
                jobs.append(runs_lib.Run(
                    state, prob.scalars, a.run.transfer if a.run.n else None,
                    a.run.n, batch_seed(self.seed, a.run.n), tc.num_steps,
                    a.stop_when if a.check_every else None, a.writer, a.what))
            results = runs_lib.train_runs(
                steps.runs(prob.transplant, objective), jobs, prob.frozen,
                batch_size=tc.batch_size,
                draws=prob.cache if objective == "back-distill" else None,
                draws_per_step=tc.draws_per_step, log_every=tc.log_every,
                check_every=attempts[0].check_every, mesh=runs_lib.runs_mesh())
        loop_steps = max(r.steps for r in results)
        for a, r in zip(attempts, results, strict=True):
            for k, v in shared.seconds.items():
                a.run.clock.seconds[k] = a.run.clock.seconds.get(k, 0.0) + v / len(attempts)
            a.run.clock.attempts += 1
            a.run.clock.steps += r.steps
            a.run.clock.images += loop_steps * tc.batch_size if a.run.n else 0
        return [(r.state.params, r.history if r.error is None else [], r.error)
                for r in results]

    def _restart_rounds(self, prob, method: str, runs: list[_CellRun], key, warm_start
                        ) -> None:
        """Retrain ``runs`` of ``method`` that have not fit their samples, a round per
        restart (each round's runs trained together by :meth:`train_runs`), as
        :class:`~nettransplant.protocol.Protocol` says: attempt ``k`` starts from
        ``protocol.start(…, k, key, …)``, the same draw for every method, with the
        first attempt's objective, λ, rate and budget. Updates each run's kept
        ``params`` and ``history`` (the attempt that fits best) and its ``fits``
        (one per attempt, None where one diverged)."""
        task, rule = prob.task, self.protocol
        best = {id(run): (run.fits[0], run.params, run.history) for run in runs}
        for attempt in range(1, rule.restarts + 1):
            unfit = [run for run in runs
                     if not rule.fits(task.name, best[id(run)][0], run.reference)]
            if not unfit:
                break
            init = rule.start(prob.transplant, method, attempt, key, None, warm_start)
            writers = [self._writer(run, f"_restart{attempt}") for run in unfit]
            try:
                trained = self.train_runs(prob, method, [_Attempt(
                    run, init, what=f"{run.what} restart {attempt}", writer=writer,
                    stop_when=self.fitted(prob, run.transfer, run.n, run.reference),
                    check_every=rule.check_every) for run, writer in zip(unfit, writers,
                                                                         strict=True)])
            finally:
                for writer in writers:
                    if writer is not None:
                        writer.close()
            for run, (params, history, error) in zip(unfit, trained, strict=True):
                if error is not None:
                    message(f"{run.what}: restart {attempt} diverged at step {error.step}; "
                            "not kept")
                    run.fits.append(None)
                    continue
                with run.clock.phase("eval"):
                    run.fits.append(float(problem.training_fit(prob, params, run.transfer,
                                                               run.n)))
                if rule.better(task, run.fits[-1], best[id(run)][0]):
                    best[id(run)] = (run.fits[-1], params, history)
        for run in runs:
            _, run.params, run.history = best[id(run)]

    def steps(self, task_name: str) -> problem.StepCache:
        """The steps of ``task_name``'s runs: Adam at the protocol's rate, its rate in
        the optimiser's state (:func:`problem.adam`), so a run at another rate
        (:meth:`fit`'s ``learning_rate``) uses the same compiled steps."""
        with self._steps_lock:
            if task_name not in self._steps:
                self._steps[task_name] = problem.StepCache(
                    problem.adam(self.protocol.rate(task_name)), mesh=self.mesh,
                    weights=jacobian_weights(self.config))
            return self._steps[task_name]

    def fitted(self, prob, transfer, n: int, reference: float | None
               ) -> Callable[[Any], bool] | None:
        """``params → whether they fit the run's n labelled samples``
        (:func:`problem.fits_samples`; a segmentation run against ``reference``), the
        check that ends a run early; None for a zero-sample run (nothing to fit)."""
        if not n:
            return None
        task = prob.task

        def fits(params) -> bool:
            return problem.fits_samples(
                task.name, float(problem.training_fit(prob, params, transfer, n)), reference)
        return fits

    def labelled(self, prob, experiment: str, target: str, n: int):
        """The ``n`` labelled samples of a run (:func:`nettransplant.data.few_shot` of the
        experiment's training view, drawn under the runner's seed) as transfer data."""
        task = prob.task
        shots = data.few_shot(self.view(experiment, task, target, "train"), n, seed=self.seed)
        targets = task.targets(shots).astype(np.int32) \
            if task.name == "segmentation" else task.targets(shots)
        return problem.transfer_data(
            prob, data.normalize_images(shots.images), targets,
            key=jax.random.fold_in(problem_key(self.seed, experiment, target), n),
            pad_to=self.pad_to)

    def fit(self, prob, method: str, transfer, n: int, init, what: str, writer, *,
            steps: problem.StepCache | None = None, learning_rate: float | None = None,
            num_steps: int | None = None, stop_when=None, check_every: int | None = None,
            clock: CellClock | None = None):
        """:func:`nettransplant.problem.fit`, with the cell's name in errors and a metric log.

        ``steps`` / ``num_steps``: another optimiser or budget than the config's
        (:mod:`nettransplant.experiments.fit_probe`); ``learning_rate``: another rate for
        :meth:`steps`' optimiser (same compiled steps); ``stop_when(params)``: checked
        every ``check_every`` steps (default ``config.transplant.num_steps``; 0: never),
        True ends the training there; ``clock``: charged with the training's time,
        steps and images."""
        tc = self.config.transplant
        if n == 0 and objective_of(method) != "back-distill":
            raise ValueError(f"{method} needs labelled samples; only back-distill runs with 0")
        objective = objective_of(method)
        steps = steps or self.steps(prob.task.name)
        check_every = tc.num_steps if check_every is None else check_every
        with clock.phase("train") if clock else contextlib.nullcontext():
            state = create_train_state(init, steps.optimizer)
            if learning_rate is not None:
                state = problem.with_learning_rate(state, learning_rate)
            state, history = train_adapter(
                steps(prob.transplant, objective), state, prob.frozen, prob.scalars,
                num_steps=num_steps or tc.num_steps, data=transfer if n else None,
                num_samples=n, batch_size=tc.batch_size,
                draws=prob.cache if objective == "back-distill" else None,
                draws_per_step=tc.draws_per_step, seed=batch_seed(self.seed, n), progress=False,
                log_every=tc.log_every, writer=writer, what=what, mesh=self.mesh,
                stop_when=stop_when if check_every else None, check_every=check_every)
            steps_run = int(state.step)
        if clock is not None:
            clock.attempts += 1
            clock.steps += steps_run
            clock.images += steps_run * (batch_rows(
                n, tc.batch_size, self.mesh) if n else 0)
        return state.params, history

    def _absorb(self, record: dict, arrays: dict, experiment: str, target: str, method: str,
                n: int, counts, curve_key: str, adapter_spec, beta: float, fig5: bool,
                out: dict) -> None:
        """Add one finished cell (run now or read back) to the job's results."""
        out.setdefault(method, {})[str(n)] = record["metric"]
        self.residual.setdefault(experiment, {})[target] = record["warm_start_residual"]
        # α, β, λ are fixed per transplant problem: every cell of it records the same.
        self.scalars.setdefault(experiment, {})[target] = record["scalars"]
        if n:
            self.train_fit.setdefault(experiment, {}).setdefault(target, {}).setdefault(
                method, {})[str(n)] = record["train_fit"]
        if record.get("teacher_fit") is not None:
            self.teacher_fit.setdefault(experiment, {}).setdefault(target, {})[str(n)] = \
                record["teacher_fit"]
        if record.get("attempt_fits") and len(record["attempt_fits"]) > 1:
            self.restarts.setdefault(experiment, {}).setdefault(target, {}).setdefault(
                method, {})[str(n)] = record["attempt_fits"]
        self.first_attempt.setdefault(experiment, {}).setdefault(target, {}).setdefault(
            method, {})[str(n)] = record["first_attempt_metric"]
        if n:
            fits = record["attempt_fits"] or [record["train_fit"]]
            task_name = record["task"]
            rate = self.fit_rates.setdefault(experiment, {}).setdefault(
                method, {"runs": 0, "fit_first": 0, "fit_kept": 0})
            rate["runs"] += 1
            rate["fit_first"] += self.protocol.fits(task_name, fits[0], record["teacher_fit"])
            rate["fit_kept"] += self.protocol.fits(task_name, record["train_fit"],
                                                   record["teacher_fit"])
        if record["losses"]:
            self.curves.setdefault(curve_key, {}).setdefault(method, {}).setdefault(
                str(n), []).append(record["losses"])
        if fig5:
            self.fig5[method] = arrays["fig5"]
        if record["failed"] is not None:
            self.failed.append({k: record[k] for k in ("experiment", "category", "method",
                                                       "samples")} | record["failed"])
        if method == "back-distill" and n == max(counts):
            params = cells_lib.unflatten({k.split("/", 1)[1]: jax.numpy.asarray(v)
                                          for k, v in arrays.items()
                                          if k.startswith("params/")})
            self.learned.setdefault(experiment, {})[target] = (
                self.adapter(adapter_spec), params, beta, {
                    "operation": "transplant", "experiment": experiment,
                    "method": method, "samples": n, **record["scalars"],
                    "warm_start_residual": record["warm_start_residual"],
                    "live_draw_fraction": record["live_draw_fraction"],
                    "metrics": {record["metric_name"]: record["metric"]}})

    def head_swap(self, student: str, teacher: str, target: str, beta: float) -> dict:
        """Exp. 2's diagnostic: are the two classification heads (fc8) what differs?

        Returns the cosine between the student's and the teacher's fc8 kernels
        and Exp. 2's warm-start residual with the teacher's own fc8 swapped into
        the student's classification module (everything below fc8 stays the
        student's). A residual that falls from near 1 to near 0 with the swap
        says the lower task layers are related and only the heads are not.
        """
        c = self.config
        key = cells_lib.fingerprint({**self._fingerprint("exp2", c.adapters.exp2, "exp2", target,
                                                         student, teacher), "cell": "head_swap"})
        stored = self.store.load("exp2_head_swap", target, "head_swap", key)
        if stored is not None:
            return stored[0]["head_swap"]
        s_ref, t_ref = self.net.task_ref(student), self.net.task_ref(teacher)
        a, b = (np.ravel(np.asarray(ref.params["fc8"]["kernel"])) for ref in (s_ref, t_ref))
        swapped = ModuleRef(s_ref.module, {**s_ref.params, "fc8": t_ref.params["fc8"]})
        self.bar.set_postfix_str(f"exp2 head swap {target}")
        *_, residual = self.problem("exp2", c.adapters.exp2, "exp2", target, swapped, t_ref,
                                    beta)  # Exp. 2's draws
        swap = {"fc8_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                "residual_with_own_head": residual}
        self.store.save("exp2_head_swap", target, "head_swap", key, {"head_swap": swap}, {})
        return swap


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


def transplant_seed(config, runner: Runner, benchmark: benchmarks.Benchmark) -> dict:
    """Every experiment's cells under ``runner``'s seed; returns that seed's results
    (the tables, head swap, fits, residuals, scalars, live draw fractions, restarts,
    failed cells). Cancels the cells not started after an error."""
    results: dict = {}
    live: dict = {}
    try:
        counts = [int(n) for n in config.sample_counts]
        labelled = [n for n in counts if n > 0]
        generic = config.generic_category

        if "exp1" in config.experiments:
            results["exp1"] = {}
            for name, spec in (("1conv", config.adapters.exp1_1conv),
                               ("3conv", config.adapters.exp1_3conv)):
                # Every category's cells are submitted before the first is waited for: the
                # next problem is built while the threads train this one's cells.
                finish = {category: runner.submit(
                    f"exp1_{name}", spec, "exp1", category, f"{category}.classification",
                    f"{category}.classification", 1.0, counts, f"exp1_{name}")
                    for category in config.categories}
                cells = {}
                for category in config.categories:
                    cells[category], live[f"exp1_{name}/{category}"] = finish.pop(category)()
                results["exp1"][name] = with_avg(cells)

        betas: dict = {}

        def transfer(experiment, task, spec, protocol, student_of, source_categories_of, counts_):
            finish = {}
            for category in config.target_categories:
                student = student_of(category)
                beta = betas[experiment, category] = runner.beta(
                    student, source_categories_of(category), category)
                finish[category] = runner.submit(experiment, spec, protocol, category,
                                                 f"{student}.{task}", f"{category}.{task}", beta,
                                                 counts_, experiment)
            cells = {}
            for category in config.target_categories:
                cells[category], live[f"{experiment}/{category}"] = finish.pop(category)()
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
    finally:  # after an error: the cells not started are cancelled
        runner.close()
    results["no_restarts"] = tables_of(config, runner.first_attempt)
    results["live_draw_fraction"] = live
    results["scalars"] = runner.scalars
    results["warm_start_residual"] = {
        e: {**r, "avg": float(np.mean(list(r.values())))} for e, r in runner.residual.items()}
    results["train_fit"] = {e: with_avg(cells) for e, cells in runner.train_fit.items()}
    if runner.teacher_fit:
        results["teacher_fit"] = {e: with_avg({t: {"teacher": by_n} for t, by_n in c.items()})
                                  ["teacher"] for e, c in runner.teacher_fit.items()}
    results["restarts"] = runner.restarts
    results["fit_rates"] = runner.fit_rates
    if runner.failed:
        results["failed_cells"] = [{**f, "seed": runner.seed} for f in runner.failed]
    return results


def tables_of(config, by_experiment: dict) -> dict:
    """``{experiment: {target: {method: {n: v}}}}`` (a Runner's per-cell dicts) in the
    results' table layout: ``exp1 → 1conv/3conv``, ``table4 → classification /
    segmentation``, each ``{method: {n: {category: v, "avg": mean}}}``."""
    out: dict = {}
    for experiment, cells in by_experiment.items():
        table = with_avg(cells)
        if experiment.startswith("exp1_"):
            out.setdefault("exp1", {})[experiment.removeprefix("exp1_")] = table
        elif experiment.startswith("table4_"):
            out.setdefault("table4", {})[experiment.removeprefix("table4_")] = table
        else:
            out[experiment] = table
    return out


def provenance() -> dict:
    """What produced a results file: the package version, the git commit of the source
    tree when it is a checkout (None otherwise; ``"+changes"`` when it has uncommitted
    ones), JAX's version and the devices."""
    import subprocess

    import nettransplant

    root = Path(nettransplant.__file__).resolve().parents[1]
    commit = None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = jax.devices()
    return {"version": nettransplant.__version__, "commit": commit,
            "jax_version": jax.__version__, "platform": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": len(devices),
            "process_count": jax.process_count()}


def run(config, workdir: Path, progress: bool = True) -> dict:
    """Everything; returns the ``results.json`` dict.

    Resumable: finished teachers (``W/teachers``) and transplant cells
    (``W/cells``) are read back, not run again, so a run interrupted anywhere
    and started again ends with the results of an uninterrupted one.

    Raises:
      ValueError: a config field that cannot run (named).
      WorkdirLockedError: another run holds ``W/.lock``.
      PermissionError: the workdir cannot be written (checked before any work).
    """
    validate_config(config)
    start = time.perf_counter()
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
    check_writable(workdir)
    # One run per workdir; the processes of one multi-process run share it, and process 0
    # holds the lock for them all.
    with WorkdirLock(workdir) if parallel.is_primary() else contextlib.nullcontext():
        check_writable(*(workdir / d for d in ("teachers", cells_lib.CELLS_DIR, "logs", "net")))
        if config.get("compilation_cache", True):
            use_compilation_cache(workdir)
        return _run_locked(config, workdir, start, progress)


def _run_locked(config, workdir: Path, start: float, progress: bool) -> dict:
    compiled = compile_seconds()
    benchmark = benchmarks.make_benchmark(config)
    data_done = time.perf_counter()
    zoo = TeacherZoo(config, workdir, benchmark, progress)
    zoo_net = train_teachers(config, zoo, progress)
    teachers_done, teachers_compiled = time.perf_counter(), compile_seconds()
    needed = [c for c in zoo_net.category_modules if not c.startswith("generic_without_")]
    generic_names = {c: generic_name(c) for c in config.target_categories
                     if generic_name(c) in zoo_net.category_modules}

    results: dict = {"teachers": {c: zoo.metrics[c] for c in needed},
                     **({"backbone": zoo.metrics["backbone"]} if "backbone" in zoo.metrics
                        else {}),
                     "generic_modules": {c: zoo.metrics[g] for c, g in generic_names.items()},
                     "config": config.to_dict(), "provenance": provenance()}
    seeds = [int(s) for s in config.seeds]
    bar = progress_bar(num_runs(config) * len(seeds), "transplants", enabled=progress)
    runners = []
    per_seed = {}
    for seed in seeds:
        runner = Runner(config, zoo_net, benchmark, bar, cells_lib.CellStore(workdir),
                        logdir=workdir / "logs" / f"seed{seed}", seed=seed)
        runners.append(runner)
        per_seed[str(seed)] = transplant_seed(config, runner, benchmark)
    bar.close()
    results["seeds"] = seeds
    results["per_seed"] = per_seed
    results.update(evidence.mean_over_seeds(list(per_seed.values())))
    results["intervals"] = evidence.intervals(results, per_seed)
    results["verdicts"] = evidence.verdicts(results, per_seed, evidence.Rule.from_config(config))
    runner = runners[0]  # the first seed's: Fig. 5, the curves, the exported net
    transplants_done = time.perf_counter()
    # Where the time went; compilation is counted inside the stage that triggered it,
    # summed over the threads that compiled (with several, it can exceed the stage's time).
    results["stage_seconds"] = {
        "data": data_done - start, "teachers": teachers_done - data_done,
        "teachers_compile": teachers_compiled - compiled,
        "transplants": transplants_done - teachers_done,
        "transplants_compile": compile_seconds() - teachers_compiled,
        "transplant_cells_run": sum(r.cells_run for r in runners),
        "transplant_cells_reused": sum(r.cells_reused for r in runners),
        "transplant_threads": runner.trainings.workers,
        "transplant_breakdown": evidence.sum_trees([r.breakdown for r in runners])}
    net = product_net(config, zoo_net, runner)
    results["runtime_s"] = time.perf_counter() - start
    write_outputs(config, workdir, results, zoo, runner, net)
    results["stage_seconds"]["outputs"] = time.perf_counter() - transplants_done
    results["runtime_s"] = time.perf_counter() - start
    if parallel.is_primary():  # the final timings, in the same single rename
        write_atomically(workdir / "results.json", json.dumps(results, indent=2))
    return results


def write_outputs(config, workdir: Path, results: dict, zoo: TeacherZoo, runner: Runner,
                  net: TransplantNet | None) -> None:
    """results.json, results.md, the curves (per sample count and per step), Fig. 5 and
    the transplant net ``W/net``."""
    from nettransplant.net import io as net_io
    if net is not None:  # every process: orbax writes collectively
        net_io.export_net(net, workdir / "net", overwrite=True)
    if not parallel.is_primary():  # result files come from process 0
        return
    # Each output replaces its previous version in one rename: a full disk or a kill
    # leaves the last complete version, never half a file.
    write_atomically(workdir / "results.json", json.dumps(results, indent=2))
    write_atomically(workdir / "results.md",
                     report.results_markdown(results) + failed_cells_markdown(results))
    curves: dict[str, Any] = {"teachers": zoo.curves, "transplants": runner.curves}
    write_atomically(workdir / "learning_curves.json", json.dumps(curves))
    with atomic_path(workdir / "learning_curves.png") as path:
        report.plot_learning_curves(curves, path)
    if report.has_tables(results):
        with atomic_path(workdir / "samples.png") as path:
            report.plot_sample_curves(results, path)
    if len(runner.fig5) == 2:
        with atomic_path(workdir / "fig5_pca.png") as path:
            report.plot_fig5(runner.fig5, path,
                             title=f"Exp. 1, 3-conv adapter, {config.categories[0]}, "
                                   f"{fig5_count(config)} samples")


def failed_cells_markdown(results: dict) -> str:
    """A results.md section naming every cell whose training diverged ("" if none)."""
    failed = results.get("failed_cells", [])
    if not failed:
        return ""
    lines = ["", "## Failed cells", "",
             "Training diverged (a non-finite loss or gradient); each cell's numbers above "
             "come from its last finite parameters.", "",
             "| experiment | category | method | samples | step |", "|---|---|---|---|---|"]
    lines += [f"| {f['experiment']} | {f['category']} | {f['method']} | {f['samples']} | "
              f"{f['step']} |" for f in failed]
    return "\n".join(lines) + "\n"
