"""Evidence over seeds: means, 95 % intervals and three-way verdicts for the main job.

The main job runs every cell once per seed (``config.seeds``). This module turns
the seeds' results into what the report shows:

* :func:`mean_over_seeds` — every table cell's mean over seeds (the tables keep
  their single-seed layout ``{method: {n: {category: v, "avg": v}}}``);
* :func:`intervals` — each cell's 95 % half-width: a category's over its seeds, the
  average's over every (category, seed) pair (Student's t);
* :func:`verdicts` — every claim decided by one :class:`Rule`, fixed before a run.

The rule: a claim "back-distill beats baseline B at n samples" is decided on the
paired differences (B − back-distill for an error, back-distill − B for an
accuracy, the pairs being the same category and seed, hence the same labelled
samples). It **holds** when the difference's interval lies above ``margin``,
**does not hold** when it lies below, and is **inconclusive** otherwise (fewer
than two pairs is always inconclusive). A zero-sample back-distill row is held
to its teacher: it holds when the interval of (teacher − back-distill, in points
of the metric, negative = worse) lies above ``-teacher_margin``, does not hold
when it lies below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

# (key path in results, label, metric kind): the tables whose cells carry claims.
TABLES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("exp1", "1conv"), "Exp. 1, 1-conv", "error"),
    (("exp1", "3conv"), "Exp. 1, 3-conv", "error"),
    (("exp2",), "Exp. 2", "error"),
    (("exp3",), "Exp. 3", "accuracy"),
    (("table4", "classification"), "Table 4 classification", "error"),
    (("table4", "segmentation"), "Table 4 segmentation", "accuracy"),
)
SUBJECT = "back-distill"
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Rule:
    """How every claim is decided (module docstring); ``config.evidence``."""

    confidence: float = 0.95
    margin: float = 0.0
    teacher_margin: float = 2.0

    @classmethod
    def from_config(cls, config) -> Rule:
        e = config.evidence
        return cls(float(e.confidence), float(e.margin), float(e.teacher_margin))

    def verdict(self, lo: float | None, hi: float | None, threshold: float) -> str:
        """``holds`` above ``threshold``, ``does not hold`` below, else inconclusive."""
        if lo is None or hi is None:
            return INCONCLUSIVE
        if lo > threshold:
            return HOLDS
        if hi < threshold:
            return DOES_NOT_HOLD
        return INCONCLUSIVE


def interval(values: Sequence[float], confidence: float = 0.95
             ) -> tuple[float, float | None]:
    """``(mean, half-width)`` of Student's t interval; half-width None below two values."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    sd = float(x.std(ddof=1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * sd / math.sqrt(x.size))


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def mean_over_seeds(seeds: Sequence[Mapping]) -> dict:
    """One results dict from every seed's: numbers averaged leaf by leaf, ``scalars``
    the first seed's (α, β, λ of each problem), ``fit_rates`` added up,
    ``failed_cells`` concatenated (each names its seed); ``restarts`` stays per seed."""
    if not seeds:
        return {}
    out: dict = {}
    for key in seeds[0]:
        values = [s[key] for s in seeds if key in s]
        if key == "scalars":
            out[key] = values[0]
        elif key == "restarts":
            continue  # kept per seed, in per_seed
        elif key == "failed_cells":
            out[key] = [f for v in values for f in v]
        elif key == "fit_rates":
            out[key] = sum_trees(values)
        else:
            out[key] = _mean_tree(values)
    failed = [f for s in seeds for f in s.get("failed_cells", [])]
    if failed:
        out["failed_cells"] = failed
    return out


def _mean_tree(values: list) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        keys = [k for k in first if all(isinstance(v, Mapping) and k in v for v in values)]
        return {k: _mean_tree([v[k] for v in values]) for k in keys}
    if isinstance(first, int | float) and not isinstance(first, bool):
        numbers = [v for v in values if isinstance(v, int | float)]
        return float(np.mean(numbers)) if len(numbers) == len(values) else None
    return first


def sum_trees(trees: Sequence[Mapping]) -> dict:
    """Nested dicts of numbers added leaf by leaf (e.g. the seeds' time breakdowns)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out[key] = sum_trees([out.get(key, {}), value])
            else:
                out[key] = out.get(key, 0) + value
    return out


def _table_values(per_seed: Mapping[str, Mapping], path: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{method: {n: {category: {seed: value}}}}`` of one table across seeds."""
    out: dict = {}
    for seed, results in per_seed.items():
        table = _get(results, path) or {}
        for method, by_n in table.items():
            for n, row in by_n.items():
                for category, value in row.items():
                    if category != "avg" and value is not None:
                        out.setdefault(method, {}).setdefault(n, {}).setdefault(
                            category, {})[seed] = value
    return out


def intervals(results: Mapping, per_seed: Mapping[str, Mapping],
              confidence: float = 0.95) -> dict:
    """Each table cell's half-width, in the tables' layout (None: under two values)."""
    out: dict = {}
    for path, _, _ in TABLES:
        values = _table_values(per_seed, path)
        if not values:
            continue
        table: dict = {}
        for method, by_n in values.items():
            for n, by_category in by_n.items():
                row = {c: interval(list(v.values()), confidence)[1]
                       for c, v in by_category.items()}
                row["avg"] = interval([x for v in by_category.values() for x in v.values()],
                                      confidence)[1]
                table.setdefault(method, {})[n] = row
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = table
    return out


def _paired(values: Mapping, method: str, baseline: str, n: str, kind: str
            ) -> list[float]:
    """Back-distill's advantage over ``baseline`` on each shared (category, seed)."""
    a, b = values.get(method, {}).get(n, {}), values.get(baseline, {}).get(n, {})
    diffs = []
    for category in a:
        for seed in a[category]:
            if seed in b.get(category, {}):
                d = a[category][seed] - b[category][seed]
                diffs.append(-d if kind == "error" else d)
    return diffs


def verdicts(results: Mapping, per_seed: Mapping[str, Mapping], rule: Rule) -> list[dict]:
    """Every claim of every table decided by ``rule``: back-distill against every other
    row at every sample count, and each zero-sample back-distill row against its teachers."""
    out = []
    teachers = results.get("teachers", {})
    for path, label, kind in TABLES:
        values = _table_values(per_seed, path)
        if SUBJECT not in values:
            continue
        counts = sorted(values[SUBJECT], key=int)
        for n in counts:
            if n == "0":
                teacher_key = "cls_error" if kind == "error" else "seg_pixel_acc"
                diffs = []
                for category, by_seed in values[SUBJECT]["0"].items():
                    if category in teachers:
                        t = teachers[category][teacher_key]
                        diffs += [(t - v) if kind == "error" else (v - t)
                                  for v in by_seed.values()]
                if diffs:
                    out.append(_claim(f"{label}, 0 samples: back-distill within "
                                      f"{rule.teacher_margin:g} points of its teachers",
                                      path, n, "teacher", diffs, rule, -rule.teacher_margin))
                continue
            for baseline in values:
                if baseline == SUBJECT or n not in values[baseline]:
                    continue
                diffs = _paired(values, SUBJECT, baseline, n, kind)
                if diffs:
                    better = "lower error" if kind == "error" else "higher pixel accuracy"
                    margin = f" by more than {rule.margin:g}" if rule.margin else ""
                    out.append(_claim(f"{label}, {n} samples: back-distill {better} than "
                                      f"{baseline}{margin}", path, n, baseline, diffs, rule,
                                      rule.margin))
    return out


def _claim(text: str, path: Sequence[str], n: str, baseline: str, diffs: list[float],
           rule: Rule, threshold: float) -> dict:
    mean, half = interval(diffs, rule.confidence)
    lo, hi = (None, None) if half is None else (mean - half, mean + half)
    return {"claim": text, "table": "/".join(path), "samples": int(n), "baseline": baseline,
            "difference": mean, "ci": None if half is None else [lo, hi],
            "pairs": len(diffs), "verdict": rule.verdict(lo, hi, threshold)}
