"""The paper's experiments end to end (the main job): teachers, Exps. 1-3, Table 4, outputs.

:func:`run` is what ``nettransplant reproduce`` calls:

1. the :class:`~nettransplant.experiments.zoo.TeacherZoo` trains or reuses every
   teacher, and all of them join one :class:`~nettransplant.net.TransplantNet`
   (the *zoo net*: ``cat``, ``cat.classification``, ``cat.segmentation``, …);
2. for each of ``config.seeds``, :func:`transplant_seed` says which problems each
   experiment transplants, and a :class:`~nettransplant.experiments.runner.Runner`
   builds each from the zoo net's modules by id
   (:func:`nettransplant.net.operations.build_problem`) and runs every method at
   every sample count of the config under the one training rule of
   :mod:`nettransplant.transplant.protocol` (:mod:`~nettransplant.experiments.cell_training`);
   a seed re-draws the labelled samples, the initialisations, the back-distillation
   draws and the batch order (the teachers are shared by every seed);
3. every finished cell goes to one
   :class:`~nettransplant.experiments.results.Results`, which derives the results
   (every seed's cells, their means with 95 % intervals and the claims' verdicts,
   :mod:`nettransplant.experiments.evidence`); they, paper-format tables, plots,
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
import time
from pathlib import Path

from nettransplant.data import benchmarks
from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments.config import EXPERIMENTS, validate_config
from nettransplant.experiments.results import Results
from nettransplant.experiments.runner import Runner, adapter_of
from nettransplant.experiments.timing import compile_seconds
from nettransplant.experiments.workdir import (
    WorkdirLock,
    check_writable,
    use_compilation_cache,
)
from nettransplant.experiments.zoo import TeacherZoo, generic_name
from nettransplant.net.graph import TransplantNet
from nettransplant.runtime import parallel
from nettransplant.runtime.progress import progress_bar
from nettransplant.transplant import problem

__all__ = ["EXPERIMENTS", "num_runs", "run", "transplant_seed", "validate_config"]


def table4_segmentation_counts(config) -> list[int]:
    """The paper's Table 4 segmentation uses 10 and 20 samples."""
    chosen = [n for n in config.sample_counts if n in (10, 20)]
    return chosen or [n for n in config.sample_counts if n > 0][:2]


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


def product_net(config, zoo_net: TransplantNet, results: Results, seed: int
                ) -> TransplantNet | None:
    """The transplant net the experiments grew under ``seed``: the generic category's
    teacher, and every target's category module connected to its task modules by the
    adapters back-distill learned with the most samples in Exps. 2 (classification) and
    3 (segmentation)."""
    learned = results.learned(seed)
    learned = {e: learned.get(e, {}) for e in ("exp2", "exp3")}
    if not any(learned.values()):
        return None
    generic = config.generic_category
    net = TransplantNet().add_teacher(_parts_of(zoo_net, generic))
    for experiment, task in (("exp2", "classification"), ("exp3", "segmentation")):
        for target, adapter in learned[experiment].items():
            if target not in net.category_modules:
                node = zoo_net.category(target)
                net = net.add_category_module(target, node.module,
                                              zoo_net.category_params(target),
                                              input=node.input, provenance=node.provenance)
            net = net.add_adapter(target, f"{generic}.{task}",
                                  adapter_of(config, adapter.cell.adapter), adapter.params,
                                  beta=adapter.beta, provenance=adapter.provenance)
    return net


def _parts_of(net: TransplantNet, name: str):
    from nettransplant.net.graph import TeacherParts
    return TeacherParts(name, net.category_ref(name),
                        {t.split(".", 1)[1]: net.task_ref(t) for t in
                         net.task_modules_of(name, direct=True)},
                        net.category(name).input, dict(net.category(name).provenance))


def transplant_seed(config, runner: Runner, benchmark: benchmarks.Benchmark) -> None:
    """Every experiment's problems under ``runner``'s seed, in their fixed order; their
    cells go to ``runner.results``. Cancels the cells not started after an error."""
    try:
        counts = [int(n) for n in config.sample_counts]
        labelled = [n for n in counts if n > 0]
        generic = config.generic_category

        if "exp1" in config.experiments:
            for name, spec in (("1conv", config.adapters.exp1_1conv),
                               ("3conv", config.adapters.exp1_3conv)):
                # Every category's cells are submitted before the first is waited for: the
                # next problem is built while the threads train this one's cells.
                finish = [runner.submit(f"exp1_{name}", spec, "exp1", category,
                                        f"{category}.classification",
                                        f"{category}.classification", 1.0, counts)
                          for category in config.categories]
                for done in finish:
                    done()

        betas: dict = {}

        def transfer(experiment, task, spec, protocol, student_of, source_categories_of, counts_):
            finish = []
            for category in config.target_categories:
                student = student_of(category)
                beta = betas[experiment, category] = runner.beta(
                    student, source_categories_of(category), category)
                finish.append(runner.submit(experiment, spec, protocol, category,
                                            f"{student}.{task}", f"{category}.{task}", beta,
                                            counts_))
            for done in finish:
                done()

        if "exp2" in config.experiments:
            transfer("exp2", "classification", config.adapters.exp2, "exp2",
                     lambda c: generic, lambda c: [generic], labelled)
            for c in config.target_categories:
                runner.head_swap(f"{generic}.classification", f"{c}.classification", c,
                                 betas["exp2", c])
        if "exp3" in config.experiments:
            transfer("exp3", "segmentation", config.adapters.exp3, "exp3",
                     lambda c: generic, lambda c: [generic], counts)
        if "table4" in config.experiments:
            transfer("table4_classification", "classification", config.adapters.exp2, "exp2",
                     generic_name, benchmark.leave_one_out_categories, labelled)
            transfer("table4_segmentation", "segmentation", config.adapters.exp3, "exp3",
                     generic_name, benchmark.leave_one_out_categories,
                     table4_segmentation_counts(config))
    finally:  # after an error: the cells not started are cancelled
        runner.close()


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
    results = Results(config)
    results.add_teachers(zoo, zoo_net)
    seeds = [int(s) for s in config.seeds]
    bar = progress_bar(num_runs(config) * len(seeds), "transplants", enabled=progress)
    for seed in seeds:
        runner = Runner(config, zoo_net, benchmark, bar, cells_lib.CellStore(workdir),
                        results=results, logdir=workdir / "logs" / f"seed{seed}", seed=seed)
        transplant_seed(config, runner, benchmark)
    bar.close()
    job = results.job(seeds)
    transplants_done = time.perf_counter()
    # Where the time went; compilation is counted inside the stage that triggered it,
    # summed over the threads that compiled (with several, it can exceed the stage's time).
    job["stage_seconds"] = {
        "data": data_done - start, "teachers": teachers_done - data_done,
        "teachers_compile": teachers_compiled - compiled,
        "transplants": transplants_done - teachers_done,
        "transplants_compile": compile_seconds() - teachers_compiled,
        "transplant_cells_run": results.cells_run(),
        "transplant_cells_reused": results.cells_reused(),
        "transplant_threads": runner.trainings.workers,
        "transplant_breakdown": results.breakdown()}
    net = product_net(config, zoo_net, results, seeds[0])  # the first seed's adapters
    job["runtime_s"] = time.perf_counter() - start
    results.write(workdir, job, net)
    job["stage_seconds"]["outputs"] = time.perf_counter() - transplants_done
    job["runtime_s"] = time.perf_counter() - start
    results.write_json(workdir, job)  # the final timings, in the same single rename
    return job
