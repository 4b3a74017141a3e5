"""How the main job trains its cells: the one training rule
(:mod:`nettransplant.transplant.protocol`) applied to one method's cells of a transplant
problem, one after another or batched on a runs axis, with restarts, failed runs and each
cell's clock."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments.cells import Cell, CellResult, objective_of
from nettransplant.experiments.timing import CellClock
from nettransplant.experiments.zoo import stable_hash
from nettransplant.runtime import metric_writers
from nettransplant.runtime.progress import message
from nettransplant.training.loop import NonFiniteError, create_train_state
from nettransplant.transplant import problem
from nettransplant.transplant import runs as runs_lib
from nettransplant.transplant.protocol import RESTART_SALT, Protocol
from nettransplant.transplant.step import batch_rows


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


def jacobian_weights(config):
    """The Jacobian-matching baseline's loss weights (``config.jacobian_baseline``)."""
    from nettransplant.transplant.objectives import ObjectiveWeights
    jb = config.get("jacobian_baseline")
    if jb is None:
        return None
    return ObjectiveWeights(task=float(jb.task), jacobian=float(jb.jacobian),
                            output_matching=float(jb.output_matching))


@dataclasses.dataclass(frozen=True)
class ProblemSetup:
    """A transplant problem made ready for its cells: back-distillation's warm start
    (``exact``: the closed form is the optimum), its residual, and per sample count the
    labelled samples (TransferData) and the teacher's fit of them."""

    problem: Any
    warm_start: Any
    exact: bool
    residual: float
    transfer: dict
    teacher_fit: dict


@dataclasses.dataclass
class CellRun:
    """One cell while it trains: its samples, its kept attempt and its clock."""

    cell: Cell
    transfer: Any  # its labelled samples (TransferData), None with 0 samples
    reference: float | None  # the teacher's fit of its samples
    clock: CellClock
    params: Any = None
    history: list = dataclasses.field(default_factory=list)
    fits: list = dataclasses.field(default_factory=list)  # train fit of each attempt
    failed: dict | None = None

    @property
    def n(self) -> int:
        return self.cell.samples


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One training of a run: where it starts, its name, log and early end (the problem,
    rate and budget are the run's: :mod:`nettransplant.transplant.protocol`)."""

    run: CellRun
    init: Any
    what: str
    writer: Any = None
    stop_when: Callable[[Any], bool] | None = None
    check_every: int = 0


def _best_fit(task, fits) -> float:
    """The best of a run's attempts' train fits (None: an attempt that diverged)."""
    done = [f for f in fits if f is not None]
    return max(done) if task.higher_is_better else min(done)


class CellTrainer:
    """Trains the cells of one transplant seed under the config's training rule.

    Args:
      config: the main job's config.
      seed: the transplant seed (batch order, restart draws).
      mesh: the devices the adapters train on, data parallel.
      logdir: where each training's metrics are logged (None: not logged).

    Threads may share it: the step caches are made under a lock.
    """

    def __init__(self, config, seed: int, mesh: jax.sharding.Mesh, logdir: Path | None = None):
        self.config, self.seed, self.mesh, self.logdir = config, seed, mesh, logdir
        self.protocol = Protocol.from_config(config.transplant)
        self._steps_lock = threading.Lock()
        # One step cache per task: the rate is in the optimiser's state (problem.adam),
        # so restarts at other rates reuse its compiled steps.
        self._steps: dict[str, problem.StepCache] = {}

    def steps(self, task_name: str) -> problem.StepCache:
        """The steps of ``task_name``'s runs: Adam at the protocol's rate, its rate in
        the optimiser's state (:func:`problem.adam`)."""
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

    def fit(self, prob, method: str, transfer, n: int, init, what: str, writer=None, *,
            steps: problem.StepCache | None = None, num_steps: int | None = None,
            stop_when=None, check_every: int | None = None, clock: CellClock | None = None):
        """:func:`nettransplant.transplant.problem.fit` with the config's budget, batch size,
        draws and batch order; returns ``(params, history)``.

        ``steps`` / ``num_steps``: another optimiser or budget than the config's
        (:mod:`nettransplant.experiments.fit_probe`); ``stop_when(params)``: checked
        every ``check_every`` steps (default ``config.transplant.num_steps``; 0: never),
        True ends the training there; ``clock``: charged with the training's time,
        steps and images."""
        tc = self.config.transplant
        steps = steps or self.steps(prob.task.name)
        check_every = tc.num_steps if check_every is None else check_every
        with clock.phase("train") if clock else contextlib.nullcontext():
            params, history, steps_run = problem.fit(
                prob, objective_of(method), steps, data=transfer if n else None,
                num_samples=n, init=init, num_steps=num_steps or tc.num_steps,
                batch_size=tc.batch_size, draws_per_step=tc.draws_per_step,
                seed=batch_seed(self.seed, n), log_every=tc.log_every, writer=writer,
                what=what, stop_when=stop_when if check_every else None,
                check_every=check_every)
        if clock is not None:
            clock.attempts += 1
            clock.steps += steps_run
            clock.images += steps_run * (batch_rows(
                n, tc.batch_size, steps.mesh) if n else 0)
        return params, history

    def _writer(self, run: CellRun, suffix: str = ""):
        """The metric log of one attempt of ``run`` (None without a logdir):
        ``logdir/<experiment>/<category>_<method>_n<N><suffix>``."""
        if self.logdir is None:
            return None
        return metric_writers.open_writer(self.logdir, run.cell.log + suffix)

    def train_runs(self, prob, method: str, attempts: list[Attempt]
                   ) -> list[tuple[Any, list, NonFiniteError | None]]:
        """Train ``attempts`` of ``method`` on ``prob``; ``(params, history, error)`` each.

        One after another (:meth:`fit`), or all at once on a runs axis
        (:func:`nettransplant.transplant.runs.train_runs`) when :func:`batched_runs` says so; the
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

    def _round(self, prob, method: str, runs: list[CellRun], init, suffix: str = "",
               what: str = "") -> list[tuple[Any, list, NonFiniteError | None]]:
        """One round of :meth:`train_runs`: every run of ``runs`` from ``init``, each with
        its own metric log (``suffix``) and early end."""
        writers = [self._writer(run, suffix) for run in runs]
        try:
            return self.train_runs(prob, method, [Attempt(
                run, init, run.cell.what + what, writer=writer,
                stop_when=self.fitted(prob, run.transfer, run.n, run.reference),
                check_every=self.protocol.check_every)
                for run, writer in zip(runs, writers, strict=True)])
        finally:
            for writer in writers:
                if writer is not None:
                    writer.close()

    def restart_rounds(self, prob, method: str, runs: list[CellRun], key, warm_start
                       ) -> None:
        """Retrain ``runs`` of ``method`` that have not fit their samples, a round per
        restart (each round's runs trained together by :meth:`train_runs`), as
        :class:`~nettransplant.transplant.protocol.Protocol` says: attempt ``k`` starts from
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
            trained = self._round(prob, method, unfit, init, f"_restart{attempt}",
                                  f" restart {attempt}")
            for run, (params, history, error) in zip(unfit, trained, strict=True):
                if error is not None:
                    message(f"{run.cell.what}: restart {attempt} diverged at step "
                            f"{error.step}; not kept")
                    run.fits.append(None)
                    continue
                with run.clock.phase("eval"):
                    run.fits.append(float(problem.training_fit(prob, params, run.transfer,
                                                               run.n)))
                if rule.better(task, run.fits[-1], best[id(run)][0]):
                    best[id(run)] = (run.fits[-1], params, history)
        for run in runs:
            _, run.params, run.history = best[id(run)]

    def run_cells(self, setup: ProblemSetup, cells: list[Cell], beta: float
                  ) -> list[CellResult]:
        """Train and evaluate one method's ``cells`` of a problem; their results, in order.

        Each round of trainings (the first attempts, then each restart of the runs
        still unfit) goes through :meth:`train_runs`: one after another, or as one
        batched computation (``config.transplant.runs_axis``).
        A run that diverges (:class:`~nettransplant.training.loop.NonFiniteError`) is a
        *failed* cell: it keeps the last finite parameters, is evaluated with them
        and is named in its ``failed``; the job goes on.
        """
        prob, warm_start = setup.problem, setup.warm_start
        task, method = prob.task, cells[0].method
        experiment, target = cells[0].experiment, cells[0].category
        # The teacher on the same samples: a segmentation run's reference (fits_samples),
        # and for classification what the report shows beside a run that did not fit.
        runs = [CellRun(cell, setup.transfer[cell.samples] if cell.samples else None,
                        setup.teacher_fit[cell.samples] if cell.samples else None,
                        CellClock()) for cell in cells]
        to_train = []
        for run in runs:
            if method == "back-distill" and run.n == 0 and setup.exact:
                run.params, run.history = warm_start, []
            else:
                to_train.append(run)
        # back-distill starts at the closed-form optimum (the library's warm start);
        # every other row, RANDOM_INIT included, at the same random initialisation.
        init = warm_start if method == "back-distill" else prob.adapter_init
        trained = self._round(prob, method, to_train, init)
        for run, (params, history, error) in zip(to_train, trained, strict=True):
            run.params, run.history = params, history
            if error is not None:
                run.failed = {"step": int(error.step), "message": str(error)}
                message(f"failed cell {run.cell.what}: diverged at step {error.step}; kept "
                        "its last finite state and going on")
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
            self.restart_rounds(
                prob, method, restarting,
                jax.random.fold_in(problem_key(self.seed, experiment, target), RESTART_SALT),
                warm_start)
        out = []
        for run in runs:
            with run.clock.phase("eval"):
                metric = float(problem.evaluate(prob, run.params))
            features = None
            if run.cell.fig5:
                with run.clock.phase("eval"):
                    features = np.asarray(problem.hidden_features(prob, run.params))
            out.append(CellResult(
                run.cell, task.name, task.metric_name, metric,
                first_metric.get(id(run), metric),
                _best_fit(task, run.fits) if run.fits else None, run.reference,
                tuple(run.fits) if run.n and run.failed is None else None,
                tuple(h["loss"] for h in run.history), beta, prob.scalars.as_dict(),
                setup.residual, prob.live_draw_fraction, run.failed, run.clock.as_dict(),
                cells_lib.flatten(run.params), features))
        return out

