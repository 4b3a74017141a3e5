"""The main job's results: one accumulator that the runners hand every finished cell,
problem and head swap to, and the teachers' metrics; it derives ``results.json`` and
writes the job's outputs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments import evidence, report
from nettransplant.experiments.cells import CellResult
from nettransplant.experiments.workdir import atomic_path, write_atomically
from nettransplant.experiments.zoo import TeacherZoo, generic_name
from nettransplant.net.graph import TransplantNet
from nettransplant.runtime import parallel
from nettransplant.transplant.protocol import Protocol


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


def tables_of(by_experiment: dict) -> dict:
    """``{experiment: {target: {method: {n: v}}}}`` in the results' table layout:
    ``exp1 → 1conv/3conv``, ``table4 → classification / segmentation``, each
    ``{method: {n: {category: v, "avg": mean}}}``."""
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


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    """One transplant problem's finished cells, in their fixed order.

    ``residual`` / ``live_draw_fraction``: the problem's own where it was built (a cell
    had to run), else None and each cell's record holds them; ``setup_seconds``: the
    time building it took (None: not built).
    """

    experiment: str
    category: str
    seed: int
    cells: tuple[CellResult, ...]
    residual: float | None = None
    live_draw_fraction: float | None = None
    setup_seconds: Mapping[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class LearnedAdapter:
    """A back-distill adapter the transplant net exports: its cell, parameters, β and
    provenance."""

    cell: cells_lib.Cell
    params: Any
    beta: float
    provenance: dict


def _nest(tree: dict, *keys):
    for key in keys:
        tree = tree.setdefault(key, {})
    return tree


class Results:
    """Everything the main job found, collected as it finishes.

    The teachers' metrics (:meth:`add_teachers`), every problem's cells
    (:meth:`add`) and Exp. 2's head swaps (:meth:`add_head_swap`) go in; each
    seed's results (:meth:`of_seed`), the job's (:meth:`job`), the learning curves,
    Fig. 5's features and the exported adapters come out, derived from them in the
    order they were added.
    """

    def __init__(self, config):
        self.config = config
        self.protocol = Protocol.from_config(config.transplant)
        self.header: dict = {}
        self.teacher_curves: dict = {}
        self.problems: list[ProblemResult] = []
        self.head_swaps: dict[int, dict] = {}

    def add_teachers(self, zoo: TeacherZoo, zoo_net: TransplantNet) -> None:
        """The teachers', the backbone's and the leave-one-out modules' metrics, the
        config and the provenance (the head of ``results.json``), and the teachers'
        learning curves."""
        needed = [c for c in zoo_net.category_modules if not c.startswith("generic_without_")]
        generic_names = {c: generic_name(c) for c in self.config.target_categories
                         if generic_name(c) in zoo_net.category_modules}
        self.header = {"teachers": {c: zoo.metrics[c] for c in needed},
                       **({"backbone": zoo.metrics["backbone"]} if "backbone" in zoo.metrics
                          else {}),
                       "generic_modules": {c: zoo.metrics[g] for c, g in generic_names.items()},
                       "config": self.config.to_dict(), "provenance": provenance()}
        self.teacher_curves = zoo.curves

    def add(self, done: ProblemResult) -> None:
        """A problem's finished cells. Only the parameters the outputs need are kept:
        the exported adapters' and Fig. 5's cells'."""
        cells = tuple(r if r.cell.exported or r.cell.fig5
                      else dataclasses.replace(r, params=None, features=None)
                      for r in done.cells)
        self.problems.append(dataclasses.replace(done, cells=cells))

    def add_head_swap(self, seed: int, category: str, swap: dict) -> None:
        """Exp. 2's head-swap diagnostic of ``category`` (:meth:`Runner.head_swap`)."""
        self.head_swaps.setdefault(seed, {})[category] = swap

    def _problems(self, seed: int) -> list[ProblemResult]:
        return [p for p in self.problems if p.seed == seed]

    def _cells(self, seed: int) -> list[CellResult]:
        return [r for p in self._problems(seed) for r in p.cells]

    def by_cell(self, seed: int, field: str) -> dict:
        """``{experiment: {target: {method: {n: value}}}}`` of a CellResult ``field``
        over the seed's cells (``train_fit``: those with labelled samples; ``metric``:
        every problem, one without cells too)."""
        out: dict = {}
        for p in self._problems(seed):
            if field == "metric":
                _nest(out, p.experiment, p.category)
            for r in p.cells:
                c = r.cell
                if field != "train_fit" or c.samples:
                    _nest(out, c.experiment, c.category, c.method)[str(c.samples)] = \
                        getattr(r, field)
        return out

    def of_seed(self, seed: int) -> dict:
        """One seed's results: the tables, head swap, fits, residuals, scalars, live draw
        fractions, restarts, failed cells."""
        out: dict = {}
        for name, table in tables_of(self.by_cell(seed, "metric")).items():
            out[name] = table
            if name == "exp2" and seed in self.head_swaps:
                swaps = self.head_swaps[seed]
                out["exp2_head_swap"] = {
                    **swaps, "avg": {k: float(np.mean([v[k] for v in swaps.values()]))
                                     for k in ("fc8_cosine", "residual_with_own_head")}}
        out["no_restarts"] = tables_of(self.by_cell(seed, "first_attempt_metric"))
        live, scalars, residual, teacher_fit, restarts = {}, {}, {}, {}, {}
        fit_rates: dict = {}
        failed = []
        for p in self._problems(seed):
            for r in p.cells:
                c = r.cell
                live[f"{p.experiment}/{p.category}"] = r.live_draw_fraction
                residual.setdefault(p.experiment, {})[p.category] = r.warm_start_residual
                # α, β, λ are fixed per transplant problem: every cell of it records the same.
                scalars.setdefault(p.experiment, {})[p.category] = r.scalars
                if r.teacher_fit is not None:
                    _nest(teacher_fit, p.experiment, p.category)[str(c.samples)] = r.teacher_fit
                if r.attempt_fits and len(r.attempt_fits) > 1:
                    _nest(restarts, p.experiment, p.category, c.method)[str(c.samples)] = \
                        list(r.attempt_fits)
                if c.samples:
                    fits = r.attempt_fits or [r.train_fit]
                    rate = _nest(fit_rates, p.experiment).setdefault(
                        c.method, {"runs": 0, "fit_first": 0, "fit_kept": 0})
                    rate["runs"] += 1
                    rate["fit_first"] += self.protocol.fits(r.task, fits[0], r.teacher_fit)
                    rate["fit_kept"] += self.protocol.fits(r.task, r.train_fit, r.teacher_fit)
                if r.failed is not None:
                    failed.append({"experiment": c.experiment, "category": c.category,
                                   "method": c.method, "samples": c.samples} | dict(r.failed))
            if p.residual is not None:
                residual.setdefault(p.experiment, {})[p.category] = p.residual
                live[f"{p.experiment}/{p.category}"] = p.live_draw_fraction
        out["live_draw_fraction"] = live
        out["scalars"] = scalars
        out["warm_start_residual"] = {
            e: {**r, "avg": float(np.mean(list(r.values())))} for e, r in residual.items()}
        out["train_fit"] = {e: with_avg(t) for e, t in self.by_cell(seed, "train_fit").items()}
        if teacher_fit:
            out["teacher_fit"] = {e: with_avg({t: {"teacher": by_n} for t, by_n in c.items()})
                                  ["teacher"] for e, c in teacher_fit.items()}
        out["restarts"] = restarts
        out["fit_rates"] = fit_rates
        if failed:
            out["failed_cells"] = [{**f, "seed": seed} for f in failed]
        return out

    def job(self, seeds: list[int]) -> dict:
        """``results.json`` but its timings: the head, every seed's results, their means
        with intervals and the claims' verdicts (:mod:`nettransplant.experiments.evidence`)."""
        per_seed = {str(seed): self.of_seed(seed) for seed in seeds}
        out = {**self.header, "seeds": seeds, "per_seed": per_seed}
        out.update(evidence.mean_over_seeds(list(per_seed.values())))
        out["intervals"] = evidence.intervals(out, per_seed)
        out["verdicts"] = evidence.verdicts(out, per_seed, evidence.Rule.from_config(self.config))
        return out

    def curves(self, seed: int) -> dict:
        """``{experiment: {method: {n: [losses of each cell]}}}`` of the seed's cells."""
        out: dict = {}
        for r in self._cells(seed):
            if r.losses:
                c = r.cell
                _nest(out, c.experiment, c.method).setdefault(str(c.samples), []).append(
                    list(r.losses))
        return out

    def fig5(self, seed: int) -> dict:
        """``{method: hidden features}`` of the seed's Fig. 5 cells."""
        return {r.cell.method: r.features for r in self._cells(seed) if r.cell.fig5}

    def learned(self, seed: int) -> dict[str, dict[str, LearnedAdapter]]:
        """``{experiment: {target: LearnedAdapter}}``: back-distill at each problem's
        largest sample count, for the exported transplant net."""
        out: dict = {}
        for r in self._cells(seed):
            c = r.cell
            if not c.exported:
                continue
            params = cells_lib.unflatten({k: jax.numpy.asarray(v) for k, v in r.params.items()})
            out.setdefault(c.experiment, {})[c.category] = LearnedAdapter(
                c, params, r.beta, {
                    "operation": "transplant", "experiment": c.experiment,
                    "method": c.method, "samples": c.samples, **r.scalars,
                    "warm_start_residual": r.warm_start_residual,
                    "live_draw_fraction": r.live_draw_fraction,
                    "metrics": {r.metric_name: r.metric}})
        return out

    def breakdown(self) -> dict:
        """``{experiment: {method or "problem": {compile_s, train_s, eval_s, io_s,
        setup_s, steps, images, attempts, runs}}}``: where the transplant stage's time
        went, summed over the seeds (the cells run now, not those read back)."""
        out: dict = {}

        def charge(experiment, what, seconds, counts=None):
            row = _nest(out, experiment, what)
            for k, v in seconds.items():
                row[f"{k}_s"] = row.get(f"{k}_s", 0.0) + float(v)
            for k, v in (counts or {}).items():
                row[k] = row.get(k, 0) + int(v)
            if counts is not None:
                row["runs"] = row.get("runs", 0) + 1

        for p in self.problems:
            if p.setup_seconds is not None:
                charge(p.experiment, "problem", p.setup_seconds)
            for r in p.cells:
                if not r.reused:
                    t = r.timing
                    charge(p.experiment, r.cell.method,
                           {**{k.removesuffix("_s"): v for k, v in t.items() if k.endswith("_s")},
                            "io": r.store_s},
                           {k: v for k, v in t.items() if not k.endswith("_s")})
        return out

    def write(self, workdir: Path, job: dict, net: TransplantNet | None) -> None:
        """results.json (``job``), results.md, the first seed's learning curves (per
        sample count and per step) and Fig. 5, and the transplant net ``W/net``."""
        from nettransplant.net import io as net_io
        if net is not None:  # every process: orbax writes collectively
            net_io.export_net(net, workdir / "net", overwrite=True)
        if not parallel.is_primary():  # result files come from process 0
            return
        first = job["seeds"][0]
        # Each output replaces its previous version in one rename: a full disk or a kill
        # leaves the last complete version, never half a file.
        self.write_json(workdir, job)
        write_atomically(workdir / "results.md",
                         report.results_markdown(job) + failed_cells_markdown(job))
        curves = {"teachers": self.teacher_curves, "transplants": self.curves(first)}
        write_atomically(workdir / "learning_curves.json", json.dumps(curves))
        with atomic_path(workdir / "learning_curves.png") as path:
            report.plot_learning_curves(curves, path)
        if report.has_tables(job):
            with atomic_path(workdir / "samples.png") as path:
                report.plot_sample_curves(job, path)
        fig5 = self.fig5(first)
        if len(fig5) == 2:
            with atomic_path(workdir / "fig5_pca.png") as path:
                report.plot_fig5(fig5, path, title=(
                    f"Exp. 1, 3-conv adapter, {self.config.categories[0]}, "
                    f"{cells_lib.fig5_count(self.config)} samples"))

    @staticmethod
    def write_json(workdir: Path, job: dict) -> None:
        """``W/results.json`` (by process 0), replaced in one rename."""
        if parallel.is_primary():
            write_atomically(workdir / "results.json", json.dumps(job, indent=2))

    def cells_run(self) -> int:
        """How many cells ran in this job (every seed)."""
        return sum(not r.reused for p in self.problems for r in p.cells)

    def cells_reused(self) -> int:
        """How many cells were read back from the store instead (every seed)."""
        return sum(r.reused for p in self.problems for r in p.cells)


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
