"""End-to-end demo on the embedded silhouettes: train a teacher, transplant its category module.

    python -m launch.demo --workdir workdir/demo [--category cat] [--quick]

1. Trains a teacher for ``--category`` (category module + classification and
   FCN-8s segmentation task modules) and reports its test error / pixel accuracy.
2. Inserts a reorder + 1-conv 3×3 adapter between its category module and its
   classification task module (the paper's Exp. 1) and learns the adapter
   with 0 labels by back-distillation (closed form), and with 10 labels by
   direct-learn and by back-distillation.
3. Prints a table and writes ``demo_results.json`` and the teacher checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import silhouettes as default_config
from nettransplant import checkpoint, closed_form, data, evaluation, modules, objectives, teachers
from nettransplant import train as train_lib
from nettransplant.adapter import Adapter
from nettransplant.transplant import Transplant


def train_category_teacher(config, splits, category: str, progress: bool = True):
    m, t = config.model, config.teacher
    teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                   dropout_rate=m.dropout_rate, num_classes=m.num_classes)
    cls_train = data.binary_classification(splits["train"], [category], seed=config.seed)
    seg_train = data.segmentation(splits["train"], [category], seed=config.seed)
    optimizer = optax.adam(t.learning_rate)
    state = teachers.create_teacher_state(teacher, jax.random.key(config.seed), m.image_size,
                                          optimizer)
    state, _ = teachers.train_teacher(
        teacher, state, cls_images=data.normalize_images(cls_train.images),
        cls_labels=cls_train.labels, seg_images=data.normalize_images(seg_train.images),
        seg_masks=seg_train.masks.astype(np.int32), optimizer=optimizer,
        num_steps=t.num_steps, batch_size=t.batch_size, seed=config.seed,
        progress=f"teacher {category}" if progress else False)
    return teacher, state.params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--category", default="cat", choices=data.CATEGORIES)
    parser.add_argument("--quick", action="store_true", help="a shorter smoke run")
    parser.add_argument("--num-samples", type=int, default=10)
    args = parser.parse_args(argv)
    config = default_config.get_config("quick" if args.quick else None)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    m, tc = config.model, config.transplant

    splits = data.load_silhouettes(m.image_size, config.seed)
    teacher, t_params = train_category_teacher(config, splits, args.category)
    cls_test = data.binary_classification(splits["test"], [args.category], seed=config.seed)
    seg_test = data.segmentation(splits["test"], [args.category], seed=config.seed)
    test_images = data.normalize_images(cls_test.images)
    teacher_scores = evaluation.batched_apply(
        lambda im: teachers.classification_scores(teacher, t_params, im), test_images)
    teacher_seg = evaluation.batched_apply(
        lambda im: jnp.argmax(teachers.segmentation_scores(teacher, t_params, im), -1),
        data.normalize_images(seg_test.images))
    results = {"category": args.category,
               "teacher": {"cls_error": evaluation.classification_error(
                   evaluation.predict_classes(teacher_scores), cls_test.labels),
                   "seg_pixel_acc": evaluation.pixel_accuracy(teacher_seg, seg_test.masks)}}
    checkpoint.save_checkpoint(workdir / f"teacher_{args.category}", t_params,
                               {"category": args.category, "metrics": results["teacher"],
                                "config": config.to_dict()}, overwrite=True)

    # Exp. 1: reorder + adapter inside the teacher; g_S = g_T, beta = 1 (same f).
    task_module = teacher.classification_module
    transplant = Transplant(
        category_module=teacher.category_module,
        adapter=Adapter(modules.category_channels(m.width), 1, 3, reorder_seed=config.seed),
        student_task_module=task_module, teacher_task_module=task_module,
        task_dummy_relu="random_mask", adapter_dummy_relu="identity",
        positive_fraction=tc.positive_fraction)
    params = {"category_module": t_params["category_module"],
              "student_task_module": t_params["classification_module"],
              "teacher_task_module": t_params["classification_module"]}
    params["adapter"] = transplant.adapter.init(
        jax.random.key(config.seed + 1),
        jnp.zeros((1, m.image_size // 2, m.image_size // 2, transplant.adapter.channels)))["params"]
    adapter_init = params.pop("adapter")
    frozen = params
    shape = objectives.output_gradient_shape(transplant, image_size=m.image_size,
                                             score_size=tc.score_size)
    cache = objectives.build_chain_cache(transplant, frozen, jax.random.key(config.seed + 2),
                                         tc.num_draws, shape)
    scalars = objectives.compute_scalars(cache, 1.0, tc.lambda0_classification)
    test_x = evaluation.batched_apply(
        lambda im: transplant.features({"category_module": frozen["category_module"]}, im),
        test_images)

    def test_error(adapter_params) -> float:
        scores = evaluation.batched_apply(
            lambda x: transplant.student_output(adapter_params, frozen, x, scalars.beta), test_x)
        return evaluation.classification_error(evaluation.predict_classes(scores),
                                               cls_test.labels)

    rows = {}
    solution = closed_form.solve_single_conv_adapter(
        transplant, cache, scalars, ridge=tc.closed_form_ridge,
        num_draws=min(tc.closed_form_draws, cache.num_draws))
    rows["back-distill, 0 samples (closed form)"] = test_error(solution)

    cls_train = data.binary_classification(splits["train"], [args.category], seed=config.seed)
    shots = data.few_shot(cls_train, args.num_samples, seed=config.seed)
    shot_x = transplant.features({"category_module": frozen["category_module"]},
                                 jnp.asarray(data.normalize_images(shots.images)))
    transfer = objectives.make_transfer_data(transplant, frozen, shot_x,
                                             jnp.asarray(shots.labels),
                                             key=jax.random.key(config.seed + 3),
                                             pad_to=tc.batch_size)
    optimizer = optax.adam(tc.learning_rate)
    for method, init, draws in (("direct-learn", adapter_init, None),
                                ("back-distill", solution, cache)):
        step = train_lib.make_train_step(transplant, method, optimizer)
        state, _ = train_lib.train_adapter(
            step, train_lib.create_train_state(init, optimizer), frozen, scalars,
            num_steps=tc.num_steps, data=transfer, num_samples=args.num_samples,
            batch_size=tc.batch_size, draws=draws, draws_per_step=tc.draws_per_step,
            seed=config.seed, progress=f"{method} {args.num_samples} samples")
        rows[f"{method}, {args.num_samples} samples"] = test_error(state.params)
    results["transplant_cls_error"] = rows
    results["runtime_s"] = time.perf_counter() - start

    print(f"\n{args.category}: teacher test error {results['teacher']['cls_error']:.1f} %, "
          f"segmentation pixel accuracy {results['teacher']['seg_pixel_acc']:.1f} %")
    print("reordered category module transplanted back (Exp. 1, 1-conv 3×3 adapter):")
    width = max(map(len, rows))
    for name, err in rows.items():
        print(f"  {name:<{width}}  test error {err:5.1f} %")
    print(f"runtime {results['runtime_s']:.0f} s; results in {workdir / 'demo_results.json'}")
    (workdir / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
