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

from nettransplant.experiments import evidence, paper_results

METHOD_ORDER = ("direct-learn", "distill", "jacobian", "back-distill-random-init",
                "back-distill")
# How the tables name a row: back-distill's own row starts at the closed-form warm
# start; "from random init" starts where the baselines do.
METHOD_LABELS = {"back-distill": "**back-distill** (closed-form warm start)",
                 "back-distill-random-init": "back-distill (from random init)"}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def table(ours: Mapping, paper: Mapping | None, metric: str, ci: Mapping | None = None
          ) -> str:
    """One paper-style table: rows (samples ↓, method), columns categories + avg; each
    cell ``ours ± half-width of its 95 % interval (paper)`` where ``ci`` has one."""
    paper, ci = paper or {}, ci or {}
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
            half = ci.get(method, {}).get(str(n), {})
            cells = [_fmt(row.get(c))
                     + (f" ± {half[c]:.1f}" if half.get(c) is not None else "")
                     + (f" ({ref[c]:.1f})" if c in ref else "") for c in columns]
            name = METHOD_LABELS.get(method, method)
            lines.append(f"| {n} | {name} | {' | '.join(cells)} |")
    legend = "ours ± 95 % interval (paper)" if ci else "ours (paper)"
    return f"{metric}; cells: {legend}.\n\n" + "\n".join(lines)


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


def claims(results: Mapping) -> list[dict[str, Any]]:
    """Every claim with its verdict (:func:`nettransplant.experiments.evidence.verdicts`): the job's
    own, or decided now for results written before it kept them (one seed: every
    category-level pair, same rule)."""
    if "verdicts" in results:
        return list(results["verdicts"])
    return evidence.verdicts(results, {"0": results}, evidence.Rule())


def _interval_text(claim: Mapping) -> str:
    if claim["ci"] is None:
        return f"{claim['difference']:+.1f} (no interval)"
    lo, hi = claim["ci"]
    return f"{claim['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def claims_markdown(results: Mapping) -> list[str]:
    """The claims section: the rule, then one row per claim with its verdict."""
    checked = claims(results)
    if not checked:
        return []
    rule = results.get("config", {}).get("evidence", {})
    confidence = rule.get("confidence", 0.95)
    seeds = results.get("seeds", [0])
    lines = ["## The paper's claims on this benchmark", "",
             f"Each claim is decided on paired differences over (category, seed) pairs "
             f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}): **holds** when the "
             f"{confidence:.0%} interval of back-distill's advantage lies above "
             f"{rule.get('margin', 0.0):g} points, **does not hold** when it lies below, "
             "**inconclusive** otherwise (docs/protocol.md). An advantage is the "
             "baseline's error minus back-distill's, or back-distill's pixel accuracy "
             "minus the baseline's; against a teacher, the points back-distill gives up.",
             "", *verdict_matrix(results), "",
             "Each cell: the verdict (– inconclusive) and back-distill's mean advantage in "
             "points. Every claim with its interval:",
             "", "| claim | advantage, mean [95 % interval] | pairs | verdict |",
             "|---|---|---|---|"]
    for c in checked:
        verdict = c["verdict"] if c["verdict"] != evidence.DOES_NOT_HOLD \
            else f"**{c['verdict']}**"
        lines.append(f"| {c['claim']} | {_interval_text(c)} | {c['pairs']} | {verdict} |")
    counts = {v: sum(c["verdict"] == v for c in checked)
              for v in (evidence.HOLDS, evidence.DOES_NOT_HOLD, evidence.INCONCLUSIVE)}
    lines += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", ""]
    return lines


def verdict_matrix(results: Mapping) -> list[str]:
    """Every claim at a glance: a row per (table, sample count), a column per row that
    back-distill is compared with, each cell the verdict and the mean advantage."""
    checked = claims(results)
    if not checked:
        return []
    baselines = [m for m in ("teacher", *METHOD_ORDER) if any(c["baseline"] == m
                                                              for c in checked)]
    labels = {path: label for path, label, _ in evidence.TABLES}
    rows: dict = {}
    for c in checked:
        rows.setdefault((c["table"], c["samples"]), {})[c["baseline"]] = c
    short = {evidence.HOLDS: "holds", evidence.DOES_NOT_HOLD: "**fails**",
             evidence.INCONCLUSIVE: "–"}
    names = {"teacher": "its teachers", "back-distill-random-init": "from random init"}
    lines = ["| table | samples | " + " | ".join(f"vs {names.get(b, b)}" for b in baselines)
             + " |", "|---|---|" + "---|" * len(baselines)]
    for (table, n), by_baseline in rows.items():
        cells = [f"{short[c['verdict']]} {c['difference']:+.1f}" if (c := by_baseline.get(b))
                 else "" for b in baselines]
        label = labels.get(tuple(table.split("/")), table)
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return lines


def fit_rates_markdown(results: Mapping) -> list[str]:
    """Per experiment and method, the share of runs that fit their labelled samples at
    their first attempt and with the attempt kept, and the no-restart ablation."""
    rates = results.get("fit_rates")
    if not rates:
        return []
    restarts = results.get("config", {}).get("transplant", {}).get("restarts", 0)
    methods = [m for m in METHOD_ORDER if any(m in r for r in rates.values())]
    lines = ["## Fit to the labelled samples", "",
             f"Share of runs (every category, sample count and seed) that fit their own "
             f"labelled samples (docs/protocol.md): at the first attempt → with the attempt "
             f"kept after up to {restarts} restart{'s' if restarts != 1 else ''}; runs in "
             "brackets.", "",
             "| experiment | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for experiment, by_method in rates.items():
        cells = []
        for m in methods:
            r = by_method.get(m)
            cells.append("–" if r is None else f"{r['fit_first'] / r['runs']:.0%} → "
                         f"{r['fit_kept'] / r['runs']:.0%} ({r['runs']})")
        lines.append(f"| {experiment} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _ablation_markdown(results)
    return lines


def _ablation_markdown(results: Mapping) -> list[str]:
    """The no-restart ablation: each table's averages with and without restarts, where
    they differ (the same job with restarts = 0 trains exactly the first attempts)."""
    first = results.get("no_restarts")
    if not first:
        return []
    rows = []
    for path, label, _ in evidence.TABLES:
        kept, alone = evidence._get(results, path), evidence._get(first, path)
        if not kept or not alone:
            continue
        for method in [m for m in METHOD_ORDER if m in kept]:
            for n, row in kept[method].items():
                a = alone.get(method, {}).get(n, {}).get("avg")
                if a is not None and abs(a - row["avg"]) >= 0.05:
                    rows.append(f"| {label} | {METHOD_LABELS.get(method, method)} | {n} | "
                                f"{row['avg']:.1f} | {a:.1f} |")
    if not rows:
        return ["No-restart ablation: every table average is the same without restarts.", ""]
    return ["No-restart ablation (table averages that restarts changed; the others are "
            "the same without them):", "",
            "| table | method | samples | with restarts | first attempts only |",
            "|---|---|---|---|---|", *rows, ""]


_BENCHMARK_TITLES = {"silhouettes": "the embedded benchmark",
                     "voc_sbd": "VOC 2012 + SBD (paper scale)"}


def results_markdown(results: Mapping) -> str:
    """``results.md``: teachers, Tables 2-4 with the paper's numbers, claims, runtime."""
    data = results.get("config", {}).get("data", "silhouettes")
    parts = [f"# Network transplanting on {_BENCHMARK_TITLES.get(data, data)}", ""]
    made = results.get("provenance")
    if made:
        seeds = results.get("seeds", [])
        parts += [f"nettransplant {made['version']}"
                  + (f" at commit {made['commit']}" if made.get("commit") else "")
                  + f", {made['device_count']} × {made['device_kind']} ({made['platform']})"
                  + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + ".", ""]
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
    ci = results.get("intervals", {})
    for key, label in (("exp1", "Table 2 — Exp. 1: adapters inside each teacher"),):
        if key in results:
            for name, adapter in (("1conv", "one conv layer (3×3)"),
                                  ("3conv", "three conv layers (3×3)")):
                if name in results[key]:
                    parts += [f"## {label}, {adapter}", "",
                              table(results[key][name], paper_results.EXP1.get(name),
                                    "Classification error %", ci.get(key, {}).get(name)), ""]
    if "exp2" in results:
        parts += ["## Table 3 (top) — Exp. 2: to the generic classification module", "",
                  table(results["exp2"], paper_results.EXP2, "Classification error %",
                        ci.get("exp2")), ""]
    if "exp3" in results:
        parts += ["## Table 3 (bottom) — Exp. 3: to the generic segmentation module", "",
                  table(results["exp3"], paper_results.EXP3, "Pixel accuracy %",
                        ci.get("exp3")), ""]
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
                parts += [f"### {task}", "", table(
                    results["table4"][task], paper_results.TABLE4[task], metric,
                    ci.get("table4", {}).get(task)), ""]
    claim_lines = claims_markdown(results)
    if claim_lines:
        parts += claim_lines + fit_rates_markdown(results) + findings(results) + [""]
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


def summary(results: Mapping) -> str:
    """A short console summary: teacher averages and the claims."""
    lines = []
    teachers = results.get("teachers", {})
    if teachers:
        lines.append("teachers: " + ", ".join(
            f"{c} {m['cls_error']:.1f} % / {m['seg_pixel_acc']:.1f} %"
            for c, m in teachers.items()))
    for c in claims(results):
        lines.append(f"[{c['verdict']}] {c['claim']}: {_interval_text(c)}")
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


_PAPER_TABLES = {("exp1", "1conv"): paper_results.EXP1.get("1conv"),
                 ("exp1", "3conv"): paper_results.EXP1.get("3conv"),
                 ("exp2",): paper_results.EXP2, ("exp3",): paper_results.EXP3,
                 ("table4", "classification"): paper_results.TABLE4["classification"],
                 ("table4", "segmentation"): paper_results.TABLE4["segmentation"]}
_COLOURS = {"back-distill": "tab:red", "back-distill-random-init": "tab:orange",
            "direct-learn": "tab:blue", "jacobian": "tab:green", "distill": "tab:purple"}


def has_tables(results: Mapping) -> bool:
    """Whether ``results`` holds any of the experiments' tables."""
    return any(evidence._get(results, key) for key, _, _ in evidence.TABLES)


def plot_sample_curves(results: Mapping, path: Path) -> None:
    """Per experiment, the average metric against the number of labelled samples: one
    line per method with its 95 % band (``results["intervals"]``), the paper's averages
    as hollow markers of the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(path_, label, kind) for path_, label, kind in evidence.TABLES
              if evidence._get(results, path_)]
    if not panels:
        raise ValueError("no experiment's table to plot (report.has_tables)")
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False)
    seeds = len(results.get("seeds", [0]))
    for i, (key, label, kind) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        table = evidence._get(results, key)
        halves = evidence._get(results.get("intervals", {}), key) or {}
        paper = _PAPER_TABLES.get(key) or {}
        for method in [m for m in METHOD_ORDER if m in table]:
            counts = sorted(table[method], key=int)
            x = np.asarray([int(n) for n in counts])
            y = np.asarray([table[method][n]["avg"] for n in counts])
            h = np.asarray([(halves.get(method, {}).get(n, {}).get("avg") or 0.0)
                            for n in counts])
            colour = _COLOURS.get(method)
            ax.plot(x, y, "o-", color=colour, label=METHOD_LABELS.get(method, method)
                    .replace("**", ""), markersize=3)
            ax.fill_between(x, y - h, y + h, color=colour, alpha=0.15, linewidth=0)
            ref = [(int(n), row["avg"]) for n, row in paper.get(method, {}).items()
                   if "avg" in row]
            if ref:
                rx, ry = zip(*sorted(ref), strict=True)
                ax.plot(rx, ry, "s", mfc="none", color=colour, markersize=5)
        ax.set_title(label)
        ax.set_xlabel("labelled samples")
        ax.set_ylabel("test error %" if kind == "error" else "pixel accuracy %")
        ax.grid(alpha=0.3)
    handles: dict = {}  # every method of every panel, once
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=6,
                      title=f"mean ± 95 % ({seeds} seed{'s' * (seeds != 1)}); □ paper",
                      title_fontsize=6)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
