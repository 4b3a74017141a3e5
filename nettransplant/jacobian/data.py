"""The raw silhouette classification task: animal-mnist images as small grayscale inputs.

Images are the 28×28 animal-mnist silhouettes, average-pooled to ``image_size``
(a divisor of 28) and scaled to ``[0, 1]``: float32 ``(N, s, s, 1)``. The split is
the embedded benchmark's fixed one (per class 800 train / 200 test,
:func:`nettransplant.data.silhouettes.split_indices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nettransplant.data.animal_mnist import CATEGORIES, load_animal_mnist
from nettransplant.data.silhouettes import split_indices

SOURCE_SIZE = 28


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """``images (N, s, s, 1)`` float32 in [0, 1]; ``labels (N,)`` int32 in ``0..K-1``."""

    images: np.ndarray
    labels: np.ndarray
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[rows], self.labels[rows], self.categories)


def downsample(images: np.ndarray, image_size: int) -> np.ndarray:
    """``(N, 28, 28)`` uint8 → ``(N, s, s, 1)`` float32 in [0, 1] by ``28/s`` × ``28/s`` means."""
    if image_size < 1 or SOURCE_SIZE % image_size:
        raise ValueError(f"image_size must divide {SOURCE_SIZE}, got {image_size}")
    f = SOURCE_SIZE // image_size
    x = images.astype(np.float32).reshape(len(images), image_size, f, image_size, f)
    return (x.mean(axis=(2, 4)) / 255.0)[..., None]


def silhouette_splits(image_size: int, categories: Sequence[str] = CATEGORIES
                      ) -> dict[str, LabelledImages]:
    """``{"train", "test"}`` of the classification of ``categories`` (labels re-indexed 0..K-1)."""
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {CATEGORIES}")
    images, labels = load_animal_mnist()
    ids = [CATEGORIES.index(c) for c in categories]
    remap = np.full(len(CATEGORIES), -1, np.int32)
    remap[ids] = np.arange(len(ids), dtype=np.int32)
    splits = {}
    for name, rows in split_indices(labels).items():
        rows = rows[np.isin(labels[rows], ids)]
        splits[name] = LabelledImages(downsample(images[rows], image_size),
                                      remap[labels[rows]], tuple(categories))
    return splits


def per_class_subset(data: LabelledImages, samples_per_class: int | None, seed: int
                     ) -> LabelledImages:
    """The first ``samples_per_class`` of each class in a seeded order (None: all rows).

    Subsets are nested: for one seed the 5-sample set contains the 1-sample set.
    """
    if samples_per_class is None:
        return data
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(data.categories)):
        members = np.flatnonzero(data.labels == c)
        if samples_per_class > len(members):
            raise ValueError(f"{samples_per_class} samples per class requested, class "
                             f"{data.categories[c]!r} has {len(members)}")
        rows.append(rng.permutation(members)[:samples_per_class])
    return data.take(np.sort(np.concatenate(rows)))
