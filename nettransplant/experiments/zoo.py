"""The teacher zoo: trains, checkpoints, reuses and resumes every teacher of the main job.

A :class:`TeacherZoo` owns ``W/teachers/``: the shared backbone (the stand-in
for ImageNet pre-training), one teacher per category (category module +
classification + segmentation task modules, :func:`nettransplant.training.teachers.train_teacher`)
and Table 4's leave-one-out generic modules. Each is a checkpoint
``W/teachers/<name>`` with metadata (kind, categories, module specs, metrics,
loss curve, the configuration's fingerprint) and is handed out as
:class:`~nettransplant.net.graph.TeacherParts`.

Nothing already trained is ever deleted:

* a checkpoint whose fingerprint matches the configuration is reused (its
  content hash is checked on load);
* one trained with another configuration is moved aside to
  ``W/teachers/<name>@<its fingerprint>`` and, should that configuration come
  back, moved into place again instead of being retrained;
* a damaged checkpoint (unreadable, content hash mismatch, missing
  ``checkpoint.json``) is moved aside to ``<name>.damaged-<time>`` and
  retrained, with a one-line notice;
* an interrupted teacher resumes from ``W/teachers/<name>.partial`` (orbax's
  checkpoint manager; a damaged one is moved aside and training restarts) and
  ends with exactly the parameters of an uninterrupted run;
* staging folders left by a killed save are cleaned when the zoo opens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant import data
from nettransplant.core import evaluation, modules
from nettransplant.data import benchmarks
from nettransplant.experiments import pretrain
from nettransplant.interop import vgg16
from nettransplant.net import io as net_io
from nettransplant.net.graph import TeacherParts
from nettransplant.runtime import metric_writers, parallel
from nettransplant.runtime.progress import message
from nettransplant.training import checkpoint, resumable
from nettransplant.training import teachers as teacher_lib
from nettransplant.training.loop import TrainState


def stable_hash(name: str) -> int:
    """A small integer from a name, the same in every process and run."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


def _training_sets(cls: data.ImageSet, seg: data.ImageSet, labels: str = "labels") -> dict:
    """``train_teacher``'s arrays from a classification and a segmentation set."""
    if cls is seg:  # one normalisation for a set serving both tasks (the backbone's)
        images = seg_images = data.normalize_images(cls.images)
    else:
        images, seg_images = (data.normalize_images(v.images) for v in (cls, seg))
    return {"cls_images": images, "cls_labels": getattr(cls, labels).astype(np.int32),
            "seg_images": seg_images, "seg_masks": seg.masks.astype(np.int32)}


_classification_scores = jax.jit(teacher_lib.classification_scores, static_argnums=0)
_segmentation_scores = jax.jit(teacher_lib.segmentation_scores, static_argnums=0)


def classification_error(net: modules.Teacher, params, view: data.ImageSet) -> float:
    """A teacher's test error (%) on a classification view."""
    scores = evaluation.batched_apply(lambda im: _classification_scores(net, params, im),
                                      data.normalize_images(view.images))
    return evaluation.classification_error(evaluation.predict_classes(scores), view.labels)


def pixel_accuracy(net: modules.Teacher, params, view: data.ImageSet) -> float:
    """A teacher's pixel accuracy (%) on a segmentation view."""
    predicted = evaluation.batched_apply(
        lambda im: jnp.argmax(_segmentation_scores(net, params, im), -1),
        data.normalize_images(view.images))
    return evaluation.pixel_accuracy(predicted, view.masks)


class TeacherZoo:
    """Trains, checkpoints and reuses the backbone, category teachers and generic modules.

    Args:
      config: the main job's config (``model``, ``pretrain``, ``teacher``, ``seed``, ``data``).
      workdir: the run's folder; teachers live in ``workdir/teachers``.
      benchmark: where the training and test sets come from.
      progress: show progress bars.
      log_metrics: also write training metrics to ``workdir/logs`` (plain log and
        TensorBoard when ``tensorboardX`` is installed).
    """

    def __init__(self, config, workdir: Path, benchmark: benchmarks.Benchmark, progress: bool,
                 *, log_metrics: bool = True):
        self.config, self.benchmark, self.progress = config, benchmark, progress
        self.workdir = Path(workdir)
        self.root = self.workdir / "teachers"
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint.clean_stale_folder(self.root):
            message(f"removed {stale.name}: the staging folder of an interrupted save")
        self.log_metrics = log_metrics
        m = config.model
        self.teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                            dropout_rate=m.dropout_rate,
                                            num_classes=m.num_classes)
        self.metrics: dict[str, dict] = {}
        self.curves: dict[str, list] = {}
        self.trained: list[str] = []  # names trained (not reused) by this zoo
        self._params: dict[str, Any] = {}
        self._steps: dict = {}
        self.mesh = parallel.mesh_from_config(config.get("mesh"))  # teachers train data parallel

    # ------------------------------------------------------------------ bookkeeping

    def _fingerprint(self, name: str, extra: dict) -> str:
        c = self.config
        pretrain = c.pretrain.to_dict()
        if not pretrain.get("weights"):  # teachers fingerprinted before the field existed
            pretrain.pop("weights", None)
        pretrain.pop("shipped", None)  # where the backbone comes from, not what it is
        if pretrain.get("renderings", 1) == 1:  # the default before the field existed
            pretrain.pop("renderings", None)
        spec = {"name": name, "seed": c.seed, "data": c.data,
                "data_version": self.benchmark.version, "model": c.model.to_dict(),
                "pretrain": pretrain, **extra}
        if name != "backbone":  # the backbone does not depend on how teachers are trained
            spec["teacher"] = c.teacher.to_dict()
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _reusable(self, final: Path, fingerprint: str, init_params) -> Any | None:
        """The parameters at ``final`` if they were trained with this configuration.

        Moves a checkpoint of another configuration to ``<name>@<fingerprint>``
        and a damaged one to ``<name>.damaged-<time>``; brings back a checkpoint
        of this configuration moved aside earlier.
        """
        name = final.name
        if final.exists():
            try:
                meta = checkpoint.load_metadata(final)
            except checkpoint.CheckpointError as e:
                aside = checkpoint.move_aside(final, "damaged")
                message(f"teacher {name}: {e}; moved to {aside.name}, training again")
                meta = None
            if meta is not None:
                stored = meta.get("fingerprint")
                if stored == fingerprint:
                    try:
                        params, meta = checkpoint.load_checkpoint(final, target=init_params)
                    except checkpoint.CheckpointError as e:
                        aside = checkpoint.move_aside(final, "damaged")
                        message(f"teacher {name}: {e}; moved to {aside.name}, training again")
                    else:
                        self.metrics[name], self.curves[name] = meta["metrics"], meta["history"]
                        return params
                else:
                    superseded = final.with_name(f"{name}@{stored}")
                    if superseded.exists():
                        checkpoint.move_aside(superseded, "old")
                    os.rename(final, superseded)
                    message(f"teacher {name}: trained with another configuration; kept as "
                            f"{superseded.name}, training for this one")
        earlier = final.with_name(f"{name}@{fingerprint}")
        if checkpoint.is_checkpoint(earlier):
            os.rename(earlier, final)
            message(f"teacher {name}: reusing {earlier.name}, trained with this configuration")
            return self._reusable(final, fingerprint, init_params)
        return None

    def _train(self, name: str, teacher: modules.Teacher, init_params, *,
               training_sets: Callable[[], dict], num_steps: int, learning_rate: float,
               seed: int, metrics_fn, extra: dict,
               batch_sizes: tuple[int, int] | None = None):
        """Train (or reuse, or resume) one teacher; returns its parameters.

        ``training_sets``: returns ``train_teacher``'s image and label arrays; called
        only when the teacher is trained (a reused checkpoint needs no data).
        ``batch_sizes``: (classification, segmentation) images per step; default
        the teachers' (``config.teacher``).
        """
        cls_batch, seg_batch = batch_sizes or (self.config.teacher.batch_size,
                                               self.config.teacher.seg_batch_size)
        final = self.root / name
        fingerprint = self._fingerprint(name, extra)
        if (teacher, learning_rate) not in self._steps:  # one compilation per shape
            optimizer = optax.adam(learning_rate)
            self._steps[teacher, learning_rate] = (
                optimizer, teacher_lib.make_teacher_step(teacher, optimizer, mesh=self.mesh))
        optimizer, step_fn = self._steps[teacher, learning_rate]
        params = self._reusable(final, fingerprint, init_params)
        partial_dir = self.root / f"{name}.partial"
        if params is not None:
            partial = resumable.TrainingCheckpoints(partial_dir, fingerprint)
            # A kill between the final save and the clean-up leaves this teacher's
            # resumable state behind; one of another configuration is left alone.
            if partial.stored_fingerprint() == fingerprint:
                partial.delete()
                message(f"teacher {name}: removed {partial_dir.name}, the resumable state of "
                        "a teacher that had finished")
            partial.close()
            return params
        state = TrainState(jnp.zeros((), jnp.int32), init_params, optimizer.init(init_params))
        history: list = []
        partial = resumable.TrainingCheckpoints(partial_dir, fingerprint)
        try:
            resumed = partial.restore(state.as_tree())
        except checkpoint.CheckpointError as e:
            partial.close()
            aside = checkpoint.move_aside(partial.directory, "damaged")
            message(f"teacher {name}: {e}; moved to {aside.name}, starting again")
            resumed = None
        if resumed is not None:
            state, history = TrainState.from_tree(resumed[0]), resumed[1]
            message(f"teacher {name}: resuming at step {int(state.step)} of {num_steps}")

        writer = (metric_writers.open_writer(self.workdir / "logs", f"teacher_{name}")
                  if self.log_metrics else None)
        try:
            state, history = teacher_lib.train_teacher(
                teacher, state, **training_sets(), optimizer=optimizer,
                num_steps=num_steps, batch_size=cls_batch, seg_batch_size=seg_batch,
                seed=seed, progress=f"teacher {name}" if self.progress else False,
                history=history, checkpoint_every=self.config.teacher.checkpoint_every,
                on_checkpoint=lambda s, h: partial.save(int(s.step), s.as_tree(), h),
                step_fn=step_fn, writer=writer, what=f"teacher {name}", mesh=self.mesh)
        finally:
            if writer is not None:
                writer.close()
        metrics = metrics_fn(teacher, state.params)
        checkpoint.save_checkpoint(final, state.params, {
            "fingerprint": fingerprint, "name": name, **extra, "metrics": metrics,
            "history": history, "input_size": self.config.model.image_size,
            "modules": {role: net_io.module_spec(getattr(teacher, role))
                        for role in ("category_module", "classification_module",
                                     "segmentation_module")},
            "config": self.config.to_dict()}, overwrite=True)
        partial.delete()
        self.metrics[name], self.curves[name] = metrics, history
        self.trained.append(name)
        return state.params

    # ------------------------------------------------------------------ teachers

    def _backbone_extra(self) -> dict:
        return {"categories": list(self.benchmark.categories), "kind": "backbone",
                "num_outputs": len(data.CATEGORIES)}

    def backbone_fingerprint(self) -> str:
        """What the backbone of this configuration is trained from (seed, data, model,
        ``config.pretrain``): a shipped backbone is used only when it matches."""
        return self._fingerprint("backbone", self._backbone_extra())

    def _shipped_backbone(self, template) -> Any | None:
        """The shipped backbone (:mod:`~nettransplant.experiments.pretrain`) if
        ``config.pretrain.shipped`` is on and it was trained with this configuration."""
        if not self.config.pretrain.get("shipped", False):
            return None
        try:
            record = pretrain.read_record()
            if record is None:
                message("backbone: no shipped backbone in the package; training it")
                return None
            if record["fingerprint"] != self.backbone_fingerprint():
                message("backbone: the shipped one was trained with another configuration "
                        "(seed, data, model or config.pretrain differ); training it")
                return None
            params, record = pretrain.load_backbone(template)
        except pretrain.ShippedBackboneError as e:
            message(f"backbone: {e}; training it")
            return None
        message(f"backbone: the shipped one ({record['pretrain']['num_steps']} steps, "
                f"{pretrain.COMMAND} rebuilds it)")
        self.metrics["backbone"], self.curves["backbone"] = record["metrics"], record["history"]
        return params

    def backbone(self):
        """The shared 10-way backbone (the stand-in for ImageNet pre-training): the shipped
        one when it matches the configuration, else trained (and checkpointed)."""
        if "backbone" not in self._params:
            c, m = self.config, self.config.model
            net = modules.make_teacher(width=m.width, input_size=m.image_size,
                                       num_outputs=len(data.CATEGORIES),
                                       dropout_rate=m.dropout_rate, num_classes=m.num_classes)
            init = net.init({"params": jax.random.key(c.seed)},
                            jnp.zeros((1, m.image_size, m.image_size, 3)))["params"]
            shipped = self._shipped_backbone(init)
            if shipped is not None:
                self._params["backbone"] = shipped
                return shipped
            train = self.benchmark.pretraining_set("train")
            renderings = c.pretrain.get("renderings", 1)
            if renderings > 1:  # fresh scenes of the same silhouettes (augmentation)
                train = self.benchmark.rendered(train, renderings)

            def metrics(net, params):
                test = self.benchmark.pretraining_set("test")
                scores = evaluation.batched_apply(
                    lambda im: _classification_scores(net, params, im),
                    data.normalize_images(test.images))
                predicted = np.asarray(scores).reshape(len(test), -1).argmax(-1)
                return {"accuracy_10way": float(100 * np.mean(predicted == test.categories)),
                        "seg_pixel_acc": pixel_accuracy(net, params, test)}

            self._params["backbone"] = self._train(
                "backbone", net, init,
                training_sets=lambda: _training_sets(train, train, "categories"),
                num_steps=c.pretrain.num_steps, learning_rate=c.pretrain.learning_rate,
                seed=c.seed, metrics_fn=metrics, extra=self._backbone_extra(),
                batch_sizes=(c.pretrain.batch_size, c.pretrain.batch_size))
        return self._params["backbone"]

    def torchvision_backbone(self):
        """torchvision's VGG-16 (``config.pretrain.weights``) as teacher parameters, FCN-8s
        segmentation module initialised from it (the paper's ImageNet initialisation)."""
        if "torchvision" not in self._params:
            _, self._params["torchvision"] = vgg16.load_torchvision_teacher(
                self.config.pretrain.weights, num_classes=self.config.model.num_classes)
        return self._params["torchvision"]

    def _init(self, name: str):
        """A teacher's initialisation: torchvision's VGG-16 or the backbone's layers, if
        there is one, else random (fc8 is always fresh: its outputs differ)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), stable_hash(name))
        size = self.config.model.image_size
        if self.config.pretrain.get("weights", ""):
            return teacher_lib.transfer_backbone(self.teacher, self.torchvision_backbone(), key,
                                                 size)
        if self.config.pretrain.num_steps == 0:
            return self.teacher.init({"params": key}, jnp.zeros((1, size, size, 3)))["params"]
        return teacher_lib.transfer_backbone(self.teacher, self.backbone(), key, size)

    def category(self, category: str):
        """The teacher of one category: "category vs random images" + its segmentation."""
        if category not in self._params:
            c, bench = self.config, self.benchmark

            def metrics(net, params):
                return {"cls_error": classification_error(
                            net, params, bench.classification(category, "test")),
                        "seg_pixel_acc": pixel_accuracy(
                            net, params, bench.segmentation(category, "test"))}

            self._params[category] = self._train(
                category, self.teacher, self._init(category),
                training_sets=lambda: _training_sets(*bench.teacher_sets(category)),
                num_steps=c.teacher.num_steps, learning_rate=c.teacher.learning_rate,
                seed=c.seed + stable_hash(category) % 1000, metrics_fn=metrics,
                extra={"category": category, "kind": "category"})
        return self._params[category]

    def leave_one_out(self, held_out: str):
        """Table 4's generic module: every other mammal + the dissimilar categories
        (classification "any of them vs random images", segmentation of them all;
        :meth:`Benchmark.generic_sets`)."""
        name = generic_name(held_out)
        if name not in self._params:
            c, bench = self.config, self.benchmark
            categories = bench.leave_one_out_categories(held_out)

            def metrics(net, params):
                cls_test, seg_test = bench.generic_sets(held_out, "test")
                return {"cls_error": classification_error(net, params, cls_test),
                        "seg_pixel_acc": pixel_accuracy(net, params, seg_test)}

            self._params[name] = self._train(
                name, self.teacher, self._init(name),
                training_sets=lambda: _training_sets(*bench.generic_sets(held_out, "train")),
                num_steps=c.teacher.num_steps,
                learning_rate=c.teacher.learning_rate, seed=c.seed + stable_hash(name) % 1000,
                metrics_fn=metrics,
                extra={"categories": list(categories), "held_out": held_out, "kind": "generic"})
        return self._params[name]

    def parts(self, name: str) -> TeacherParts:
        """A trained teacher (category or generic) as :class:`TeacherParts` for a net."""
        if name not in self._params:
            raise KeyError(f"teacher {name!r} has not been trained or loaded by this zoo")
        final = self.root / name
        provenance: Mapping[str, Any] = {
            "checkpoint": str(final), "params_sha256": checkpoint.stored_digest(final),
            "metrics": self.metrics.get(name, {})}
        meta = checkpoint.load_metadata(final)
        provenance = {**provenance, **{k: meta[k] for k in ("kind", "category", "categories",
                                                            "held_out", "fingerprint")
                                       if k in meta}}
        return TeacherParts.from_teacher(name, self.teacher, self._params[name],
                                         input_size=self.config.model.image_size,
                                         provenance=provenance)


def generic_name(held_out: str) -> str:
    """The name of Table 4's leave-one-out generic module that holds out ``held_out``."""
    return f"generic_without_{held_out}"
