"""End-to-end smoke test of the demo on the embedded data (quick variant)."""

import json

import pytest

from nettransplant.commands import demo
from nettransplant.training import checkpoint


def test_demo_runs_end_to_end_and_the_zero_sample_transplant_reproduces_the_teacher(tmp_path):
    results = demo.run(demo.parse(["--workdir", str(tmp_path), "--quick", "--category",
                                   "sheep"]))
    stored = json.loads((tmp_path / "demo_results.json").read_text())
    assert stored["category"] == "sheep"
    rows = stored["transplant_cls_error"]
    assert set(rows) == {"back-distill, 0 samples (closed form)", "direct-learn, 10 samples",
                         "back-distill, 10 samples"}
    assert all(0.0 <= v <= 100.0 for v in rows.values())
    # Exp. 1: the closed-form adapter undoes reorder and re-scaling, so the
    # transplant net classifies exactly like its teacher.
    assert rows["back-distill, 0 samples (closed form)"] == pytest.approx(
        results["teacher"]["cls_error"], abs=0.5)
    params, metadata = checkpoint.load_checkpoint(tmp_path / "teacher_sheep")
    assert metadata["category"] == "sheep"
    assert set(params) == {"category_module", "classification_module", "segmentation_module"}
