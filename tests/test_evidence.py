"""nettransplant.experiments.evidence: intervals against scipy's, the three verdicts, and the seeds'
results merged into one results dict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nettransplant.experiments import evidence, report


def test_the_interval_is_students_t():
    values = [3.0, 5.0, 4.5, 7.0, 6.0]
    mean, half = evidence.interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                              scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (mean - half, mean + half) == pytest.approx((lo, hi))
    assert evidence.interval([2.0]) == (2.0, None)
    assert evidence.interval([1.0, 1.0]) == (1.0, 0.0)


@pytest.mark.parametrize("lo,hi,verdict", [
    (0.1, 2.0, evidence.HOLDS), (-2.0, -0.1, evidence.DOES_NOT_HOLD),
    (-1.0, 1.0, evidence.INCONCLUSIVE), (0.0, 0.0, evidence.INCONCLUSIVE),
    (None, None, evidence.INCONCLUSIVE)])
def test_the_rule_has_three_verdicts(lo, hi, verdict):
    assert evidence.Rule().verdict(lo, hi, 0.0) == verdict


def _seed(bd, dl, residual):
    """One seed's results: Exp. 2 (error) with two categories."""
    return {"exp2": {"back-distill": {"10": {"cat": bd[0], "cow": bd[1],
                                             "avg": (bd[0] + bd[1]) / 2}},
                     "direct-learn": {"10": {"cat": dl[0], "cow": dl[1],
                                             "avg": (dl[0] + dl[1]) / 2}}},
            "warm_start_residual": {"exp2": {"cat": residual, "avg": residual}},
            "scalars": {"exp2": {"cat": {"beta": residual}}},
            "fit_rates": {"exp2": {"direct-learn": {"runs": 2, "fit_first": 1, "fit_kept": 2}}},
            "restarts": {"exp2": {}},
            "failed_cells": [{"seed": residual}]}


def test_seeds_are_averaged_cell_by_cell_with_intervals_and_paired_verdicts():
    per_seed = {"0": _seed((10.0, 20.0), (15.0, 26.0), 0.1),
                "1": _seed((12.0, 18.0), (16.0, 25.0), 0.3),
                "2": _seed((11.0, 19.0), (17.0, 24.0), 0.2)}
    merged = evidence.mean_over_seeds(list(per_seed.values()))
    assert merged["exp2"]["back-distill"]["10"] == pytest.approx(
        {"cat": 11.0, "cow": 19.0, "avg": 15.0})
    assert merged["warm_start_residual"]["exp2"]["avg"] == pytest.approx(0.2)
    assert merged["scalars"] == per_seed["0"]["scalars"]  # the first seed's
    assert merged["fit_rates"]["exp2"]["direct-learn"] == {"runs": 6, "fit_first": 3,
                                                           "fit_kept": 6}
    assert "restarts" not in merged and len(merged["failed_cells"]) == 3
    half = evidence.intervals(merged, per_seed)["exp2"]["back-distill"]["10"]
    assert half["cat"] == pytest.approx(evidence.interval([10.0, 12.0, 11.0])[1])
    assert half["avg"] == pytest.approx(
        evidence.interval([10.0, 20.0, 12.0, 18.0, 11.0, 19.0])[1])
    (claim,) = evidence.verdicts(merged, per_seed, evidence.Rule())
    diffs = [5.0, 6.0, 4.0, 7.0, 6.0, 5.0]  # direct-learn − back-distill, per (category, seed)
    mean, h = evidence.interval(diffs)
    assert claim["baseline"] == "direct-learn" and claim["pairs"] == 6
    assert claim["difference"] == pytest.approx(mean)
    assert claim["ci"] == pytest.approx([mean - h, mean + h])
    assert claim["verdict"] == evidence.HOLDS
    # The same numbers the other way round: back-distill worse on every pair.
    flipped = {"0": _seed((15.0, 26.0), (10.0, 20.0), 0.1),
               "1": _seed((16.0, 25.0), (12.0, 18.0), 0.3),
               "2": _seed((17.0, 24.0), (11.0, 19.0), 0.2)}
    (claim,) = evidence.verdicts({}, flipped, evidence.Rule())
    assert claim["verdict"] == evidence.DOES_NOT_HOLD
    # A margin larger than the advantage: no longer holds.
    (claim,) = evidence.verdicts(merged, per_seed, evidence.Rule(margin=10.0))
    assert claim["verdict"] == evidence.DOES_NOT_HOLD and "by more than 10" in claim["claim"]


def test_a_zero_sample_row_is_held_to_its_teachers():
    teachers = {"cat": {"cls_error": 5.0}, "cow": {"cls_error": 7.0}}
    per_seed = {str(s): {"exp1": {"1conv": {"back-distill": {"0": {
        "cat": 5.0 + d, "cow": 7.0 + d, "avg": 6.0 + d}}}}} for s, d in enumerate((0.5, 1.0))}
    (claim,) = evidence.verdicts({"teachers": teachers}, per_seed, evidence.Rule())
    assert claim["baseline"] == "teacher" and claim["verdict"] == evidence.HOLDS
    assert "within 2 points" in claim["claim"]
    far = {s: {"exp1": {"1conv": {"back-distill": {"0": {
        k: v + 10 for k, v in r["exp1"]["1conv"]["back-distill"]["0"].items()}}}}}
        for s, r in per_seed.items()}
    (claim,) = evidence.verdicts({"teachers": teachers}, far, evidence.Rule())
    assert claim["verdict"] == evidence.DOES_NOT_HOLD


def test_the_samples_figure_draws_a_band_per_method_and_the_papers_markers(tmp_path,
                                                                           monkeypatch):
    import matplotlib.axes
    bands, markers = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **k: bands.append((list(x), list(hi - lo))))
    original = matplotlib.axes.Axes.plot

    def spy(self, x, y, fmt, **kwargs):
        if fmt == "s":
            markers.append(list(x))
        return original(self, x, y, fmt, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    per_seed = {"0": _seed((10.0, 20.0), (15.0, 26.0), 0.1),
                "1": _seed((12.0, 18.0), (16.0, 25.0), 0.3)}
    results = evidence.mean_over_seeds(list(per_seed.values()))
    results.update(seeds=[0, 1], intervals=evidence.intervals(results, per_seed))
    report.plot_sample_curves(results, tmp_path / "samples.png")
    assert (tmp_path / "samples.png").stat().st_size > 0
    half = results["intervals"]["exp2"]["back-distill"]["10"]["avg"]
    assert [10] in [b[0] for b in bands]
    assert any(b == ([10], [pytest.approx(2 * half)]) for b in bands)
    assert [10, 20, 50, 100] in markers  # the paper's Exp. 2 rows


def test_the_report_shows_intervals_and_every_verdict():
    per_seed = {"0": _seed((10.0, 20.0), (15.0, 26.0), 0.1),
                "1": _seed((12.0, 18.0), (16.0, 25.0), 0.3)}
    results = evidence.mean_over_seeds(list(per_seed.values()))
    results.update(seeds=[0, 1], per_seed=per_seed,
                   intervals=evidence.intervals(results, per_seed),
                   verdicts=evidence.verdicts(results, per_seed, evidence.Rule()),
                   config={"evidence": {"confidence": 0.95, "margin": 0.0},
                           "transplant": {"restarts": 1}},
                   no_restarts={"exp2": {"direct-learn": {"10": {"avg": 30.0}}}})
    text = report.results_markdown(results)
    assert "ours ± 95 % interval (paper)" in text
    half = results["intervals"]["exp2"]["back-distill"]["10"]["cat"]
    assert f"11.0 ± {half:.1f}" in text
    assert "Exp. 2, 10 samples: back-distill lower error than direct-learn" in text
    assert "(2 seeds)" in text and "| holds |" in text
    assert "| table | samples | vs direct-learn |" in text
    assert "| Exp. 2 | 10 | holds +5.5 |" in text  # the matrix: verdict and mean advantage
    assert "| exp2 | 50% → 100% (4) |" in text  # the fit rates
    assert "| Exp. 2 | direct-learn | 10 | 20.5 | 30.0 |" in text  # the ablation
    assert "[holds]" in report.summary(results)
