"""A short tour on the embedded data: train one teacher, transplant its category module.

:func:`run` is what ``nettransplant demo`` calls:

1. trains a teacher for one category (category module + classification and
   FCN-8s segmentation task modules), puts it in a
   :class:`~nettransplant.net.TransplantNet` and scores its routes;
2. inserts a reorder + 1-conv 3×3 adapter between the teacher's category
   module and its own classification module (the paper's Exp. 1) and learns
   it with 0 labels (back-distillation's closed form), and with N labels by
   direct-learn and by back-distillation;
3. writes ``demo_results.json`` and the teacher checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

from nettransplant import data
from nettransplant.core import modules
from nettransplant.core.adapter import Adapter
from nettransplant.data import benchmarks
from nettransplant.net import TeacherParts, TransplantNet, TransplantSettings, build_problem
from nettransplant.runtime import parallel
from nettransplant.runtime.files import write_atomically
from nettransplant.training import checkpoint, teachers
from nettransplant.transplant import problem


def train_category_teacher(config, benchmark: benchmarks.Benchmark, category: str, *,
                           progress: bool = True) -> TeacherParts:
    """A teacher of ``category`` trained from scratch on its train images (config.teacher)."""
    m, t = config.model, config.teacher
    teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                   dropout_rate=m.dropout_rate, num_classes=m.num_classes)
    cls_train = benchmark.classification(category, "train")
    seg_train = benchmark.segmentation(category, "train")
    optimizer = optax.adam(t.learning_rate)
    state = teachers.create_teacher_state(teacher, jax.random.key(config.seed), m.image_size,
                                          optimizer)
    state, _ = teachers.train_teacher(
        teacher, state, cls_images=data.normalize_images(cls_train.images),
        cls_labels=cls_train.labels, seg_images=data.normalize_images(seg_train.images),
        seg_masks=seg_train.masks.astype(np.int32), optimizer=optimizer,
        num_steps=t.num_steps, batch_size=t.batch_size, seed=config.seed,
        progress=f"teacher {category}" if progress else False)
    return TeacherParts.from_teacher(category, teacher, state.params, input_size=m.image_size)


def run(config, workdir: str | Path, *, category: str, num_samples: int,
        progress: bool = True) -> dict:
    """Train, transplant, report; returns the ``demo_results.json`` dict."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    m, tc = config.model, config.transplant
    bench = benchmarks.make_benchmark(config)
    parts = train_category_teacher(config, bench, category, progress=progress)
    net = TransplantNet().add_teacher(parts)
    cls_test, seg_test = bench.classification(category, "test"), bench.segmentation(category,
                                                                                     "test")
    results = {"category": category, "teacher": {
        "cls_error": net.evaluate(cls_test.images, cls_test.labels, category=category,
                                  task=f"{category}.classification"),
        "seg_pixel_acc": net.evaluate(seg_test.images, seg_test.masks, category=category,
                                      task=f"{category}.segmentation")}}
    checkpoint.save_checkpoint(
        workdir / f"teacher_{category}",
        {"category_module": parts.category_module.params,
         **{f"{task}_module": ref.params for task, ref in parts.task_modules.items()}},
        {"category": category, "metrics": results["teacher"], "config": config.to_dict()},
        overwrite=True)

    # Exp. 1: reorder + adapter inside the teacher; g_S = g_T and β = 1 (the same f).
    own = net.task_ref(f"{category}.classification")
    settings = TransplantSettings.from_config(tc, seed=config.seed, protocol="exp1",
                                              lambda0=tc.lambda0_classification,
                                              draws=tc.get("exp1_draws", "randomised"))
    prob = build_problem(net.category_ref(category), own, own,
                         Adapter(modules.category_channels(m.width), 1, 3,
                                 reorder_seed=config.seed),
                         settings=settings, image_size=m.image_size,
                         key=jax.random.key(config.seed), beta=1.0,
                         test_images=net.normalize(cls_test.images, category=category),
                         test_targets=cls_test.labels)
    solution, _ = problem.zero_sample_solution(prob, ridge=tc.closed_form_ridge,
                                               num_draws=tc.closed_form_draws)
    rows = {"back-distill, 0 samples (closed form)": problem.evaluate(prob, solution)}
    shots = data.few_shot(bench.classification(category, "train"), num_samples,
                          seed=config.seed)
    transfer = problem.transfer_data(prob, net.normalize(shots.images, category=category),
                                     shots.labels, key=jax.random.key(config.seed + 3),
                                     pad_to=max(tc.batch_size, num_samples))
    steps = problem.StepCache(optax.adam(tc.learning_rate))
    for method, init in (("direct-learn", prob.adapter_init), ("back-distill", solution)):
        params, _, _ = problem.fit(prob, method, steps, data=transfer, num_samples=num_samples,
                                   init=init, num_steps=tc.num_steps, batch_size=tc.batch_size,
                                   draws_per_step=tc.draws_per_step, seed=config.seed,
                                   log_every=tc.log_every, progress=(
                                       f"{method} {num_samples} samples" if progress else False))
        rows[f"{method}, {num_samples} samples"] = problem.evaluate(prob, params)
    results["transplant_cls_error"] = rows
    results["runtime_s"] = time.perf_counter() - start
    if parallel.is_primary():  # the result file comes from process 0
        write_atomically(workdir / "demo_results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict) -> str:
    """The demo's table, as printed by ``nettransplant demo``."""
    t, rows = results["teacher"], results["transplant_cls_error"]
    width = max(map(len, rows))
    lines = [f"{results['category']}: teacher test error {t['cls_error']:.1f} %, "
             f"segmentation pixel accuracy {t['seg_pixel_acc']:.1f} %",
             "reordered category module transplanted back (Exp. 1, 1-conv 3×3 adapter):"]
    lines += [f"  {name:<{width}}  test error {err:5.1f} %" for name, err in rows.items()]
    lines.append(f"runtime {results['runtime_s']:.0f} s")
    return "\n".join(lines)
