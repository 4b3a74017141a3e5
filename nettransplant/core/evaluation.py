"""Paper metrics: classification test error (%) and segmentation pixel accuracy (%)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def class_scores(y: Array) -> Array:
    """``(B, S, S, K)`` score maps → ``(B, K)`` (mean over the map; S = 1 at training size)."""
    return jnp.mean(y, axis=(1, 2)) if y.ndim == 4 else y


def predict_classes(y: Array) -> Array:
    """Class ids from scores: ``logit > 0`` for one output, arg-max otherwise."""
    scores = class_scores(y)
    if scores.shape[-1] == 1:
        return (scores[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1)


def batched_apply(fn: Callable[[Array], Array], inputs: np.ndarray | Array,
                  batch_size: int = 256, *, one_shape: bool = False) -> np.ndarray:
    """``fn`` over ``inputs`` in batches of ``batch_size``, as numpy.

    The last batch is padded to ``batch_size`` when there are several, so ``fn``
    sees one shape; with ``one_shape`` also a single batch is, so inputs of every
    size share one compiled ``fn`` (at most ``batch_size - 1`` padding rows).
    """
    n = inputs.shape[0]
    outputs = []
    for start in range(0, n, batch_size):
        part = jnp.asarray(inputs[start: start + batch_size])
        pad = batch_size - part.shape[0]
        if pad and (n > batch_size or one_shape):
            part = jnp.concatenate([part, jnp.zeros((pad, *part.shape[1:]), part.dtype)])
            out = np.asarray(fn(part))
            outputs.append(out[: out.shape[0] - pad])
        else:
            outputs.append(np.asarray(fn(part)))
    return np.concatenate(outputs)


def classification_error(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Test error in percent."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} differ")
    return float(100.0 * np.mean(predicted != labels))


def pixel_accuracy(predicted: np.ndarray, masks: np.ndarray) -> float:
    """Pixel accuracy in percent over all pixels of all images."""
    predicted, masks = np.asarray(predicted), np.asarray(masks)
    if predicted.shape != masks.shape:
        raise ValueError(f"predicted masks {predicted.shape} and masks {masks.shape} differ")
    return float(100.0 * np.mean(predicted == masks))
