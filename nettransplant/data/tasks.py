"""Task views of a split: binary classification, single-category segmentation, few-shot sets.

Paper protocol: binary classification "category vs random images" (positives:
the category's images; negatives: as many random images of other categories,
so every set is balanced) and single-category segmentation (images of the
category, its mask). Few-shot training subsets hold exactly N labelled images,
balanced where binary, nested (the 10 are inside the 20, …) and seeded; take
them from ``train`` and evaluate on ``test``, which share no image.

A "generic" task module trained on several categories (the leave-one-out
experiments: every mammal but one plus the dissimilar categories) is an
"object vs random images" classifier on the union of those categories:
:func:`positive_set` gives that union, :func:`leave_one_out_categories` the
category list, and :func:`nettransplant.data.composite.background_scenes`
object-free "random images" when no category is left to draw negatives from.

Every view is an :class:`ImageSet` of uint8 images; :func:`normalize_images`
turns them into the network input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nettransplant.data.animal_mnist import CATEGORIES, DISSIMILAR, MAMMALS
from nettransplant.data.silhouettes import ImageSet

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SAMPLE_COUNTS = (0, 10, 20, 50, 100)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(…, 3)`` → float32 ``(x / 255 − mean) / std`` (torchvision's VGG input).

    ``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224, 0.225)`` (ImageNet,
    on [0, 1] RGB); the shape is unchanged.
    """
    if np.shape(images)[-1:] != (3,):
        raise ValueError(f"images must end in 3 RGB channels, got shape {np.shape(images)}")
    return ((np.asarray(images, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(
        np.float32)


def _as_names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def category_ids(names: str | Sequence[str]) -> np.ndarray:
    """Indices in :data:`CATEGORIES` of one name or a list of names; a clear error for an
    unknown one."""
    names = _as_names(names)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the dataset has {list(CATEGORIES)}")
    return np.array([CATEGORIES.index(n) for n in names], np.int64)


def binary_classification(split: ImageSet, positives: str | Sequence[str], *,
                          negatives: Sequence[str] | None = None, seed: int = 0) -> ImageSet:
    """"Any of ``positives`` (label 1) vs random images of ``negatives`` (label 0)".

    The paper's protocol with one positive category: the category vs random
    images of the others. ``negatives`` defaults to every other category. The
    negatives are a seeded random sample as large as the positives (balanced);
    rows are positives first, then negatives, each in a seeded random order.

    Args:
      split: e.g. ``load_silhouettes()["test"]``.
      positives: category name(s).
      negatives: category names to draw negatives from.
      seed: chooses the negatives and the order.

    Returns:
      ``ImageSet`` of 2P rows: ``images (2P, H, W, 3)`` uint8, ``labels (2P,)``
      int64 in {0, 1}, the split's masks, categories and indices of those rows.
    """
    positives = _as_names(positives)
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


def segmentation(split: ImageSet, categories: str | Sequence[str], *, seed: int = 0
                 ) -> ImageSet:
    """Single-category segmentation: the images of ``categories`` with their object masks.

    Returns:
      ``ImageSet`` in a seeded order: ``images (N, H, W, 3)`` uint8, ``masks
      (N, H, W)`` uint8 in {0, 1} (1 = the animal), ``labels`` all 1 (every
      image holds the object), ``categories`` the object's category.
    """
    rows = np.random.default_rng(seed).permutation(
        np.flatnonzero(np.isin(split.categories, category_ids(categories))))
    view = split.take(rows)
    return ImageSet(view.images, np.ones(len(rows), np.int64), view.masks, view.categories,
                    view.index)


def few_shot(view: ImageSet, num_samples: int, *, seed: int = 0,
             balanced: bool | None = None) -> ImageSet:
    """Exactly ``num_samples`` images of ``view``, nested across sizes for one seed.

    Args:
      view: a task view; take it from ``train`` so the subset is disjoint from
        anything built on ``test``.
      num_samples: N (0 gives an empty set with the right shapes).
      seed: the subset's seed; for one seed the N-subset is a prefix of every
        larger one (the 10 are inside the 20, ...).
      balanced: half positives, half negatives (one more positive for odd N),
        each drawn in a fixed seeded order. Default: balanced exactly when
        ``view.labels`` holds both 0 and 1 and nothing else (a binary view).

    Returns:
      ``ImageSet`` of N rows.
    """
    return view.take(few_shot_indices(view, num_samples, seed=seed, balanced=balanced))


def few_shot_indices(view: ImageSet, num_samples: int, *, seed: int = 0,
                     balanced: bool | None = None) -> np.ndarray:
    """The rows of ``view`` that :func:`few_shot` takes, in its order."""
    if not 0 <= num_samples <= len(view):
        raise ValueError(f"num_samples must be in [0, {len(view)}], got {num_samples}")
    if balanced is None:
        balanced = set(np.unique(view.labels).tolist()) == {0, 1}
    rng = np.random.default_rng(seed)
    if not balanced:
        return rng.permutation(len(view))[:num_samples]
    pos = rng.permutation(np.flatnonzero(view.labels == 1))
    neg = rng.permutation(np.flatnonzero(view.labels == 0))
    n_pos = (num_samples + 1) // 2
    n_neg = num_samples - n_pos
    if n_pos > len(pos) or n_neg > len(neg):
        raise ValueError(f"{num_samples} balanced samples need {n_pos} positives and {n_neg} "
                         f"negatives; the view has {len(pos)} and {len(neg)}")
    return np.concatenate([pos[:n_pos], neg[:n_neg]])


VALIDATION_IMAGES = 400  # the most images a validation set holds


def validation_set(view: ImageSet, num_held: int, *, seed: int = 0,
                   num_images: int = VALIDATION_IMAGES, balanced: bool | None = None
                   ) -> ImageSet:
    """A validation split carved from a training ``view``: up to ``num_images`` of its
    rows that no :func:`few_shot` set of up to ``num_held`` samples under ``seed``
    contains (those sets are nested, so the largest decides), in a seeded order.

    Protocol choices are made on it; the test split is never looked at for them.
    """
    held = few_shot_indices(view, num_held, seed=seed, balanced=balanced)
    rest = np.setdiff1d(np.arange(len(view)), held)
    return view.take(np.random.default_rng([seed, 1]).permutation(rest)[:num_images])


def positive_set(split: ImageSet, categories: str | Sequence[str], *, num_images: int | None = None,
                 seed: int = 0) -> ImageSet:
    """The images of any of ``categories`` as positives (label 1), in a seeded order.

    The positive side of a generic "object vs random images" task module
    trained on several categories; ``num_images`` takes a nested prefix.

    Returns:
      ``ImageSet`` with ``labels`` all 1 and ``categories`` each image's category.
    """
    rows = np.random.default_rng(seed).permutation(
        np.flatnonzero(np.isin(split.categories, category_ids(categories))))
    if num_images is not None:
        if not 0 <= num_images <= len(rows):
            raise ValueError(f"num_images must be in [0, {len(rows)}] for {_as_names(categories)}, "
                             f"got {num_images}")
        rows = rows[:num_images]
    view = split.take(rows)
    return ImageSet(view.images, np.ones(len(rows), np.int64), view.masks, view.categories,
                    view.index)


def leave_one_out_categories(held_out: str) -> tuple[str, ...]:
    """The paper's generic training categories: every mammal but ``held_out``, then the
    dissimilar categories (:data:`DISSIMILAR`)."""
    if held_out not in MAMMALS:
        raise ValueError(f"held_out must be one of the mammals {list(MAMMALS)}, got {held_out!r}")
    return tuple(c for c in MAMMALS if c != held_out) + DISSIMILAR


def unlabelled_images(split: ImageSet, categories: str | Sequence[str], num_images: int, *,
                      seed: int = 0) -> np.ndarray:
    """``num_images`` images of ``categories`` (no labels), e.g. to estimate β.

    Returns:
      ``(num_images, H, W, 3)`` uint8; for one seed, smaller sets are prefixes
      of larger ones.
    """
    rows = np.flatnonzero(np.isin(split.categories, category_ids(categories)))
    if not 0 <= num_images <= len(rows):
        raise ValueError(f"asked for {num_images} images of {_as_names(categories)}, "
                         f"have {len(rows)}")
    return split.images[np.random.default_rng(seed).permutation(rows)[:num_images]]
