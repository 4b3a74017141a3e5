"""The Jacobian-matching experiments on the embedded silhouettes.

``nettransplant jacobian`` runs three experiments, every number from
the config (``nettransplant/configs/jacobian_matching.py``):

* **distillation** — a teacher trained on every training image; students
  distilled from ``n`` samples per class by matching outputs alone
  (``outputs``), outputs + Jacobians (``outputs+jacobians``) or outputs on
  noise-augmented copies (``noise``); test accuracy;
* **robustness** — the same students' test accuracy under Gaussian input noise
  of increasing σ;
* **transfer** — a teacher trained on the ``old`` categories; a student learns
  the ``new`` ones from ``n`` samples per class: from scratch (``no transfer``),
  by fine-tuning the teacher (``fine-tuning``, same architecture: the oracle),
  by LwF and LwF plus Jacobian and/or attention matching on the old head.

Every method gets the same steps, batch size and optimizer; hyper-parameters
are fixed in the config (the test split is only read for the final
accuracies). Seeds are fixed, so one config gives the same numbers on CPU.

:func:`run` first checks every field of the config (:func:`validate_config`):
a number out of range, a name outside its choices or an empty list is refused
with one line naming the field before any data is loaded or any model trained.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.experiments.workdir import check_writable
from nettransplant.jacobian import losses, report
from nettransplant.jacobian.data import (
    CATEGORIES,
    SOURCE_SIZE,
    LabelledImages,
    per_class_subset,
    silhouette_splits,
)
from nettransplant.jacobian.models import ConvClassifier, make_classifier
from nettransplant.jacobian.train import batched_apply, fit, make_train_step
from nettransplant.runtime import config_checks as check
from nettransplant.runtime.progress import message, progress_bar
from nettransplant.training.loop import create_train_state

Array = jax.Array

DISTILLATION_METHODS = ("outputs", "outputs+jacobians", "noise")
TRANSFER_METHODS = ("no transfer", "fine-tuning", "LwF", "LwF + Jacobians", "LwF + attention",
                    "LwF + attention + Jacobians")
ALL = "all"


def count_label(samples_per_class: int | str) -> str:
    """``"all"`` or the count as a string (the key used in results)."""
    return ALL if samples_per_class == ALL else str(int(samples_per_class))


def _count(samples_per_class: int | str) -> int | None:
    return None if samples_per_class == ALL else int(samples_per_class)


def _optimizer(cfg) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate)


# --------------------------------------------------------------------------- losses per method


def supervised_loss(model: ConvClassifier, head: str):
    """``loss_fn`` of plain classification: cross-entropy of ``head`` on ``batch["labels"]``."""

    def loss_fn(params, frozen, batch, key):
        del frozen, key
        loss = losses.classification_loss(model.logits(params, batch["images"], head),
                                          batch["labels"])
        return loss, {"task": loss}

    return loss_fn


def distillation_loss(student: ConvClassifier, teacher: ConvClassifier, method: str, cfg):
    """``loss_fn`` of one distillation method (``frozen = {"teacher": params, "sigma": σ}``).

    ``batch`` holds ``images`` and the cached teacher targets ``teacher_logits``,
    ``outputs`` (selected outputs) and ``teacher_gradients`` (normalised).
    """
    if method not in DISTILLATION_METHODS:
        raise ValueError(f"unknown distillation method {method!r}; one of {DISTILLATION_METHODS}")

    def loss_fn(params, frozen, batch, key):
        def student_fn(x):
            return student.logits(params, x, "logits")

        terms = {}
        if method == "outputs":
            terms["outputs"] = losses.output_matching_loss(
                student_fn(batch["images"]), batch["teacher_logits"], cfg.temperature)
        elif method == "outputs+jacobians":
            jacobian, logits = losses.jacobian_matching_loss(
                student_fn, batch["images"], batch["outputs"], batch["teacher_gradients"])
            terms["outputs"] = losses.output_matching_loss(
                logits, batch["teacher_logits"], cfg.temperature)
            terms["jacobians"] = cfg.jacobian_weight * jacobian
        else:  # the teacher answers on the same noisy copies
            def teacher_fn(x):
                return teacher.logits(frozen["teacher"], x, "logits")

            terms["noisy_outputs"], _ = losses.noisy_output_matching_loss(
                student_fn, teacher_fn, batch["images"], key, frozen["sigma"], cfg.temperature)
        return sum(terms.values()), terms

    return loss_fn


def lwf_transfer_loss(student: ConvClassifier, method: str, cfg):
    """``loss_fn`` of LwF and its Jacobian / attention variants (student heads ``new``, ``old``).

    ``batch`` holds ``images``, ``labels`` (new task) and the teacher's cached
    responses on them: ``teacher_logits`` (old head), ``outputs``,
    ``teacher_gradients`` and ``attention/<layer>`` maps.
    """
    jacobians = "Jacobians" in method
    attention = "attention" in method

    def loss_fn(params, frozen, batch, key):
        del frozen, key

        def old_head(x):
            logits, inter = student.apply(params, x)
            return logits["old"], (logits["new"], inter)

        if jacobians:
            jacobian, old, (new, inter) = losses.jacobian_matching_loss(
                old_head, batch["images"], batch["outputs"], batch["teacher_gradients"],
                has_aux=True)
        else:
            old, (new, inter) = old_head(batch["images"])
        terms = losses.lwf_loss(new, batch["labels"], old, batch["teacher_logits"],
                                temperature=cfg.temperature, old_weight=cfg.lwf_weight)
        if jacobians:
            terms["jacobians"] = cfg.jacobian_weight * jacobian
        if attention:
            teacher_maps = {layer: batch[f"attention/{layer}"] for layer in cfg.attention_layers}
            terms["attention"] = cfg.attention_weight * losses.attention_transfer_loss(
                inter, teacher_maps, cfg.attention_layers)
        return sum(terms.values()), terms

    return loss_fn


# --------------------------------------------------------------------------- evaluation


@functools.cache
def _predictor(model: ConvClassifier, head: str):
    @jax.jit
    def predict(params, images, key, sigma):
        noisy = losses.gaussian_noise(key, images, sigma)
        return jnp.argmax(model.logits(params, noisy, head), axis=-1)

    return predict


def _chunks(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Fixed-size row chunks (the last one padded by repeating its last row, cut after)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out.append(np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk))]))
    return out


def predictions(model: ConvClassifier, params, head: str, images: np.ndarray, *,
                batch_size: int, sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """Predicted classes ``(N,)`` of ``head`` on ``images`` + Gaussian noise of std ``sigma``."""
    predict = _predictor(model, head)
    keys = jax.random.split(jax.random.key(seed), -(-len(images) // batch_size))
    chunks = [predict(params, images[r], keys[i], jnp.float32(sigma))
              for i, r in enumerate(_chunks(np.arange(len(images)), batch_size))]
    return np.concatenate(jax.device_get(chunks))[: len(images)]


def accuracy(model: ConvClassifier, params, head: str, data: LabelledImages, *,
             batch_size: int, sigma: float = 0.0, seed: int = 0) -> float:
    """Test accuracy (%) of ``head``, on inputs with Gaussian noise of std ``sigma`` (seeded)."""
    predicted = predictions(model, params, head, data.images, batch_size=batch_size,
                            sigma=sigma, seed=seed)
    return float(100.0 * np.mean(predicted == data.labels))


def select_noise_sigma(model: ConvClassifier, params, head: str, images: np.ndarray, *,
                       grid, min_agreement: float, batch_size: int, seed: int
                       ) -> tuple[float, dict[str, float]]:
    """The training noise of noise-augmented distillation, chosen on training images only.

    The equivalence with Jacobian matching is a small-σ one, and a teacher
    queried far from its data answers noise: take the largest σ of ``grid`` at
    which the teacher's predictions on ``x + ξ`` still agree with its
    predictions on ``x`` for at least ``min_agreement`` of the images.

    Returns:
      ``(σ, {str(σ): agreement})`` (the smallest σ of the grid if none qualifies).
    """
    clean = predictions(model, params, head, images, batch_size=batch_size)
    agreement = {}
    for sigma in sorted(float(s) for s in grid):
        noisy = predictions(model, params, head, images, batch_size=batch_size, sigma=sigma,
                            seed=seed)
        agreement[f"{sigma:g}"] = float(np.mean(noisy == clean))
    passing = [float(k) for k, v in agreement.items() if v >= min_agreement]
    return (max(passing) if passing else min(float(k) for k in agreement)), agreement


@functools.cache
def _targets_fn(model: ConvClassifier, head: str, selection: str,
                attention_layers: tuple[str, ...]):
    @jax.jit
    def targets(params, images, labels):
        logits = model.logits(params, images, head)
        outputs = losses.selected_outputs(logits, labels, selection)

        def fn(x):
            out, inter = model.apply(params, x)
            return out[head], inter

        _, grads, inter = losses.input_gradients(fn, images, outputs, has_aux=True)
        cached = {"teacher_logits": logits, "outputs": outputs,
                  "teacher_gradients": losses.normalise_per_example(grads)}
        for layer in attention_layers:
            cached[f"attention/{layer}"] = losses.attention_maps(inter[layer])
        return cached

    return targets


def teacher_targets(model: ConvClassifier, params, head: str, data: LabelledImages, *,
                    selection: str, attention_layers: Sequence[str] = (),
                    batch_size: int) -> dict[str, np.ndarray]:
    """The teacher's fixed responses on ``data``, computed once and cached per image.

    Returns:
      ``{"teacher_logits" (N, K), "outputs" (N, n), "teacher_gradients" (N, n, D),
      "attention/<layer>" (N, H·W)}`` as host arrays.
    """
    fn = _targets_fn(model, head, selection, tuple(attention_layers))
    return batched_apply(fn, data.images, data.labels, batch_size=batch_size, args=(params,))


# --------------------------------------------------------------------------- training


def train_classifier(model: ConvClassifier, head: str, data: LabelledImages, cfg, *, seed: int,
                     what: str) -> dict:
    """Supervised training of ``head`` from a seeded initialisation; returns the parameters."""
    optimizer = _optimizer(cfg)
    state = create_train_state(model.init(jax.random.key(seed)), optimizer)
    step = make_train_step(supervised_loss(model, head), optimizer)
    state, _ = fit(step, state, None, {"images": data.images, "labels": data.labels},
                   batch_size=cfg.batch_size, num_steps=cfg.num_steps, seed=seed,
                   log_every=cfg.log_every, progress=what, what=what)
    return state.params


# --------------------------------------------------------------------------- the runs


def run_distillation(config, teacher: ConvClassifier, teacher_params, splits, bar) -> dict:
    """Distillation and robustness: ``{"distillation": …, "robustness": …}``."""
    cfg = config.distillation
    student = make_classifier(config.student, {"logits": len(config.categories)},
                              config.image_size)
    train_set, test_set = splits["train"], splits["test"]
    cached = teacher_targets(teacher, teacher_params, "logits", train_set,
                             selection=cfg.selection, batch_size=config.eval_batch_size)
    cached = {"images": train_set.images, **cached}
    probe = np.random.default_rng(config.seed).permutation(len(train_set))
    noise_sigma, agreement = select_noise_sigma(
        teacher, teacher_params, "logits",
        train_set.images[np.sort(probe[:cfg.noise_selection_images])],
        grid=cfg.noise_sigma_grid, min_agreement=cfg.noise_min_agreement,
        batch_size=config.eval_batch_size, seed=config.seed)
    message(f"noise-augmented distillation: σ = {noise_sigma:g} (teacher agreement on noisy "
            f"training images {agreement})")
    frozen = {"teacher": teacher_params, "sigma": jnp.float32(noise_sigma)}
    sigmas = [float(s) for s in config.robustness.sigmas]
    distill = {m: {} for m in cfg.methods}
    robust = {m: {} for m in cfg.methods}
    for method in cfg.methods:
        loss_fn = distillation_loss(student, teacher, method, cfg)
        step = make_train_step(loss_fn, _optimizer(cfg))
        for n in cfg.samples_per_class:
            label = count_label(n)
            accs, curves = [], []
            for seed in config.student_seeds:
                rows = _subset_rows(train_set, _count(n), seed)
                what = f"distill {method} n={label} seed={seed}"
                state = create_train_state(student.init(jax.random.key(seed)), _optimizer(cfg))
                state, _ = fit(step, state, frozen,
                               {k: v[rows] for k, v in cached.items()},
                               batch_size=cfg.batch_size, num_steps=cfg.num_steps, seed=seed,
                               log_every=cfg.log_every, progress=what, what=what)
                accs.append(accuracy(student, state.params, "logits", test_set,
                                     batch_size=config.eval_batch_size))
                curves.append([accuracy(student, state.params, "logits", test_set,
                                        batch_size=config.eval_batch_size, sigma=s,
                                        seed=config.robustness.noise_seed) for s in sigmas])
                bar.update()
                bar.set_postfix_str(f"{what}: {accs[-1]:.1f} %")
            distill[method][label] = float(np.mean(accs))
            robust[method][label] = [float(v) for v in np.mean(curves, axis=0)]
    teacher_curve = [accuracy(teacher, teacher_params, "logits", test_set,
                              batch_size=config.eval_batch_size, sigma=s,
                              seed=config.robustness.noise_seed) for s in sigmas]
    return {"distillation": distill,
            "noise_selection": {"sigma": noise_sigma, "teacher_agreement": agreement},
            "robustness": {"sigmas": sigmas, "students": robust, "teacher": teacher_curve}}


def _subset_rows(data: LabelledImages, samples_per_class: int | None, seed: int) -> np.ndarray:
    """Rows of :func:`per_class_subset` (nested per seed)."""
    if samples_per_class is None:
        return np.arange(len(data))
    tagged = LabelledImages(np.arange(len(data))[:, None], data.labels, data.categories)
    return per_class_subset(tagged, samples_per_class, seed).images[:, 0]


def run_transfer(config, bar) -> dict:
    """The transfer table: ``{method: {count: accuracy}}`` plus the teacher's accuracy."""
    cfg = config.transfer
    old = make_classifier(config.teacher, {"old": len(cfg.old_categories)}, config.image_size)
    old_splits = silhouette_splits(config.image_size, cfg.old_categories)
    new_splits = silhouette_splits(config.image_size, cfg.new_categories)
    teacher_params = train_classifier(old, "old", old_splits["train"], config.teacher_training,
                                      seed=config.seed, what="transfer teacher")
    teacher_accuracy = accuracy(old, teacher_params, "old", old_splits["test"],
                                batch_size=config.eval_batch_size)
    bar.update()
    message(f"transfer teacher ({', '.join(cfg.old_categories)}): {teacher_accuracy:.1f} % test")

    heads = {"new": len(cfg.new_categories), "old": len(cfg.old_categories)}
    student = make_classifier(config.student, heads, config.image_size)
    finetuned = make_classifier(config.teacher, {"new": len(cfg.new_categories)},
                                config.image_size)
    train_set, test_set = new_splits["train"], new_splits["test"]
    cached = teacher_targets(old, teacher_params, "old", train_set, selection=cfg.selection,
                             attention_layers=cfg.attention_layers,
                             batch_size=config.eval_batch_size)
    cached = {"images": train_set.images, "labels": train_set.labels, **cached}
    table: dict[str, dict[str, float]] = {m: {} for m in cfg.methods}
    for method in cfg.methods:
        if method == "no transfer":
            model, head, loss_fn = student, "new", supervised_loss(student, "new")
        elif method == "fine-tuning":
            model, head, loss_fn = finetuned, "new", supervised_loss(finetuned, "new")
        elif method in TRANSFER_METHODS:
            model, head, loss_fn = student, "new", lwf_transfer_loss(student, method, cfg)
        else:
            raise ValueError(f"unknown transfer method {method!r}; one of {TRANSFER_METHODS}")
        step = make_train_step(loss_fn, _optimizer(cfg))
        keys = ("images", "labels") if method in ("no transfer", "fine-tuning") else tuple(cached)
        for n in cfg.samples_per_class:
            label = count_label(n)
            accs = []
            for seed in config.student_seeds:
                rows = _subset_rows(train_set, _count(n), seed)
                params = model.init(jax.random.key(seed))
                if method == "fine-tuning":  # the oracle: the teacher's trunk, a new head
                    params = {"trunk": teacher_params["trunk"], "heads": params["heads"]}
                what = f"transfer {method} n={label} seed={seed}"
                state = create_train_state(params, _optimizer(cfg))
                state, _ = fit(step, state, None, {k: cached[k][rows] for k in keys},
                               batch_size=cfg.batch_size, num_steps=cfg.num_steps, seed=seed,
                               log_every=cfg.log_every, progress=what, what=what)
                accs.append(accuracy(model, state.params, head, test_set,
                                     batch_size=config.eval_batch_size))
                bar.update()
                bar.set_postfix_str(f"{what}: {accs[-1]:.1f} %")
            table[method][label] = float(np.mean(accs))
    return {"table": table, "teacher_accuracy": teacher_accuracy,
            "old_categories": list(cfg.old_categories),
            "new_categories": list(cfg.new_categories), "test_images": len(test_set)}


def num_trainings(config) -> int:
    seeds = len(config.student_seeds)
    return (1 + len(config.distillation.methods) * len(config.distillation.samples_per_class)
            * seeds + 1 + len(config.transfer.methods)
            * len(config.transfer.samples_per_class) * seeds)


# --------------------------------------------------------------------------- the config


def _check_model(config, name: str) -> int:
    """The ``teacher``/``student`` architecture; returns its number of blocks."""
    blocks = check.numbers(config, f"{name}.block_channels", int, low=1, high=4096)
    check.count(config, f"{name}.convs_per_block", 1, 64)
    check.count(config, f"{name}.hidden", 1, 65536)
    return len(blocks)


def _check_training(config, section: str) -> None:
    """The optimiser settings every training of ``section`` shares."""
    check.positive(config, f"{section}.learning_rate")
    check.count(config, f"{section}.batch_size", 1, check.MAX_BATCH)
    check.count(config, f"{section}.num_steps", 1, check.MAX_STEPS)
    check.count(config, f"{section}.log_every", 1, check.MAX_STEPS)


def _check_samples_per_class(config, name: str) -> None:
    for i, n in enumerate(check.sequence(config, name)):
        if n == ALL:
            continue
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= check.MAX_SAMPLES:
            raise ValueError(f"config.{name}[{i}] must be an integer in [1, "
                             f"{check.MAX_SAMPLES}] or {ALL!r}, got {n!r}")


def validate_config(config) -> None:
    """Check every field of a Jacobian-matching config
    (``nettransplant/configs/jacobian_matching.py``).

    Rates and temperatures finite and > 0, weights and noise levels finite and
    >= 0, steps, batch sizes and sample counts >= 1, seeds >= 0, methods,
    categories, ``selection`` and attention layers among their choices.

    Raises:
      ValueError: one line naming the first bad field and what it must be.
    """
    check.count(config, "seed", 0, check.MAX_SEED)
    check.numbers(config, "student_seeds", int, low=0, high=check.MAX_SEED)
    check.choices(config, "categories", CATEGORIES, min_len=2)
    check.count(config, "eval_batch_size", 1, check.MAX_BATCH)
    depth = {name: _check_model(config, name) for name in ("teacher", "student")}
    size = check.count(config, "image_size", 1, SOURCE_SIZE)
    if SOURCE_SIZE % size:
        raise ValueError(f"config.image_size must divide {SOURCE_SIZE}, got {size}")
    deepest = max(depth.values())
    if size < 2 ** deepest:
        raise ValueError(f"config.image_size must be >= {2 ** deepest} (each of the "
                         f"{deepest} blocks halves it), got {size}")
    _check_training(config, "teacher_training")

    check.choices(config, "distillation.methods", DISTILLATION_METHODS)
    _check_samples_per_class(config, "distillation.samples_per_class")
    _check_training(config, "distillation")
    check.positive(config, "distillation.temperature")
    check.field(config, "distillation.jacobian_weight", low=0)
    check.choice(config, "distillation.selection", losses.SELECTIONS)
    check.numbers(config, "distillation.noise_sigma_grid", low=0)
    check.field(config, "distillation.noise_min_agreement", low=0, high=1)
    check.count(config, "distillation.noise_selection_images", 1, check.MAX_SAMPLES)

    check.numbers(config, "robustness.sigmas", low=0)
    check.count(config, "robustness.noise_seed", 0, check.MAX_SEED)

    check.choices(config, "transfer.old_categories", CATEGORIES)
    check.choices(config, "transfer.new_categories", CATEGORIES)
    methods = check.choices(config, "transfer.methods", TRANSFER_METHODS)
    _check_samples_per_class(config, "transfer.samples_per_class")
    _check_training(config, "transfer")
    check.positive(config, "transfer.temperature")
    for weight in ("lwf_weight", "jacobian_weight", "attention_weight"):
        check.field(config, f"transfer.{weight}", low=0)
    check.choice(config, "transfer.selection", losses.SELECTIONS)
    # Attention maps are matched at pooling layers both the teacher and the student have.
    pools = [f"pool{b + 1}" for b in range(min(depth.values()))]
    check.choices(config, "transfer.attention_layers", pools,
                  min_len=int(any("attention" in m for m in methods)))


# --------------------------------------------------------------------------- the runs


def run(config, workdir: str | Path) -> dict:
    """Every run of the config; writes ``results.json``, ``results.md`` and the plots.

    The config is checked first (:func:`validate_config`), then that ``workdir`` takes
    new files.

    Returns:
      The ``results.json`` dict.
    """
    validate_config(config)
    start = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_writable(workdir)  # before the runs, not after them
    bar = progress_bar(num_trainings(config), "jacobian matching")
    try:
        splits = silhouette_splits(config.image_size, config.categories)
        teacher = make_classifier(config.teacher, {"logits": len(config.categories)},
                                  config.image_size)
        teacher_params = train_classifier(teacher, "logits", splits["train"],
                                          config.teacher_training, seed=config.seed,
                                          what="teacher")
        teacher_accuracy = accuracy(teacher, teacher_params, "logits", splits["test"],
                                    batch_size=config.eval_batch_size)
        bar.update()
        message(f"teacher: {teacher_accuracy:.1f} % test accuracy")
        results: dict[str, Any] = {
            "config": json.loads(config.to_json()),
            "teacher_accuracy": teacher_accuracy,
            "test_images": len(splits["test"]),
        }
        results.update(run_distillation(config, teacher, teacher_params, splits, bar))
        results["transfer"] = run_transfer(config, bar)
    finally:
        bar.close()
    results["claims"] = report.claims(results)
    results["runtime_s"] = round(time.monotonic() - start, 1)
    report.write_outputs(results, workdir)
    return results
