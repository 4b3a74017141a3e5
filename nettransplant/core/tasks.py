"""What a task module is for: its outputs, loss, predictions and metric, in one interface.

A task module (:mod:`nettransplant.core.modules`) exposes its :class:`Task` as
``module.task``; everything that depends on the task — the task loss of
teachers and adapters, distillation, predictions, the paper's metric, which
targets a data view provides — asks that object instead of testing the
module's type:

* :data:`CLASSIFICATION` — score maps ``(B, S, S, K)`` (``S = 1`` at the
  training size; larger inputs give a map whose mean is the image's score);
  sigmoid cross-entropy for one output, softmax otherwise; predictions are
  class ids ``(B,)``; the metric is the test error in percent (lower is better).
* :data:`SEGMENTATION` — per-pixel scores ``(B, H, W, C)``; per-pixel softmax
  cross-entropy; predictions are masks ``(B, H, W)``; the metric is pixel
  accuracy in percent (higher is better).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.core import evaluation

Array = jax.Array


def masked_mean(values: Array, weights: Array) -> Array:
    """``Σ w·v / max(Σ w, 1)``: a mean over the rows with weight (padding has weight 0)."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _per_image(per_item: Array) -> Array:
    return per_item.reshape(per_item.shape[0], -1).mean(axis=1)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's outputs, loss, predictions and metric (see the module docstring).

    Attributes:
      name: ``"classification"`` or ``"segmentation"``.
      metric_name: what :meth:`metric` returns.
      higher_is_better: the metric's direction.
      target_field: the :class:`~nettransplant.data.ImageSet` field holding the
        targets (``"labels"`` or ``"masks"``).
    """

    name: str
    metric_name: str
    higher_is_better: bool
    target_field: str

    def logits(self, y: Array) -> Array:
        """The scores the loss and the predictions read."""
        raise NotImplementedError

    def loss(self, y: Array, labels: Array, weights: Array) -> Array:
        """Cross-entropy with the labels: sigmoid for one output, softmax otherwise; per
        pixel for segmentation. ``weights`` ``(B,)`` mask padding and unlabelled images."""
        logits = self.logits(y)
        if logits.shape[-1] == 1:
            per_item = optax.sigmoid_binary_cross_entropy(logits[..., 0],
                                                          labels.astype(jnp.float32))
        else:
            per_item = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return masked_mean(_per_image(per_item), weights)

    def distill_loss(self, y_student: Array, y_teacher: Array, weights: Array) -> Array:
        """``CrossEntropy(y_S, y_T)``: the student fits the teacher's output distribution."""
        s, t = self.logits(y_student), self.logits(y_teacher)
        if s.shape[-1] == 1:
            per_item = optax.sigmoid_binary_cross_entropy(s[..., 0], jax.nn.sigmoid(t[..., 0]))
        else:
            per_item = optax.softmax_cross_entropy(s, jax.nn.softmax(t))
        return masked_mean(_per_image(per_item), weights)

    def predict(self, y: Array) -> Array:
        """Labels from outputs: class ids ``(B,)`` or masks ``(B, H, W)``."""
        raise NotImplementedError

    def metric(self, predicted: Any, targets: Any) -> float:
        """The paper's metric of predictions against targets, in percent."""
        raise NotImplementedError

    def targets(self, view: Any) -> np.ndarray:
        """The targets of a data view (its labels or its masks)."""
        value = getattr(view, self.target_field)
        if value is None:
            raise ValueError(f"the view has no {self.target_field} for {self.name}")
        return np.asarray(value)


class _Classification(Task):
    def logits(self, y: Array) -> Array:
        # Score maps (B, S, S, K): the score of an image is the mean over the map.
        return evaluation.class_scores(y)

    def predict(self, y: Array) -> Array:
        return evaluation.predict_classes(y)

    def metric(self, predicted: Any, targets: Any) -> float:
        return evaluation.classification_error(predicted, targets)


class _Segmentation(Task):
    def logits(self, y: Array) -> Array:
        return y

    def predict(self, y: Array) -> Array:
        return jnp.argmax(y, axis=-1)

    def metric(self, predicted: Any, targets: Any) -> float:
        return evaluation.pixel_accuracy(predicted, targets)


CLASSIFICATION = _Classification("classification", "classification error %", False, "labels")
SEGMENTATION = _Segmentation("segmentation", "pixel accuracy %", True, "masks")
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, SEGMENTATION)}


def get(name: str) -> Task:
    """The task called ``name``; a clear error for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
    return TASKS[name]
