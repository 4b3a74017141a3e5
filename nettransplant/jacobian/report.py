"""Reports of the Jacobian-matching experiments: claims, ``results.md``, plots, atomic writes.

The paper's own numbers (Srinivas & Fleuret, ICML 2018: transfer from an
ImageNet teacher to MIT Scenes, test accuracy %) are kept here beside ours;
every claim is checked on our numbers and marked ``holds`` / ``does not hold``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nettransplant.runtime.files import atomic_path, write_atomically

PAPER_TRANSFER = {  # accuracy % at 25 / 50 / all samples per class
    "no transfer": {"25": 35.19, "50": 46.38, "all": 59.33},
    "fine-tuning": {"25": 57.65, "50": 64.18, "all": 71.42},
    "LwF": {"25": 45.08, "50": 55.22, "all": 65.22},
    "LwF + Jacobians": {"25": 45.26, "50": 56.49, "all": 66.04},
    "LwF + attention": {"25": 46.01, "50": 57.80, "all": 67.24},
    "LwF + attention + Jacobians": {"25": 47.31, "50": 58.35, "all": 67.31},
}
PAPER_TRANSFER_COUNTS = ("25", "50", "all")
FEW = "few"  # sample counts other than "all"


def standard_error(accuracy_percent: float, num_images: int) -> float:
    """Binomial standard error (percentage points) of a test accuracy on ``num_images``."""
    p = accuracy_percent / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(num_images, 1))


def _few_counts(cells: Mapping[str, float]) -> list[str]:
    return [k for k in cells if k != "all"]


def _claim(name: str, holds: bool, evidence: str) -> dict[str, Any]:
    return {"claim": name, "holds": bool(holds), "evidence": evidence}


def claims(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each of the paper's claims, checked on ``results``: ``{claim, holds, evidence}``."""
    out = []
    distill = results["distillation"]
    se_distill = standard_error(50.0, results["test_images"])
    se_transfer = standard_error(50.0, results["transfer"]["test_images"])
    if "outputs" in distill and "outputs+jacobians" in distill:
        few = _few_counts(distill["outputs"])
        gains = {n: distill["outputs+jacobians"][n] - distill["outputs"][n] for n in few}
        mean_gain = sum(gains.values()) / max(len(gains), 1)
        out.append(_claim(
            "Jacobians help distillation with few samples",
            mean_gain > 0 and sum(g > 0 for g in gains.values()) > len(gains) / 2,
            "outputs+jacobians − outputs, points at n = "
            + ", ".join(f"{n}: {g:+.1f}" for n, g in gains.items())
            + f" (mean {mean_gain:+.1f}; one accuracy's standard error ≤ {se_distill:.1f})"))
    robust = results["robustness"]
    students = robust["students"]
    noisy = [i for i, s in enumerate(robust["sigmas"]) if s > 0]

    def noisy_mean(method):
        cells = students[method]
        values = [cells[n][i] for n in cells for i in noisy]
        return sum(values) / max(len(values), 1)

    if {"outputs", "outputs+jacobians", "noise"} <= set(students) and noisy:
        base, jac, aug = (noisy_mean(m) for m in ("outputs", "outputs+jacobians", "noise"))
        out.append(_claim(
            "Jacobian matching improves robustness to input noise",
            jac > base,
            f"mean accuracy over σ > 0 and all sample counts: outputs {base:.1f}, "
            f"outputs+jacobians {jac:.1f} ({jac - base:+.1f})"))
        out.append(_claim(
            "... like noise-augmented training does",
            aug > base and jac > base,
            f"noise-augmented {aug:.1f} ({aug - base:+.1f} over outputs); "
            f"outputs+jacobians {jac - base:+.1f}"))
    table = results["transfer"]["table"]
    steps = [("no transfer", "LwF", "LwF improves on no transfer"),
             ("LwF", "LwF + Jacobians", "Jacobians improve LwF"),
             ("LwF", "LwF + attention", "attention improves LwF"),
             ("LwF + attention", "LwF + attention + Jacobians",
              "Jacobians improve LwF + attention")]
    for before, after, name in steps:
        if before in table and after in table:
            gains = {n: table[after][n] - table[before][n] for n in table[after]}
            out.append(_claim(
                f"transfer: {name}", all(g > 0 for g in gains.values()),
                f"{after} − {before}, points at n = "
                + ", ".join(f"{n}: {g:+.1f}" for n, g in gains.items())
                + f" (one accuracy's standard error ≤ {se_transfer:.1f})"))
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def transfer_markdown(results: Mapping[str, Any]) -> str:
    transfer = results["transfer"]
    table = transfer["table"]
    counts = list(next(iter(table.values())))
    head = ("| method | " + " | ".join(f"ours n={n}" for n in counts) + " | "
            + " | ".join(f"paper n={n}" for n in PAPER_TRANSFER_COUNTS) + " |")
    lines = [head, "|" + "---|" * (1 + len(counts) + len(PAPER_TRANSFER_COUNTS))]
    for method, cells in table.items():
        paper = PAPER_TRANSFER.get(method, {})
        lines.append(f"| {method} | " + " | ".join(_fmt(cells[n]) for n in counts) + " | "
                     + " | ".join(_fmt(paper.get(n)) for n in PAPER_TRANSFER_COUNTS) + " |")
    return "\n".join(lines)


def distillation_markdown(results: Mapping[str, Any]) -> str:
    distill = results["distillation"]
    counts = list(next(iter(distill.values())))
    lines = ["| method | " + " | ".join(f"n={n}" for n in counts) + " |",
             "|" + "---|" * (1 + len(counts))]
    for method, cells in distill.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(cells[n]) for n in counts) + " |")
    return "\n".join(lines)


def robustness_markdown(results: Mapping[str, Any]) -> str:
    robust = results["robustness"]
    sigmas = robust["sigmas"]
    lines = ["| student | n | " + " | ".join(f"σ={s:g}" for s in sigmas) + " |",
             "|" + "---|" * (2 + len(sigmas))]
    lines.append("| teacher | all | " + " | ".join(_fmt(v) for v in robust["teacher"]) + " |")
    for method, cells in robust["students"].items():
        for n, values in cells.items():
            lines.append(f"| {method} | {n} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the three tables, the paper's transfer table beside ours, the claims."""
    transfer = results["transfer"]
    se = standard_error(50.0, transfer["test_images"])
    se_distill = standard_error(50.0, results["test_images"])
    config = results["config"]
    lines = [
        "# Knowledge transfer with Jacobian matching — embedded silhouettes",
        "",
        f"Raw animal silhouettes at {config['image_size']}×{config['image_size']}, "
        f"student seeds {config['student_seeds']}; runtime {results.get('runtime_s', '?')} s.",
        "",
        "## Distillation with few samples (test accuracy %, 10 classes)",
        "",
        f"Teacher: {results['teacher_accuracy']:.2f} %. One test accuracy has a standard "
        f"error of at most {se_distill:.1f} points ({results['test_images']} test images).",
        "",
        distillation_markdown(results),
        "",
        "## Robustness to Gaussian input noise (test accuracy %)",
        "",
        robustness_markdown(results),
        "",
        "## Transfer learning (test accuracy %)",
        "",
        f"Teacher on {', '.join(transfer['old_categories'])} "
        f"({transfer['teacher_accuracy']:.2f} % on its own test split); the student learns "
        f"{', '.join(transfer['new_categories'])} ({transfer['test_images']} test images, "
        f"standard error at most {se:.1f} points). Paper: ImageNet teacher, MIT Scenes.",
        "",
        transfer_markdown(results),
        "",
        "## The paper's claims on these numbers",
        "",
    ]
    for claim in results["claims"]:
        mark = "holds" if claim["holds"] else "does not hold"
        lines.append(f"- **{claim['claim']}**: {mark} — {claim['evidence']}")
    lines.append("")
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, bbox_inches="tight")


def plot_accuracy_vs_samples(results: Mapping[str, Any], path: Path) -> None:
    """Distillation accuracy vs samples per class, one line per method ("all" at the right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distill = results["distillation"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, cells in distill.items():
        labels = list(cells)
        ax.plot(range(len(labels)), [cells[n] for n in labels], marker="o", label=method)
    ax.set_xticks(range(len(labels)), labels)
    ax.axhline(results["teacher_accuracy"], color="gray", ls=":", label="teacher")
    ax.set_xlabel("samples per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Distillation with few samples")
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)


def plot_accuracy_vs_noise(results: Mapping[str, Any], path: Path) -> None:
    """Student accuracy vs input-noise σ: one panel per sample count, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    robust = results["robustness"]
    students = robust["students"]
    counts = list(next(iter(students.values())))
    fig, axes = plt.subplots(1, len(counts), figsize=(3 * len(counts), 3), sharey=True,
                             squeeze=False)
    for ax, n in zip(axes[0], counts):
        for method, cells in students.items():
            ax.plot(robust["sigmas"], cells[n], marker="o", label=method)
        ax.plot(robust["sigmas"], robust["teacher"], color="gray", ls=":", label="teacher")
        ax.set_title(f"n = {n}")
        ax.set_xlabel("noise σ")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


def write_outputs(results: Mapping[str, Any], workdir: Path) -> None:
    """``results.json``, ``results.md``, ``accuracy_vs_samples.png``, ``accuracy_vs_noise.png``."""
    workdir = Path(workdir)
    plot_accuracy_vs_samples(results, workdir / "accuracy_vs_samples.png")
    plot_accuracy_vs_noise(results, workdir / "accuracy_vs_noise.png")
    write_atomically(workdir / "results.md", results_markdown(results))
    write_atomically(workdir / "results.json", json.dumps(results, indent=2))
