"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables and plots.

    python -m launch.reproduce --workdir workdir/reproduce
    python -m launch.reproduce --workdir W --config configs/silhouettes.py:quick
    python -m launch.reproduce --workdir W --config.generic_category=elephant
    python -m launch.reproduce --workdir W --config configs/voc_vgg16.py \
        --config.voc.manual_dir=D --config.pretrain.weights=vgg16.pth   # paper scale

Every image set comes from the benchmark ``config.data`` names
(:mod:`nettransplant.data.benchmarks`): the embedded silhouettes or VOC + SBD.

Stages (each shows a progress bar with rate and ETA):

1. Per-category teachers (embedded: trained on their training silhouettes
   composited in several scenes, ``config.teacher.renderings``), from
   torchvision's VGG-16 (``config.pretrain.weights``), a shared backbone
   (``config.pretrain.num_steps``: 10-way classification + segmentation of every
   category) or from scratch, and the leave-one-out generic modules of Table 4. Each is an
   orbax checkpoint under ``W/teachers/`` with its metadata (category, config, metrics, curve). A
   re-run reuses every checkpoint whose configuration matches; an interrupted
   teacher resumes from ``W/teachers/<name>.partial`` and ends with the same
   parameters as an uninterrupted run.
2. Transplants: Exp. 1 (adapters inside each teacher), Exp. 2/3 (to the
   generic category's classification / segmentation module), Table 4 (to the
   leave-one-out modules), every method and sample count of the config.
3. ``W/results.json`` (layout in the README), ``W/results.md`` (paper-format
   tables with the paper's numbers, and the claims checked), ``W/fig5_pca.png``,
   ``W/learning_curves.png`` (+ ``.json``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

import configs
from nettransplant import (
    checkpoint,
    convert,
    data,
    evaluation,
    experiments,
    modules,
    objectives,
    report,
    teachers,
)
from nettransplant.adapter import Adapter
from nettransplant.data import benchmarks
from nettransplant.transplant import Transplant

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "experiment config (a configs/*.py file[:variant])")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/reproduce", "where everything is written")

EXPERIMENTS = ("exp1", "exp2", "exp3", "table4")


def validate_config(config) -> None:
    """Fail early, naming the config field, on categories or experiments that cannot run."""
    if config.data not in benchmarks.BENCHMARKS:
        raise ValueError(f"config.data={config.data!r}: unknown benchmark; choose from "
                         f"{list(benchmarks.BENCHMARKS)}")
    benchmark = benchmarks.BENCHMARKS[config.data]

    def known(field, names):
        bad = [n for n in names if n not in benchmark.categories]
        if bad:
            raise ValueError(f"config.{field}: unknown categories {bad}; {config.data!r} has "
                             f"{list(benchmark.categories)}")

    known("categories", config.categories)
    known("target_categories", config.target_categories)
    known("generic_category", [config.generic_category])
    if config.generic_category in config.target_categories:
        raise ValueError(f"config.generic_category={config.generic_category!r} is also in "
                         f"config.target_categories {list(config.target_categories)}: a category "
                         "transplanted to its own task module is Exp. 1")
    bad = [e for e in config.experiments if e not in EXPERIMENTS]
    if bad:
        raise ValueError(f"config.experiments: unknown {bad}; choose from {list(EXPERIMENTS)}")
    if "table4" in config.experiments:
        not_mammal = [c for c in config.target_categories if c not in benchmark.mammals]
        if not_mammal:
            raise ValueError(f"config.target_categories: Table 4's leave-one-out modules hold "
                             f"out a mammal, got {not_mammal}")
    for field, value, low in (("pretrain.num_steps", config.pretrain.num_steps, 0),
                              ("teacher.num_steps", config.teacher.num_steps, 1),
                              ("teacher.renderings", config.teacher.renderings, 1),
                              ("teacher.batch_size", config.teacher.batch_size, 1),
                              ("teacher.seg_batch_size", config.teacher.seg_batch_size, 1)):
        if int(value) < low:
            raise ValueError(f"config.{field} must be >= {low}, got {value}")
    counts = [int(n) for n in config.sample_counts]
    if any(n < 0 for n in counts) or sorted(set(counts)) != counts:
        raise ValueError(f"config.sample_counts must be increasing and >= 0, got {counts}")
    benchmark.check_config(config)
    weights = config.pretrain.get("weights", "")
    if weights:
        if config.pretrain.num_steps:
            raise ValueError("config.pretrain.weights and config.pretrain.num_steps > 0 are "
                             "two initialisations of the teachers; set num_steps to 0")
        if not Path(weights).is_file():
            raise ValueError(f"config.pretrain.weights: no file {weights}")
        size = convert.INPUT_SIZE
        if config.model.width != 1.0 or config.model.image_size != size:
            raise ValueError(
                f"config.pretrain.weights holds torchvision's full VGG-16: it needs "
                f"config.model.width = 1.0 and config.model.image_size = {size}, got "
                f"{config.model.width} and {config.model.image_size}")


# ----------------------------------------------------------------------------- teachers


class TeacherZoo:
    """Trains, checkpoints and reuses the backbone, category teachers and generic modules."""

    def __init__(self, config, workdir: Path, benchmark: benchmarks.Benchmark, progress: bool):
        self.config, self.benchmark, self.progress = config, benchmark, progress
        self.root = workdir / "teachers"
        self.root.mkdir(parents=True, exist_ok=True)
        m = config.model
        self.teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                            dropout_rate=m.dropout_rate,
                                            num_classes=m.num_classes)
        self.metrics: dict[str, dict] = {}
        self.curves: dict[str, list] = {}
        self._backbone = None
        self._torchvision = None
        self._steps: dict = {}

    def _fingerprint(self, name: str, extra: dict) -> str:
        c = self.config
        pretrain = c.pretrain.to_dict()
        if not pretrain.get("weights"):  # teachers fingerprinted before the field existed
            pretrain.pop("weights", None)
        spec = {"name": name, "seed": c.seed, "data": c.data,
                "data_version": self.benchmark.version, "model": c.model.to_dict(),
                "pretrain": pretrain, **extra}
        if name != "backbone":  # the backbone does not depend on how teachers are trained
            spec["teacher"] = c.teacher.to_dict()
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _train(self, name: str, teacher: modules.Teacher, init_params, *, training_sets,
               num_steps: int, learning_rate: float, seed: int,
               metrics_fn, extra: dict, batch_sizes: tuple[int, int] | None = None):
        """Train (or reuse, or resume) one teacher; returns its parameters.

        ``training_sets``: returns ``train_teacher``'s image and label arrays; called
        only when the teacher is trained (a reused checkpoint needs no data).
        ``batch_sizes``: (classification, segmentation) images per step; default
        the teachers' (``config.teacher``).
        """
        cls_batch, seg_batch = batch_sizes or (self.config.teacher.batch_size,
                                               self.config.teacher.seg_batch_size)
        final, partial = self.root / name, self.root / f"{name}.partial"
        fingerprint = self._fingerprint(name, extra)
        if (teacher, learning_rate) not in self._steps:  # one compilation per shape
            optimizer = optax.adam(learning_rate)
            self._steps[teacher, learning_rate] = (
                optimizer, teachers.make_teacher_step(teacher, optimizer))
        optimizer, step_fn = self._steps[teacher, learning_rate]
        if checkpoint.is_checkpoint(final):
            meta = checkpoint.load_metadata(final)
            if meta.get("fingerprint") == fingerprint:
                params, meta = checkpoint.load_checkpoint(final, target=init_params)
                self.metrics[name], self.curves[name] = meta["metrics"], meta["history"]
                return params
            tqdm.write(f"{final}: trained with another configuration; training again")
        state = teachers.TrainState(jnp.zeros((), jnp.int32), init_params,
                                    optimizer.init(init_params))
        history: list = []
        if checkpoint.is_checkpoint(partial):
            meta = checkpoint.load_metadata(partial)
            if meta.get("fingerprint") == fingerprint:
                saved, meta = checkpoint.load_checkpoint(partial, target=_as_tree(state))
                state = teachers.TrainState(saved["step"], saved["params"], saved["opt_state"])
                history = meta["history"]
                tqdm.write(f"{name}: resuming at step {int(state.step)} of {num_steps}")

        def save_partial(s, h):
            checkpoint.save_checkpoint(partial, _as_tree(s),
                                       {"fingerprint": fingerprint, "history": h},
                                       overwrite=True)

        state, history = teachers.train_teacher(
            teacher, state, **training_sets(), optimizer=optimizer,
            num_steps=num_steps, batch_size=cls_batch, seg_batch_size=seg_batch, seed=seed,
            progress=f"teacher {name}" if self.progress else False, history=history,
            checkpoint_every=self.config.teacher.checkpoint_every, on_checkpoint=save_partial,
            step_fn=step_fn)
        metrics = metrics_fn(teacher, state.params)
        checkpoint.save_checkpoint(final, state.params, {
            "fingerprint": fingerprint, "name": name, **extra, "metrics": metrics,
            "history": history, "config": self.config.to_dict()}, overwrite=True)
        shutil.rmtree(partial, ignore_errors=True)
        self.metrics[name], self.curves[name] = metrics, history
        return state.params

    def backbone(self):
        """The shared 10-way backbone (the stand-in for ImageNet pre-training)."""
        if self._backbone is None:
            c, m = self.config, self.config.model
            net = modules.make_teacher(width=m.width, input_size=m.image_size,
                                       num_outputs=len(data.CATEGORIES),
                                       dropout_rate=m.dropout_rate, num_classes=m.num_classes)
            train = self.benchmark.pretraining_set("train")
            init = net.init({"params": jax.random.key(c.seed)},
                            jnp.zeros((1, m.image_size, m.image_size, 3)))["params"]

            def metrics(net, params):
                test = self.benchmark.pretraining_set("test")
                scores = evaluation.batched_apply(
                    lambda im: _classification_scores(net, params, im),
                    data.normalize_images(test.images))
                predicted = np.asarray(scores).reshape(len(test), -1).argmax(-1)
                return {"accuracy_10way": float(100 * np.mean(predicted == test.categories)),
                        "seg_pixel_acc": _seg_acc(net, params, test)}

            self._backbone = self._train(
                "backbone", net, init,
                training_sets=lambda: _training_sets(train, train, "categories"),
                num_steps=c.pretrain.num_steps, learning_rate=c.pretrain.learning_rate,
                seed=c.seed, metrics_fn=metrics,
                extra={"categories": list(self.benchmark.categories), "kind": "backbone"},
                batch_sizes=(c.pretrain.batch_size, c.pretrain.batch_size))
        return self._backbone

    def torchvision_backbone(self):
        """torchvision's VGG-16 (``config.pretrain.weights``) as teacher parameters, FCN-8s
        segmentation module initialised from it (the paper's ImageNet initialisation)."""
        if self._torchvision is None:
            _, self._torchvision = convert.load_torchvision_teacher(
                self.config.pretrain.weights, num_classes=self.config.model.num_classes)
        return self._torchvision

    def _init(self, name: str):
        """A teacher's initialisation: torchvision's VGG-16 or the backbone's layers, if
        there is one, else random (fc8 is always fresh: its outputs differ)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), _stable_hash(name))
        size = self.config.model.image_size
        if self.config.pretrain.get("weights", ""):
            return teachers.transfer_backbone(self.teacher, self.torchvision_backbone(), key,
                                              size)
        if self.config.pretrain.num_steps == 0:
            return self.teacher.init({"params": key}, jnp.zeros((1, size, size, 3)))["params"]
        return teachers.transfer_backbone(self.teacher, self.backbone(), key, size)

    def category(self, category: str):
        """The teacher of one category: "category vs random images" + its segmentation."""
        c, bench = self.config, self.benchmark

        def metrics(net, params):
            return {"cls_error": _cls_error(net, params, bench.classification(category, "test")),
                    "seg_pixel_acc": _seg_acc(net, params, bench.segmentation(category, "test"))}

        return self._train(
            category, self.teacher, self._init(category),
            training_sets=lambda: _training_sets(*bench.teacher_sets(category)),
            num_steps=c.teacher.num_steps, learning_rate=c.teacher.learning_rate,
            seed=c.seed + _stable_hash(category) % 1000, metrics_fn=metrics,
            extra={"category": category, "kind": "category"})

    def leave_one_out(self, held_out: str):
        """Table 4's generic module: every other mammal + the dissimilar categories
        (classification "any of them vs random images", segmentation of them all;
        :meth:`Benchmark.generic_sets`)."""
        c, bench = self.config, self.benchmark
        categories = bench.leave_one_out_categories(held_out)

        def metrics(net, params):
            cls_test, seg_test = bench.generic_sets(held_out, "test")
            return {"cls_error": _cls_error(net, params, cls_test),
                    "seg_pixel_acc": _seg_acc(net, params, seg_test)}

        name = f"generic_without_{held_out}"
        return self._train(
            name, self.teacher, self._init(name),
            training_sets=lambda: _training_sets(*bench.generic_sets(held_out, "train")),
            num_steps=c.teacher.num_steps,
            learning_rate=c.teacher.learning_rate, seed=c.seed + _stable_hash(name) % 1000,
            metrics_fn=metrics,
            extra={"categories": list(categories), "held_out": held_out, "kind": "generic"})


def _training_sets(cls: data.ImageSet, seg: data.ImageSet, labels: str = "labels") -> dict:
    """``train_teacher``'s arrays from a classification and a segmentation set."""
    if cls is seg:  # one normalisation for a set serving both tasks (the backbone's)
        images = seg_images = data.normalize_images(cls.images)
    else:
        images, seg_images = (data.normalize_images(v.images) for v in (cls, seg))
    return {"cls_images": images, "cls_labels": getattr(cls, labels).astype(np.int32),
            "seg_images": seg_images, "seg_masks": seg.masks.astype(np.int32)}


def _as_tree(state: teachers.TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _stable_hash(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


_classification_scores = jax.jit(teachers.classification_scores, static_argnums=0)
_segmentation_scores = jax.jit(teachers.segmentation_scores, static_argnums=0)


def _cls_error(net, params, view) -> float:
    scores = evaluation.batched_apply(lambda im: _classification_scores(net, params, im),
                                      data.normalize_images(view.images))
    return evaluation.classification_error(evaluation.predict_classes(scores), view.labels)


def _seg_acc(net, params, view) -> float:
    predicted = evaluation.batched_apply(
        lambda im: jnp.argmax(_segmentation_scores(net, params, im), -1),
        data.normalize_images(view.images))
    return evaluation.pixel_accuracy(predicted, view.masks)


# ----------------------------------------------------------------------------- transplants


class Runner:
    """Builds each transplant problem and runs its methods over the sample counts."""

    def __init__(self, config, zoo: TeacherZoo, bar: tqdm):
        self.config, self.zoo, self.bar = config, zoo, bar
        self.benchmark = zoo.benchmark
        tc = config.transplant
        self.steps = experiments.StepCache(optax.adam(tc.learning_rate))
        self.channels = modules.category_channels(config.model.width)
        self.pad_to = max(tc.batch_size, max(config.sample_counts))
        self.curves: dict = {}
        self.fig5: dict = {}
        # {experiment: {target: back-distillation loss of the warm start / λ0}}: the
        # share of the teacher's pseudo-gradient the best single conv leaves unexplained.
        self.residual: dict = {}
        # {experiment: {target: {method: {n: %}}}}: each run's metric on its own labelled
        # samples, to tell a method that generalises badly from one that has not fit.
        self.train_fit: dict = {}

    def _adapter(self, spec) -> Adapter:
        num_convs, kernel = spec
        return Adapter(self.channels, num_convs, kernel, reorder_seed=self.config.seed)

    def _beta(self, f_source, source_categories, f_target, target_category) -> float:
        """β = E_S‖f_S(I)‖ / E_T‖f(I)‖ on unlabelled train images (paper Sec. 3)."""
        c = self.config
        n = c.transplant.beta_images
        source = self.benchmark.unlabelled(source_categories, n)
        target = self.benchmark.unlabelled([target_category], n)
        f = self.zoo.teacher.category_module
        fs = experiments.features(f, f_source, data.normalize_images(source))
        ft = experiments.features(f, f_target, data.normalize_images(target))
        return float(objectives.estimate_beta(fs, ft))

    def problem(self, experiment: str, task: str, adapter_spec, protocol: str, target: str,
                student: dict, teacher: dict, beta: float):
        """One transplant problem, back-distillation's warm start and its residual.

        Returns ``(transplant, problem, warm_start, exact, residual)``; ``residual``
        is the back-distillation loss of the warm start / λ0.
        """
        c, tc = self.config, self.config.transplant
        module = "segmentation_module" if task == "segmentation" else "classification_module"
        task_module = getattr(self.zoo.teacher, module)
        transplant = Transplant(
            category_module=self.zoo.teacher.category_module,
            adapter=self._adapter(adapter_spec), student_task_module=task_module,
            teacher_task_module=task_module, task_dummy_relu=experiments.task_dummies(
                protocol, task_module), adapter_dummy_relu="identity",
            positive_fraction=tc.positive_fraction)
        frozen = {"category_module": teacher["category_module"],
                  "student_task_module": student[module],
                  "teacher_task_module": teacher[module]}
        if task == "segmentation":
            view = self.benchmark.segmentation(target, "test")
            test_targets = view.masks
        else:
            view = self.benchmark.classification(target, "test")
            test_targets = view.labels
        key = _problem_key(c, experiment, target)
        lambda0 = (tc.lambda0_segmentation if task == "segmentation"
                   else tc.lambda0_classification)
        problem = experiments.make_problem(
            transplant, frozen, key=key, beta=beta, lambda0=lambda0, num_draws=tc.num_draws,
            image_size=c.model.image_size, score_size=tc.score_size,
            test_images=data.normalize_images(view.images), test_targets=test_targets)
        warm_start, exact = experiments.zero_sample_solution(
            problem, ridge=tc.closed_form_ridge, num_draws=tc.closed_form_draws)
        residual = float(objectives.back_distill_term(transplant, warm_start, problem.cache,
                                                      problem.scalars)) / lambda0
        return transplant, problem, warm_start, exact, residual

    def run(self, experiment: str, task: str, adapter_spec, protocol: str, target: str,
            student: dict, teacher: dict, beta: float, counts, curve_key: str):
        """All methods × ``counts`` for one target category; returns ``{method: {n: %}}``."""
        c, tc = self.config, self.config.transplant
        _, problem, warm_start, exact, residual = self.problem(
            experiment, task, adapter_spec, protocol, target, student, teacher, beta)
        self.residual.setdefault(experiment, {})[target] = residual
        key = _problem_key(c, experiment, target)
        pool = (self.benchmark.segmentation(target, "train") if task == "segmentation"
                else self.benchmark.classification(target, "train"))
        out: dict = {}
        for n in counts:
            shots = data.few_shot(pool, n, seed=c.seed)
            targets = shots.masks.astype(np.int32) if task == "segmentation" else shots.labels
            transfer = None
            if n:
                transfer = experiments.transfer_data(
                    problem, data.normalize_images(shots.images), targets,
                    key=jax.random.fold_in(key, n), pad_to=self.pad_to)
            for method in experiments.methods_for(task):
                if n == 0 and method != "back-distill":
                    continue
                self.bar.set_postfix_str(f"{experiment} {target} {method} n={n}")
                if method == "back-distill" and n == 0 and exact:
                    params, history = warm_start, []
                else:
                    init = warm_start if method == "back-distill" else problem.adapter_init
                    params, history = experiments.fit(
                        problem, method, self.steps, data=transfer, num_samples=n, init=init,
                        num_steps=tc.num_steps, batch_size=tc.batch_size,
                        draws_per_step=tc.draws_per_step, seed=c.seed + n,
                        log_every=tc.log_every)
                out.setdefault(method, {})[str(n)] = experiments.evaluate(problem, params)
                if n:
                    self.train_fit.setdefault(experiment, {}).setdefault(target, {}).setdefault(
                        method, {})[str(n)] = experiments.training_fit(problem, params,
                                                                       transfer, n)
                if history:
                    self.curves.setdefault(curve_key, {}).setdefault(method, {}).setdefault(
                        str(n), []).append([h["loss"] for h in history])
                if experiment == "exp1_3conv" and target == c.categories[0] and \
                        method in ("back-distill", "direct-learn") and n == _fig5_count(c):
                    self.fig5[method] = experiments.hidden_features(problem, params)
                self.bar.update()
        return out, problem.live_draw_fraction

    def head_swap(self, student: dict, teacher: dict, target: str, beta: float) -> dict:
        """Exp. 2's diagnostic: are the two classification heads (fc8) what differs?

        Returns the cosine between the student's and the teacher's fc8 kernels
        and Exp. 2's warm-start residual with the teacher's own fc8 swapped into
        the student's classification module (everything below fc8 stays the
        student's). A residual that falls from near 1 to near 0 with the swap
        says the lower task layers are related and only the heads are not.
        """
        c = self.config
        a, b = (np.ravel(np.asarray(p["classification_module"]["fc8"]["kernel"]))
                for p in (student, teacher))
        swapped = {**student, "classification_module": {
            **student["classification_module"],
            "fc8": teacher["classification_module"]["fc8"]}}
        self.bar.set_postfix_str(f"exp2 head swap {target}")
        *_, residual = self.problem("exp2", "classification", c.adapters.exp2, "exp2", target,
                                    swapped, teacher, beta)  # Exp. 2's draws
        return {"fc8_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                "residual_with_own_head": residual}


def _problem_key(config, experiment: str, target: str):
    return jax.random.fold_in(jax.random.key(config.seed), _stable_hash(f"{experiment}/{target}"))


def _fig5_count(config) -> int:
    positive = [n for n in config.sample_counts if n > 0]
    return 20 if 20 in positive else (positive[0] if positive else 0)


def _num_runs(config) -> int:
    counts = list(config.sample_counts)
    labelled = [n for n in counts if n > 0]
    cls, seg = len(experiments.CLASSIFICATION_METHODS), len(experiments.SEGMENTATION_METHODS)
    per_cls = (0 in counts) + cls * len(labelled)
    per_seg = (0 in counts) + seg * len(labelled)
    per_cls_transfer = cls * len(labelled)
    total = 0
    if "exp1" in config.experiments:
        total += 2 * len(config.categories) * per_cls
    targets = len(config.target_categories)
    if "exp2" in config.experiments:
        total += targets * per_cls_transfer
    if "exp3" in config.experiments:
        total += targets * per_seg
    if "table4" in config.experiments:
        total += targets * (per_cls_transfer + seg * len(_table4_seg_counts(config)))
    return total


def _table4_seg_counts(config) -> list[int]:
    """The paper's Table 4 segmentation uses 10 and 20 samples."""
    chosen = [n for n in config.sample_counts if n in (10, 20)]
    return chosen or [n for n in config.sample_counts if n > 0][:2]


def _with_avg(per_category: dict) -> dict:
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


def run(config, workdir: Path, progress: bool = True) -> dict:
    """Everything; returns the ``results.json`` dict."""
    validate_config(config)
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    benchmark = benchmarks.make_benchmark(config)
    zoo = TeacherZoo(config, workdir, benchmark, progress)
    needed = list(dict.fromkeys([*config.categories, config.generic_category,
                                 *config.target_categories]))
    generic_needed = "table4" in config.experiments
    stage = tqdm(total=1 + len(needed) + generic_needed * len(config.target_categories),
                 desc="teachers", disable=not progress, dynamic_ncols=True)
    if config.pretrain.num_steps:
        zoo.backbone()
    stage.update()
    params = {}
    for category in needed:
        stage.set_postfix_str(category)
        params[category] = zoo.category(category)
        stage.update()
    generic = {}
    if generic_needed:
        for category in config.target_categories:
            stage.set_postfix_str(f"generic without {category}")
            generic[category] = zoo.leave_one_out(category)
            stage.update()
    stage.close()

    results: dict = {"teachers": {c: zoo.metrics[c] for c in needed},
                     **({"backbone": zoo.metrics["backbone"]} if "backbone" in zoo.metrics
                        else {}),
                     "generic_modules": {c: zoo.metrics[f"generic_without_{c}"]
                                         for c in generic},
                     "config": config.to_dict()}
    live: dict = {}
    bar = tqdm(total=_num_runs(config), desc="transplants", disable=not progress,
               dynamic_ncols=True)
    runner = Runner(config, zoo, bar)
    counts = [int(n) for n in config.sample_counts]
    labelled = [n for n in counts if n > 0]
    generic_cat = config.generic_category

    if "exp1" in config.experiments:
        results["exp1"] = {}
        for name, spec in (("1conv", config.adapters.exp1_1conv),
                           ("3conv", config.adapters.exp1_3conv)):
            cells = {}
            for category in config.categories:
                t = params[category]
                cells[category], live[f"exp1_{name}/{category}"] = runner.run(
                    f"exp1_{name}", "classification", spec, "exp1", category, t, t, 1.0, counts,
                    f"exp1_{name}")
            results["exp1"][name] = _with_avg(cells)

    betas: dict = {}

    def transfer(experiment, task, spec, protocol, student_of, source_categories_of, counts_):
        cells = {}
        for category in config.target_categories:
            student = student_of(category)
            beta = betas[experiment, category] = runner._beta(
                student["category_module"], source_categories_of(category),
                params[category]["category_module"], category)
            cells[category], live[f"{experiment}/{category}"] = runner.run(
                experiment, task, spec, protocol, category, student, params[category], beta,
                counts_, experiment)
        return _with_avg(cells)

    if "exp2" in config.experiments:
        results["exp2"] = transfer("exp2", "classification", config.adapters.exp2, "exp2",
                                   lambda c: params[generic_cat], lambda c: [generic_cat],
                                   labelled)
        swaps = {c: runner.head_swap(params[generic_cat], params[c], c, betas["exp2", c])
                 for c in config.target_categories}
        results["exp2_head_swap"] = {
            **swaps, "avg": {k: float(np.mean([v[k] for v in swaps.values()]))
                             for k in ("fc8_cosine", "residual_with_own_head")}}
    if "exp3" in config.experiments:
        results["exp3"] = transfer("exp3", "segmentation", config.adapters.exp3, "exp3",
                                   lambda c: params[generic_cat], lambda c: [generic_cat], counts)
    if "table4" in config.experiments:
        results["table4"] = {
            "classification": transfer(
                "table4_classification", "classification", config.adapters.exp2, "exp2",
                lambda c: generic[c], benchmark.leave_one_out_categories, labelled),
            "segmentation": transfer(
                "table4_segmentation", "segmentation", config.adapters.exp3, "exp3",
                lambda c: generic[c], benchmark.leave_one_out_categories,
                _table4_seg_counts(config)),
        }
    bar.close()
    results["live_draw_fraction"] = live
    results["warm_start_residual"] = {
        e: {**r, "avg": float(np.mean(list(r.values())))} for e, r in runner.residual.items()}
    results["train_fit"] = {e: _with_avg(cells) for e, cells in runner.train_fit.items()}
    results["runtime_s"] = time.perf_counter() - start

    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "results.md").write_text(report.results_markdown(results))
    curves = {"teachers": zoo.curves, "transplants": runner.curves}
    (workdir / "learning_curves.json").write_text(json.dumps(curves))
    report.plot_learning_curves(curves, workdir / "learning_curves.png")
    if len(runner.fig5) == 2:
        report.plot_fig5(runner.fig5, workdir / "fig5_pca.png",
                         title=f"Exp. 1, 3-conv adapter, {config.categories[0]}, "
                               f"{_fig5_count(config)} samples")
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    workdir = Path(_WORKDIR.value)
    results = run(_CONFIG.value, workdir, progress=True)
    print(report.summary(results))
    print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.json, "
          f"results.md, fig5_pca.png, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
