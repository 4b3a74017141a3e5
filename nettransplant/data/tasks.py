"""Task views of a split: binary classification, single-category segmentation, few-shot sets.

Paper protocol: binary classification "category vs random images" (positives:
the category's images; negatives: as many random images of other categories,
so every set is balanced) and single-category segmentation (images of the
category, its mask). Few-shot training subsets hold exactly N labelled images,
balanced where binary, nested (the 10 are inside the 20, …) and seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nettransplant.data.animal_mnist import CATEGORIES
from nettransplant.data.silhouettes import ImageSet

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SAMPLE_COUNTS = (0, 10, 20, 50, 100)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(…, 3)`` → float32 ``(x / 255 − mean) / std`` (torchvision's VGG input)."""
    return ((np.asarray(images, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(
        np.float32)


def category_ids(names: Sequence[str]) -> np.ndarray:
    """Indices of category names; a clear error for an unknown one."""
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the dataset has {list(CATEGORIES)}")
    return np.array([CATEGORIES.index(n) for n in names], np.int64)


def binary_classification(split: ImageSet, positives: Sequence[str], *,
                          negatives: Sequence[str] | None = None, seed: int = 0) -> ImageSet:
    """"Any of ``positives`` (label 1) vs random images of ``negatives`` (label 0)".

    ``negatives`` defaults to every other category. The negatives are a seeded
    random sample of the same size as the positives (balanced); rows are ordered
    positives first, then negatives, each in a seeded random order.
    """
    pos_ids = category_ids(positives)
    neg_names = negatives if negatives is not None else [
        c for c in CATEGORIES if c not in positives]
    neg_ids = category_ids(neg_names)
    if set(pos_ids) & set(neg_ids):
        raise ValueError(f"categories {sorted(set(positives) & set(neg_names))} are both "
                         "positive and negative")
    rng = np.random.default_rng(seed)
    pos_rows = rng.permutation(np.flatnonzero(np.isin(split.categories, pos_ids)))
    neg_pool = np.flatnonzero(np.isin(split.categories, neg_ids))
    if len(neg_pool) < len(pos_rows):
        raise ValueError(f"only {len(neg_pool)} negative images for {len(pos_rows)} positives")
    neg_rows = rng.choice(neg_pool, size=len(pos_rows), replace=False)
    view = split.take(np.concatenate([pos_rows, neg_rows]))
    labels = np.concatenate([np.ones(len(pos_rows)), np.zeros(len(neg_rows))]).astype(np.int64)
    return ImageSet(view.images, labels, view.masks, view.categories, view.index)


def segmentation(split: ImageSet, categories: Sequence[str], *, seed: int = 0) -> ImageSet:
    """Images of ``categories`` with their object masks (labels = the masks' category)."""
    rows = np.flatnonzero(np.isin(split.categories, category_ids(categories)))
    return split.take(np.random.default_rng(seed).permutation(rows))


def few_shot(view: ImageSet, num_samples: int, *, seed: int = 0,
             balanced: bool = True) -> ImageSet:
    """Exactly ``num_samples`` images of ``view``, nested across sizes for one seed.

    Balanced (binary views): half positives, half negatives (one more positive
    for odd sizes), each taken from a fixed seeded order, so a smaller subset is
    the prefix of a larger one.
    """
    if num_samples < 0 or num_samples > len(view):
        raise ValueError(f"num_samples must be in [0, {len(view)}], got {num_samples}")
    rng = np.random.default_rng(seed)
    if not balanced:
        return view.take(rng.permutation(len(view))[:num_samples])
    pos = rng.permutation(np.flatnonzero(view.labels == 1))
    neg = rng.permutation(np.flatnonzero(view.labels == 0))
    n_pos = (num_samples + 1) // 2
    n_neg = num_samples - n_pos
    if n_pos > len(pos) or n_neg > len(neg):
        raise ValueError(f"{num_samples} balanced samples need {n_pos} positives and {n_neg} "
                         f"negatives; the view has {len(pos)} and {len(neg)}")
    return view.take(np.concatenate([pos[:n_pos], neg[:n_neg]]))


def unlabelled_images(split: ImageSet, categories: Sequence[str], num_images: int, *,
                      seed: int = 0) -> np.ndarray:
    """``num_images`` images of ``categories`` (no labels), e.g. to estimate β."""
    rows = np.flatnonzero(np.isin(split.categories, category_ids(categories)))
    if num_images > len(rows):
        raise ValueError(f"asked for {num_images} images of {list(categories)}, have {len(rows)}")
    return split.images[np.random.default_rng(seed).choice(rows, num_images, replace=False)]
