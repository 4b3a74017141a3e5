"""The main job's scheduler: builds each transplant problem from the zoo net, decides which
of its cells still have to run, hands them to threads, and gives every finished cell to
the :class:`~nettransplant.experiments.results.Results`."""

from __future__ import annotations

import dataclasses
import functools
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
from nettransplant.experiments.cell_training import (
    CellTrainer,
    ProblemSetup,
    batched_runs,
    jacobian_weights,
    problem_key,
)
from nettransplant.experiments.cells import RANDOM_INIT, Cell, CellResult
from nettransplant.experiments.results import ProblemResult, Results
from nettransplant.experiments.timing import CellClock
from nettransplant.net import operations
from nettransplant.net.graph import ModuleRef, TransplantNet
from nettransplant.runtime import parallel
from nettransplant.training.loop import Trainings
from nettransplant.transplant import problem


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


def adapter_of(config, spec) -> Adapter:
    """The adapter of ``spec`` = (convs, kernel) at the config's width."""
    num_convs, kernel = spec
    return Adapter(modules.category_channels(config.model.width), num_convs, kernel,
                   reorder_seed=config.seed)


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


@dataclasses.dataclass(frozen=True)
class _Started:
    """A problem's cells on their way: each with its result, or what gives it."""

    experiment: str
    target: str
    seed: int
    pending: tuple[tuple[Cell, Any], ...]
    setup: ProblemSetup | None
    setup_seconds: dict | None


class Runner:
    """Builds each transplant problem from the zoo net and schedules its cells.

    Args:
      config: the main job's config.
      net: the zoo net (every teacher, by id).
      benchmark: the data views.
      bar: the stage's progress bar (one update per finished cell).
      store: where finished cells are kept and read back (resuming).
      results: where every finished cell goes (default: a new
        :class:`~nettransplant.experiments.results.Results`).
      logdir: where each training's metrics are logged (None: not logged).
      seed: the transplant seed (default ``config.seed``): the labelled samples,
        initialisations, draws and batch order.

    Up to :func:`concurrent_cells` cells train at once (:meth:`submit`); they are
    stored and handed to :attr:`results` in their fixed order, so the job's outputs
    do not depend on how many ran together. :meth:`close` after an error.
    """

    # The training rule's version (nettransplant.transplant.protocol): cells of another rule are
    # other cells, even where the config's numbers agree.
    RULE = 2

    def __init__(self, config, net: TransplantNet, benchmark: benchmarks.Benchmark, bar,
                 store: cells_lib.CellStore, *, results: Results | None = None,
                 logdir: Path | None = None, seed: int | None = None):
        self.config, self.net, self.benchmark, self.bar = config, net, benchmark, bar
        self.store = store
        self.results = results if results is not None else Results(config)
        self.seed = int(config.seed if seed is None else seed)
        self.settings = operations.TransplantSettings.from_config(config.transplant,
                                                                  seed=self.seed)
        self.mesh = parallel.mesh_from_config(config.get("mesh"))  # adapters train data parallel
        self.trainer = CellTrainer(config, self.seed, self.mesh, logdir)
        # The cells in flight, in threads where that helps (concurrent_cells).
        self.trainings = Trainings(concurrent_cells(config, self.mesh))
        self.pad_to = max(config.transplant.batch_size, max(config.sample_counts))

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
            self.net.category_ref(target), student, reference, adapter_of(c, adapter_spec),
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

    def cell_spec(self, problem_spec: dict, method: str, n: int, fig5: bool) -> dict:
        """What one cell depends on: its problem, method, sample count, whether it
        feeds Fig. 5, and the training rule."""
        return {**problem_spec, "method": method, "samples": n, "fig5": fig5,
                "rule": self.RULE}

    def cells(self, experiment: str, adapter_spec, target: str, task, counts,
              problem_spec: dict) -> list[Cell]:
        """The cells of one problem in their fixed order: every method (and back-distill
        from the random initialisation) at each of ``counts``, only back-distill rows
        with 0 samples (:func:`~nettransplant.experiments.cells.zero_sample_rows`)."""
        c = self.config
        out = []
        for n in counts:
            for method in problem.methods_for(task) + (RANDOM_INIT,):
                if not (n or method in cells_lib.zero_sample_rows(experiment)):
                    continue
                fig5 = (experiment == "exp1_3conv" and target == c.categories[0]
                        and method in ("back-distill", "direct-learn")
                        and n == cells_lib.fig5_count(c))
                out.append(Cell(
                    experiment, target, method, n, self.seed, tuple(adapter_spec), fig5,
                    exported=method == "back-distill" and n == max(counts),
                    key=cells_lib.fingerprint(self.cell_spec(problem_spec, method, n, fig5))))
        return out

    def run(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
            reference: str, beta: float, counts) -> list[CellResult]:
        """All methods × ``counts`` for one target category; returns their results.
        :meth:`submit` and its ``finish()`` in one call."""
        return self.submit(experiment, adapter_spec, protocol, target, student, reference,
                           beta, counts)()

    def submit(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
               reference: str, beta: float, counts) -> Callable[[], list[CellResult]]:
        """Start all methods × ``counts`` for one target category; returns ``finish()``,
        which stores the cells that ran, hands the problem's cells to :attr:`results`
        in their fixed order and returns them.

        A stored cell is read back instead of run again; the problem itself is
        built only when some cell still has to run. With threads
        (:func:`concurrent_cells`) the problem is built and its cells start now, so
        the problems of several categories overlap; with one, everything happens
        in ``finish()``, one problem in memory at a time.
        """
        spec = (experiment, adapter_spec, protocol, target, student, reference, beta, counts)
        if self.trainings.workers == 1:
            return lambda: self._finish(self._start(*spec))
        return functools.partial(self._finish, self._start(*spec))

    def _start(self, experiment: str, adapter_spec, protocol: str, target: str, student: str,
               reference: str, beta: float, counts) -> _Started:
        """Read back the stored cells, build the problem if a cell has to run, and hand
        those cells to :attr:`trainings`."""
        problem_spec = self._fingerprint(experiment, adapter_spec, protocol, target, student,
                                         reference)
        task = self.net.task_ref(student).module.task
        cells = self.cells(experiment, adapter_spec, target, task, counts, problem_spec)
        pending: dict[Cell, Any] = {cell: self.store.load_result(cell) for cell in cells}
        to_run = [cell for cell in cells if pending[cell] is None]
        setup, seconds = None, None
        if to_run or not cells:  # with nothing to run, the problem's residual is still reported
            clock = CellClock()
            with clock.phase("setup"):
                prob, warm_start, exact, residual = self.problem(
                    experiment, adapter_spec, protocol, target, self.net.task_ref(student),
                    self.net.task_ref(reference), beta)
                # The labelled samples of each count and the teacher's fit of them, made here
                # once for the cells' threads (every method of a count shares them).
                transfer = {n: self.labelled(prob, experiment, target, n)
                            for n in sorted({cell.samples for cell in to_run if cell.samples})}
                setup = ProblemSetup(prob, warm_start, exact, residual, transfer,
                                     {n: float(problem.teacher_fit(prob, t, n))
                                      for n, t in transfer.items()})
            seconds = clock.seconds
        if batched_runs(self.config):  # a job per method: its cells train together on a runs axis
            for method in dict.fromkeys(cell.method for cell in to_run):
                group = [cell for cell in to_run if cell.method == method]
                result = _once(self.trainings.submit(functools.partial(
                    self._run_cells, setup, group, beta)))
                for i, cell in enumerate(group):
                    pending[cell] = functools.partial(lambda r, i: r()[i], result, i)
        else:
            for cell in to_run:
                pending[cell] = self.trainings.submit(functools.partial(
                    lambda cell: self._run_cells(setup, [cell], beta)[0], cell))
        return _Started(experiment, target, self.seed, tuple(pending.items()), setup, seconds)

    def _run_cells(self, setup: ProblemSetup, cells: list[Cell], beta: float
                   ) -> list[CellResult]:
        """One training job of :attr:`trainings`: one method's ``cells`` of a problem
        (:meth:`CellTrainer.run_cells`)."""
        return self.trainer.run_cells(setup, cells, beta)

    def _finish(self, started: _Started) -> list[CellResult]:
        """Store each cell that ran and hand the problem's cells to :attr:`results`."""
        done = []
        for cell, pending in started.pending:
            self.bar.set_postfix_str(cell.what)
            if callable(pending):  # run now: its result, waited for
                result = pending()
                saving = time.perf_counter()
                self.store.save_result(result)
                result = dataclasses.replace(result, store_s=time.perf_counter() - saving)
            else:
                result = pending
            done.append(result)
            self.bar.update()
        setup = started.setup
        self.results.add(ProblemResult(
            started.experiment, started.target, started.seed, tuple(done),
            residual=None if setup is None else setup.residual,
            live_draw_fraction=None if setup is None else setup.problem.live_draw_fraction,
            setup_seconds=started.setup_seconds))
        return done

    def close(self) -> None:
        """Cancel the cells not started and wait for the running ones (after an error)."""
        self.trainings.close()

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

    def head_swap(self, student: str, teacher: str, target: str, beta: float) -> dict:
        """Exp. 2's diagnostic: are the two classification heads (fc8) what differs?

        Returns the cosine between the student's and the teacher's fc8 kernels
        and Exp. 2's warm-start residual with the teacher's own fc8 swapped into
        the student's classification module (everything below fc8 stays the
        student's), and hands it to :attr:`results`. A residual that falls from near
        1 to near 0 with the swap says the lower task layers are related and only
        the heads are not.
        """
        c = self.config
        key = cells_lib.fingerprint({**self._fingerprint("exp2", c.adapters.exp2, "exp2", target,
                                                         student, teacher), "cell": "head_swap"})
        stored = self.store.load("exp2_head_swap", target, "head_swap", key)
        if stored is not None:
            swap = stored[0]["head_swap"]
        else:
            s_ref, t_ref = self.net.task_ref(student), self.net.task_ref(teacher)
            a, b = (np.ravel(np.asarray(ref.params["fc8"]["kernel"])) for ref in (s_ref, t_ref))
            swapped = ModuleRef(s_ref.module, {**s_ref.params, "fc8": t_ref.params["fc8"]})
            self.bar.set_postfix_str(f"exp2 head swap {target}")
            *_, residual = self.problem("exp2", c.adapters.exp2, "exp2", target, swapped,
                                        t_ref, beta)  # Exp. 2's draws
            swap = {"fc8_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                    "residual_with_own_head": residual}
            self.store.save("exp2_head_swap", target, "head_swap", key, {"head_swap": swap}, {})
        self.results.add_head_swap(self.seed, target, swap)
        return swap
