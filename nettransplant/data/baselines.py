"""Pixel-accuracy baselines that show how much of segmentation a trivial rule gets.

* Majority: every pixel background.
* Global threshold: one intensity feature (luminance or one RGB channel), one
  threshold t in 0..255 and one polarity ("object is above t" or "at or
  below t") for the whole dataset. The rule is chosen on the train split and
  scored on test; the best rule on test itself is an upper bound.

Both are computed from per-feature histograms accumulated in chunks, so they
run in seconds and bounded memory at any image size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
FEATURES = ("luminance", "R", "G", "B")
IGNORE = 255  # mask value excluded from every accuracy


def intensity_features(images: np.ndarray) -> np.ndarray:
    """Per-pixel intensities ``(len(FEATURES), N, H, W)`` uint8 from ``(N, H, W, 3)`` uint8."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    luminance = np.clip(np.round(images.astype(np.float32) @ LUMINANCE_WEIGHTS), 0, 255)
    return np.stack([luminance.astype(np.uint8), *np.moveaxis(images, -1, 0)])


def feature_histograms(images: np.ndarray, masks: np.ndarray, *, chunk: int = 256,
                       progress: Iterable | None = None) -> np.ndarray:
    """Counts ``(len(FEATURES), 2, 256)``: pixels of background (0) / object (1) per value.

    Args:
      images: ``(N, H, W, 3)`` uint8.
      masks: ``(N, H, W)`` uint8 in {0, 1} (``IGNORE`` pixels are skipped).
      chunk: images per step.
      progress: optional wrapper for the chunk loop (e.g. ``tqdm``).
    """
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks {masks.shape} do not match images {images.shape[:3]}")
    counts = np.zeros((len(FEATURES), 2, 256), np.int64)
    starts = range(0, len(images), chunk)
    for start in (progress(starts) if progress else starts):
        m = masks[start: start + chunk]
        valid = m != IGNORE
        label = m[valid].astype(np.int64)
        for f, values in enumerate(intensity_features(images[start: start + chunk])):
            counts[f] += np.bincount(label * 256 + values[valid], minlength=512).reshape(2, 256)
    return counts


def threshold_accuracies(counts: np.ndarray) -> np.ndarray:
    """Accuracy of every rule from ``(2, 256)`` counts: ``(2, 256)``.

    Row 0: object iff value > t; row 1: object iff value <= t; column t.
    """
    bg, fg = counts[0].astype(np.float64), counts[1].astype(np.float64)
    total = bg.sum() + fg.sum()
    if total == 0:
        raise ValueError("no labelled pixels")
    fg_le, bg_le = np.cumsum(fg), np.cumsum(bg)  # pixels with value <= t
    above_is_object = (fg.sum() - fg_le + bg_le) / total
    at_or_below_is_object = (fg_le + bg.sum() - bg_le) / total
    return np.stack([above_is_object, at_or_below_is_object])


def threshold_baseline(train_images: np.ndarray, train_masks: np.ndarray,
                       test_images: np.ndarray, test_masks: np.ndarray, *,
                       progress: Iterable | None = None) -> dict:
    """The best global threshold rule, chosen on train and scored on test.

    Args:
      train_images, test_images: ``(N, H, W, 3)`` uint8.
      train_masks, test_masks: ``(N, H, W)`` uint8 in {0, 1}.
      progress: optional wrapper for the chunk loops (e.g. ``tqdm``).

    Returns:
      ``{"rule": {"feature", "threshold", "object", "train_acc", "test_acc"},
      "test_acc": float, "upper_bound": float}``, accuracies as fractions;
      ``upper_bound`` is the best rule's accuracy when chosen on test.
    """
    train = feature_histograms(train_images, train_masks, progress=progress)
    test = feature_histograms(test_images, test_masks, progress=progress)
    acc_train = np.stack([threshold_accuracies(c) for c in train])  # (F, 2, 256)
    acc_test = np.stack([threshold_accuracies(c) for c in test])
    f, polarity, t = np.unravel_index(np.argmax(acc_train), acc_train.shape)
    rule = {"feature": FEATURES[f], "threshold": int(t),
            "object": "above" if polarity == 0 else "at or below",
            "train_acc": float(acc_train[f, polarity, t]),
            "test_acc": float(acc_test[f, polarity, t])}
    return {"rule": rule, "test_acc": rule["test_acc"], "upper_bound": float(acc_test.max())}


def majority_baseline(masks: np.ndarray) -> float:
    """Pixel accuracy of "everything is background" (fraction), ``IGNORE`` pixels skipped."""
    valid = masks != IGNORE
    if not valid.any():
        raise ValueError("no labelled pixels")
    return float((masks[valid] == 0).mean())


def coarse_mask_oracle(masks: np.ndarray, stride: int) -> float:
    """Pixel accuracy (fraction) of the true masks seen at ``1/stride`` resolution.

    Each mask is averaged over ``stride × stride`` blocks, bilinearly up-sampled
    back and thresholded at 1/2: what a segmentation whose scores live on a grid
    ``stride`` times coarser than the image gets from perfect block averages and
    plain bilinear up-sampling. FCN-8s's finest scores (pool3) are on such a
    grid with stride 8; its learnt up-sampling and skip fusion can do somewhat
    better, so this is a reference for how much the resolution costs at a given
    image size, not a bound.
    """
    import jax
    n, h, w = masks.shape
    if h % stride or w % stride:
        raise ValueError(f"masks of {h}×{w} do not divide by stride {stride}")
    truth = masks.astype(np.float32)
    low = truth.reshape(n, h // stride, stride, w // stride, stride).mean((2, 4))
    up = np.asarray(jax.image.resize(low, (n, h, w), "bilinear"))
    return float(((up > 0.5) == (truth > 0.5)).mean())
