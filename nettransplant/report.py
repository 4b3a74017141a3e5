"""Paper-format tables (ours beside the paper's), the claims checked, and the plots.

:func:`results_markdown` renders ``results.json`` like the paper's Tables 2-4:
one row per (samples, method), one column per category plus the average, each
cell ``ours (paper)``. :func:`claims` checks the paper's headline claims on our
numbers. :func:`plot_fig5` and :func:`plot_learning_curves` draw the figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nettransplant import paper_results, problem

METHOD_ORDER = ("direct-learn", "distill", "jacobian", "back-distill-random-init",
                "back-distill")
# How the tables name a row: back-distill's own row starts at the closed-form warm
# start; "from random init" starts where the baselines do.
METHOD_LABELS = {"back-distill": "**back-distill** (closed-form warm start)",
                 "back-distill-random-init": "back-distill (from random init)"}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def table(ours: Mapping, paper: Mapping | None, metric: str) -> str:
    """One paper-style table: rows (samples ↓, method), columns categories + avg."""
    paper = paper or {}
    columns: list[str] = []
    counts: set[int] = set()
    for cells in ours.values():
        for n, row in cells.items():
            counts.add(int(n))
            columns += [c for c in row if c not in columns and c != "avg"]
    columns.append("avg")
    lines = [f"| samples | method | {' | '.join(columns)} |",
             "|---|---|" + "---|" * len(columns)]
    for n in sorted(counts, reverse=True):
        for method in [m for m in METHOD_ORDER if m in ours] + sorted(
                m for m in ours if m not in METHOD_ORDER):
            row = ours[method].get(str(n))
            if row is None:
                continue
            ref = paper.get(method, {}).get(str(n), {})
            cells = [_fmt(row.get(c)) + (f" ({ref[c]:.1f})" if c in ref else "")
                     for c in columns]
            name = METHOD_LABELS.get(method, method)
            lines.append(f"| {n} | {name} | {' | '.join(cells)} |")
    return f"{metric}; cells: ours (paper).\n\n" + "\n".join(lines)


def _cells(results: Mapping, *path) -> Mapping | None:
    """``results[path[0]][path[1]]…``, or None where a key is missing."""
    node: Any = results
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, Mapping) else None


def _avg(results: Mapping, *path) -> float | None:
    node = _cells(results, *path)
    return None if node is None else node.get("avg")


def _beats(kind: str, back_distill: float, direct: float, margin: float) -> bool:
    """Back-distill wins by ``margin``: lower error, or higher pixel accuracy."""
    if kind == "error":
        return back_distill <= direct - margin
    return back_distill >= direct + margin


def claims(results: Mapping) -> list[dict[str, Any]]:
    """The paper's claims the embedded run checks; each with our numbers and a verdict."""
    out = []
    teachers = results.get("teachers", {})
    exp1_cats = [c for c in (results.get("config", {}).get("categories") or teachers)
                 if c in teachers]
    if "exp1" in results and exp1_cats:
        teacher_avg = float(np.mean([teachers[c]["cls_error"] for c in exp1_cats]))
        bd0 = _avg(results, "exp1", "1conv", "back-distill", "0")
        if bd0 is not None:
            out.append({"claim": "Exp. 1, 1-conv, 0 samples: back-distill error ≤ teachers' "
                                 "average + 2 points",
                        "ours": f"{bd0:.1f} vs teachers {teacher_avg:.1f}",
                        "holds": bd0 <= teacher_avg + 2})
    checks = [("exp1", ("1conv",), ("10", "20"), "Exp. 1, 1-conv", 5, "error"),
              ("exp1", ("3conv",), ("10", "20"), "Exp. 1, 3-conv", 5, "error"),
              ("exp2", (), ("20", "50"), "Exp. 2", 5, "error"),
              ("exp3", (), ("10", "20"), "Exp. 3", 3, "accuracy"),
              ("table4", ("classification",), ("20", "50"), "Table 4 classification", 5,
               "error"),
              ("table4", ("segmentation",), ("10", "20"), "Table 4 segmentation", 3,
               "accuracy")]
    for key, sub, counts, label, margin, kind in checks:
        for n in counts:
            bd = _avg(results, key, *sub, "back-distill", n)
            dl = _avg(results, key, *sub, "direct-learn", n)
            if bd is None or dl is None:
                continue
            if kind == "error":
                text = f"{label}, {n} samples: back-distill error ≤ direct-learn − {margin}"
            else:
                text = (f"{label}, {n} samples: back-distill pixel accuracy ≥ "
                        f"direct-learn + {margin}")
            b_cells = _cells(results, key, *sub, "back-distill", n)
            d_cells = _cells(results, key, *sub, "direct-learn", n)
            cats = [c for c in b_cells if c != "avg" and c in d_cells]
            per = sum(_beats(kind, b_cells[c], d_cells[c], margin) for c in cats)
            ours = f"{bd:.1f} vs {dl:.1f} (per category: {per} of {len(cats)})"
            scratch = _avg(results, key, *sub, "back-distill-random-init", n)
            if scratch is not None:  # what the objective does without the warm start
                ours += f"; back-distill from random init: {scratch:.1f}"
            out.append({"claim": text, "holds": _beats(kind, bd, dl, margin), "ours": ours})
    return out


_BENCHMARK_TITLES = {"silhouettes": "the embedded benchmark",
                     "voc_sbd": "VOC 2012 + SBD (paper scale)"}


def results_markdown(results: Mapping) -> str:
    """``results.md``: teachers, Tables 2-4 with the paper's numbers, claims, runtime."""
    data = results.get("config", {}).get("data", "silhouettes")
    parts = [f"# Network transplanting on {_BENCHMARK_TITLES.get(data, data)}", ""]
    teachers = results.get("teachers", {})
    if teachers:
        parts += ["## Teachers", "",
                  "| category | classification error % | segmentation pixel accuracy % |",
                  "|---|---|---|"]
        for c, m in teachers.items():
            ref_e = paper_results.TEACHERS["cls_error"].get(c)
            ref_a = paper_results.TEACHERS["seg_pixel_acc"].get(c)
            parts.append(f"| {c} | {m['cls_error']:.1f}" + (f" ({ref_e})" if ref_e else "")
                         + f" | {m['seg_pixel_acc']:.1f}" + (f" ({ref_a})" if ref_a else "")
                         + " |")
        parts.append("")
    if "backbone" in results:
        b = results["backbone"]
        parts += [f"Shared backbone (10-way + segmentation, every teacher's initialisation): "
                  f"{b['accuracy_10way']:.1f} % 10-way test accuracy, "
                  f"{b['seg_pixel_acc']:.1f} % pixel accuracy.", ""]
    for key, label in (("exp1", "Table 2 — Exp. 1: adapters inside each teacher"),):
        if key in results:
            for name, adapter in (("1conv", "one conv layer (3×3)"),
                                  ("3conv", "three conv layers (3×3)")):
                if name in results[key]:
                    parts += [f"## {label}, {adapter}", "",
                              table(results[key][name], paper_results.EXP1.get(name),
                                    "Classification error %"), ""]
    if "exp2" in results:
        parts += ["## Table 3 (top) — Exp. 2: to the generic classification module", "",
                  table(results["exp2"], paper_results.EXP2, "Classification error %"), ""]
    if "exp3" in results:
        parts += ["## Table 3 (bottom) — Exp. 3: to the generic segmentation module", "",
                  table(results["exp3"], paper_results.EXP3, "Pixel accuracy %"), ""]
    if "table4" in results:
        g = results.get("generic_modules", {})
        parts += ["## Table 4 — to leave-one-out modules (other mammals + dissimilar)", ""]
        if g:
            parts += ["Generic modules (held-out category: classification error on "
                      "\"training category vs object-free scene\", pixel accuracy): "
                      + "; ".join(f"{c}: {m['cls_error']:.1f} / {m['seg_pixel_acc']:.1f}"
                                  for c, m in g.items()), ""]
        if data == "silhouettes":
            parts += ["Target classification task: the held-out category vs object-free "
                      "scenes, the \"random images\" the generic module learnt to reject "
                      "(with other animals as negatives it would say \"yes\" to both "
                      "classes).", ""]
        for task, metric in (("classification", "Classification error %"),
                             ("segmentation", "Pixel accuracy %")):
            if task in results["table4"]:
                parts += [f"### {task}", "", table(results["table4"][task],
                                                   paper_results.TABLE4[task], metric), ""]
    checked = claims(results)
    if checked:
        parts += ["## The paper's claims on this benchmark", "",
                  "| claim | ours | holds |", "|---|---|---|"]
        parts += [f"| {c['claim']} | {c['ours']} | {'yes' if c['holds'] else '**no**'} |"
                  for c in checked]
        parts.append("")
        parts += findings(results) + [""]
    stages = results.get("stage_seconds")
    if "runtime_s" in results:
        # results.md is itself an output: written before the outputs stage ends.
        before = "" if stages is None or "outputs" in stages else " (before writing the outputs)"
        parts += [f"Runtime{before}: {results['runtime_s']:.0f} s.", ""]
    if stages:
        parts += ["| stage | seconds | of which compiling |", "|---|---|---|"]
        for stage in ("data", "teachers", "transplants", "outputs"):
            if stage in stages:
                compiling = stages.get(f"{stage}_compile")
                parts.append(f"| {stage} | {stages[stage]:.0f} | "
                             + ("" if compiling is None else f"{compiling:.0f}") + " |")
        threads = stages.get("transplant_threads", 1)
        parts += ["", f"Transplant cells trained: {stages.get('transplant_cells_run', 0)}"
                  + (f" ({threads} at a time)" if threads > 1 else "")
                  + f", read back from an earlier run: {stages.get('transplant_cells_reused', 0)}.",
                  ""]
    return "\n".join(parts)


def findings(results: Mapping) -> list[str]:
    """Analysis that follows from the numbers: how far the claims could show at all."""
    teachers = results.get("teachers", {})
    if not teachers:
        return []
    errors = [m["cls_error"] for m in teachers.values()]
    avg = float(np.mean(errors))
    lines = [f"Teachers' average classification error: {avg:.1f} % (paper: 1.8 %; chance: "
             "50 %)."]
    if avg > 20:
        lines.append(
            "A transplant can at best recover its teacher (Exp. 1) or the generic module's "
            "behaviour, and a badly adapted one falls to chance (50 %), so the room between "
            f"back-distillation and direct-learn is at most {50 - avg:.1f} points here. Where a "
            "claim fails by a margin inside that room, the weak teachers, not the method, "
            "bound the comparison; the paper's teachers (fine-tuned from ImageNet VGG-16 on "
            "VOC) leave ~48 points.")
    bd0 = _avg(results, "exp1", "1conv", "back-distill", "0")
    if bd0 is not None:
        lines.append(f"Exp. 1's zero-sample single-conv adapter (closed form) gives {bd0:.1f} % "
                     "against the teachers' average above: back-distillation alone recovers "
                     "the reordered category module.")
    residual = {e: r["avg"] for e, r in results.get("warm_start_residual", {}).items()}
    if residual:
        lines.append(
            "Share of the teacher's pseudo-gradients that back-distillation's single-conv "
            "warm start leaves unexplained (its loss / λ0; 0: matched exactly, 1: nothing "
            "matched): " + ", ".join(f"{e} {r:.2f}" for e, r in residual.items()) + ".")
    generic = results.get("config", {}).get("generic_category")
    if "exp2" in results and generic in teachers:
        text = (f"Exp. 2 transplants into the {generic} teacher's classification module "
                f"(its own error: {teachers[generic]['cls_error']:.1f} %).")
        if residual.get("exp2", 0) > 0.5:
            text += (
                f" Its backward chain is nearly unrelated to the targets' ({residual['exp2']:.2f} "
                "of their pseudo-gradients unexplained), so back-distillation has little to "
                "transfer and the labelled samples drive every method.")
        swap = results.get("exp2_head_swap", {}).get("avg")
        if swap and "exp2" in residual:
            text += (
                " The heads: fc8 is the one layer a teacher does not take from the shared "
                f"backbone (its output count differs); the cosine between the {generic} "
                f"module's fc8 kernel and each target teacher's averages "
                f"{swap['fc8_cosine']:.2f}, and with the target's own fc8 swapped into the "
                f"{generic} module (nothing else changed) the warm start would leave "
                f"{swap['residual_with_own_head']:.2f} unexplained instead of "
                f"{residual['exp2']:.2f}.")
            if swap["residual_with_own_head"] < 0.5 * residual["exp2"]:
                text += (
                    " So the layers below the head are related and the heads are not: "
                    f"\"{generic} vs the rest\" and \"target vs the rest\" each separate "
                    "their own category from all others, the other's category among them, "
                    "so neither head's direction serves the other category.")
        lines.append(text)
    exp3, exp3_residual = results.get("exp3", {}), results.get("warm_start_residual", {}).get(
        "exp3", {})
    counts = sorted((n for n in exp3.get("direct-learn", {}) if n != "0"), key=int)
    if counts and exp3_residual:
        n = counts[0]
        gains = sorted(((exp3["back-distill"][n][c] - exp3["direct-learn"][n][c], c)
                        for c in exp3["direct-learn"][n] if c != "avg"), reverse=True)
        lines.append(
            f"Exp. 3, {n} samples, back-distill's pixel-accuracy gain over direct-learn per "
            "category (with the share its warm start leaves unexplained): " + ", ".join(
                f"{c} {gain:+.1f} ({exp3_residual[c]:.2f})" for gain, c in gains) + ".")
    lines += _fit_findings(results)
    bd3, dl3 = (_avg(results, "exp1", "3conv", m, "20") for m in ("back-distill", "direct-learn"))
    zero3 = _avg(results, "exp1", "3conv", "back-distill", "0")
    if zero3 is not None:
        lines.append(
            f"Exp. 1's 3-conv adapter starts back-distillation from the single-conv optimum "
            f"(closed form in its first conv, identities after it) and gives {zero3:.1f} % "
            "with 0 samples. The paper starts from random and reports a short-cut there "
            "(49.9 %): from this start, gradient descent on the zero-sample loss "
            + ("stays within 2 points of the teachers' average." if zero3 <= avg + 2
               else f"moves {zero3 - avg:.1f} points above the teachers' average."))
    if bd3 is not None and dl3 is not None and bd3 > dl3:
        lines.append(
            f"Exp. 1's 3-conv adapter: back-distillation trails direct-learn at 20 samples "
            f"({bd3:.1f} vs {dl3:.1f} %); the learning curves show both methods' task loss.")
    return ["## Findings", "", *(f"- {line}" for line in lines)]


_SEGMENTATION_RUNS = ("exp3", "table4_segmentation")


def _fit_findings(results: Mapping) -> list[str]:
    """Which runs did not fit their own labelled samples in the budget.

    Every method trains the same number of steps; a run that still misclassifies
    over 10 % of its own samples (classification), or segments them over 2
    points worse than its teacher does (segmentation, ``teacher_fit``; results
    without it: than the best method of its cell), has not fit them
    (:func:`nettransplant.problem.fits_samples`), and its test number says as much
    about optimisation as about the method. Listed per experiment and method, with
    the sample counts.
    """
    fit = results.get("train_fit", {})
    teacher = results.get("teacher_fit", {})
    transplant = results.get("config", {}).get("transplant", {})
    steps = transplant.get("num_steps")
    unfit: dict[tuple[str, str], list[str]] = {}
    hard: set[tuple[str, str, str, float]] = set()  # unfit where the teacher errs > 10 % too
    checked = 0
    for run, by_method in fit.items():
        segmentation = run in _SEGMENTATION_RUNS
        for method, by_n in by_method.items():
            for n, row in by_n.items():
                for category, value in row.items():
                    if category == "avg":
                        continue
                    checked += 1
                    best = (max(by_method[m][n][category] for m in by_method
                                if n in by_method[m] and category in by_method[m][n])
                            if segmentation else None)
                    bad = not _run_fits(run, category, n, value, teacher, best)
                    own = teacher.get(run, {}).get(n, {}).get(category)
                    if (bad and not segmentation and own is not None
                            and own > problem.FIT_ERROR):
                        hard.add((run, category, n, own))
                    if bad:
                        unfit.setdefault((run, method), []).append(f"{category}@{n}")
    if not checked:
        return []
    restarts = transplant.get("restarts") or 0
    lines = _restart_findings(results.get("restarts", {}), restarts,
                              transplant.get("restart_noise"), teacher,
                              transplant.get("last_restart_budget"))
    budget = f" in {steps} steps" if steps else ""
    if restarts:
        budget += f" and up to {restarts} restarts"
    segmentation_rule = ("the teacher's pixel accuracy on the same samples" if teacher
                         else "the best pixel accuracy of their cell")
    if not unfit:
        return [f"Every run fit its own labelled samples{budget} (train_fit: at most 10 % "
                f"error, or within 2 points of {segmentation_rule}).", *lines]
    runs = "; ".join(f"{run} {method}: {', '.join(cells)}"
                     for (run, method), cells in sorted(unfit.items()))
    return [f"{sum(map(len, unfit.values()))} of {checked} runs did not fit their own "
            f"labelled samples{budget} (train_fit over 10 % error, or over 2 points below "
            f"{segmentation_rule}): {runs}. Their test numbers measure "
            "optimisation as much as the method; results.json train_fit has every value, "
            "and `python -m launch.fit_probe` retrains one with other optimisers, budgets "
            "or initialisations (README, \"The main job\").", *_hard_samples(hard), *lines]


def _run_fits(run: str, category: str, n: str, value: float | None, teacher: Mapping,
              cell_best: float | None = None) -> bool:
    """:func:`nettransplant.problem.fits_samples` for one run of ``results.json``: a
    segmentation run against its ``teacher_fit`` (else ``cell_best``, the best pixel
    accuracy of its cell, for results without it; with neither it has not fit)."""
    if value is None:
        return False
    if run not in _SEGMENTATION_RUNS:
        return problem.fits_samples("classification", value)
    reference = teacher.get(run, {}).get(n, {}).get(category, cell_best)
    return reference is not None and problem.fits_samples("segmentation", value, reference)


def _hard_samples(hard: set) -> list[str]:
    """Unfit classification cells whose teacher also errs over 10 % on the same samples."""
    if not hard:
        return []
    cells = ", ".join(f"{run} {category}@{n}: {own:.0f} %"
                      for run, category, n, own in sorted(hard, key=lambda h: (
                          h[0], h[1], int(h[2]))))
    return [f"Among them, samples their own teacher misclassifies over 10 % of too "
            f"(results.json teacher_fit): {cells}."]


def _restart_findings(restarts: Mapping, count: int, noise: float | None = None,
                      teacher: Mapping | None = None, budget: int | None = None
                      ) -> list[str]:
    """How many unfit runs were retrained, and how many then fitted.

    ``noise``: ``config.transplant.restart_noise`` (None: a config without the field,
    whose restarts start from exact draws and the exact warm start); ``teacher``:
    results.json ``teacher_fit``, the segmentation runs' references; ``budget``:
    ``config.transplant.last_restart_budget`` (None: the last restart is like the
    others)."""
    if not count:
        return []
    teacher = teacher or {}
    starts = ("a re-drawn initialisation, or back-distill's warm start at a smaller rate"
              if noise is None else
              f"a re-drawn initialisation, the last near the identity, or back-distill's "
              f"warm start plus {noise:g} of a draw at a smaller rate")
    if budget is not None:
        starts += (f"; the last restart up to {budget:g} times the steps, at the task's "
                   "full rate, until it fits")
    runs = [[_run_fits(run, target, n, f, teacher) for f in fits]
            for run, by_target in restarts.items() for target, by_method in by_target.items()
            for by_n in by_method.values() for n, fits in by_n.items()]
    fitted = sum(any(fits) for fits in runs)
    first = sum(fits.index(True) == 1 for fits in runs if any(fits))
    return [f"{len(runs)} runs did not fit at their first attempt and were "
            f"retrained (config.transplant.restarts = {count}: {starts}; back-distill's "
            f"term weighed by a tenth of the previous attempt's λ); {fitted} of them then fit, "
            f"{first} at the first restart. results.json restarts has each attempt's "
            "train_fit."]


def summary(results: Mapping) -> str:
    """A short console summary: teacher averages and the claims."""
    lines = []
    teachers = results.get("teachers", {})
    if teachers:
        lines.append("teachers: " + ", ".join(
            f"{c} {m['cls_error']:.1f} % / {m['seg_pixel_acc']:.1f} %"
            for c, m in teachers.items()))
    for c in claims(results):
        lines.append(f"[{'holds' if c['holds'] else 'FAILS'}] {c['claim']}: {c['ours']}")
    return "\n".join(lines)


def _pca(features: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    centred = features - features.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k], s[:k]


def plot_fig5(features: Mapping[str, np.ndarray], path: Path, title: str = "") -> None:
    """Paper Fig. 5: top hidden features projected on their first two principal components.

    One PCA is fitted on both methods' features together so the axes (and
    hence the spread) are comparable.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in ("back-distill", "direct-learn") if m in features]
    stacked = np.concatenate([features[m] for m in names])
    axes, _ = _pca(stacked)
    mean = stacked.mean(axis=0)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, colour in zip(names, ("tab:red", "tab:blue"), strict=False):
        z = (features[name] - mean) @ axes.T
        spread = float(np.sqrt((z ** 2).sum(axis=1)).mean())
        ax.scatter(z[:, 0], z[:, 1], s=8, alpha=0.6, color=colour,
                   label=f"{name} (mean radius {spread:.2f})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "top hidden features")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(curves: Mapping, path: Path) -> None:
    """Teacher losses and, per experiment, each method's mean training loss per sample count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transplants = curves.get("transplants", {})
    panels = 1 + len(transplants)
    cols = min(panels, 3)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    ax = axes[0][0]
    for name, history in curves.get("teachers", {}).items():
        if history:
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set_title("teachers: training loss")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:  # teachers read back have no curves
        ax.legend(fontsize=6)
    styles = {"back-distill": "-", "direct-learn": "--", "distill": ":", "jacobian": "-."}
    for i, (experiment, methods) in enumerate(transplants.items(), start=1):
        ax = axes[i // cols][i % cols]
        for method, by_count in methods.items():
            for n, runs in sorted(by_count.items(), key=lambda kv: int(kv[0])):
                # A run kept from a longer last restart logs more steps: the mean
                # covers the steps every run of the row has.
                common = min(map(len, runs))
                mean = np.mean(np.asarray([r[:common] for r in runs], np.float64), axis=0)
                ax.plot(mean, styles.get(method, "-"), label=f"{method} n={n}")
        ax.set_yscale("log")
        ax.set_title(f"{experiment}: mean loss over categories")
        ax.set_xlabel("logged step")
        ax.legend(fontsize=5, ncol=2)
    for j in range(panels, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
