"""Compositing silhouettes into images whose segmentation needs shape, not intensity.

Foreground and background colours are drawn from the same distribution, so no
global intensity threshold separates them; the object is the silhouette-shaped
region filled with a striped texture, placed at a random scale and position on
a cluttered background of flat blobs, stripes and noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SCALE_RANGE = (0.85, 1.0)  # longer side of the object / image side


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """A sinusoidal stripe pattern in [-1, 1] with random orientation, period and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(2.5, 6.0) * size / 32
    phase = rng.uniform(0, 2 * np.pi)
    return np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + phase)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    image = np.broadcast_to(_colour(rng), (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.integers(3, 7)):  # flat ellipses of random colours
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.08, 0.35, 2) * size
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = _colour(rng)
    if rng.random() < 0.5:  # striped patches, so texture alone is not the object
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        patch = _stripes(rng, size)[y0: y0 + h, x0: x0 + w, None]
        image[y0: y0 + h, x0: x0 + w] += 60 * patch
    return image


def silhouette_alpha(silhouette: np.ndarray, size: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """Crop to the silhouette, rescale it randomly and place it: an ``(S, S)`` alpha in [0, 1]."""
    mask = silhouette > 127
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return np.zeros((size, size), np.float32)
    crop = silhouette[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    longer = max(crop.shape)
    target = rng.uniform(*SCALE_RANGE) * size
    h = max(2, int(round(crop.shape[0] * target / longer)))
    w = max(2, int(round(crop.shape[1] * target / longer)))
    resized = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR),
                         np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)
    y0 = rng.integers(0, size - h + 1)
    x0 = rng.integers(0, size - w + 1)
    alpha[y0: y0 + h, x0: x0 + w] = resized
    return alpha


def composite(silhouette: np.ndarray, size: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """One example: ``(image (S, S, 3) uint8, mask (S, S) uint8 in {0, 1})``."""
    alpha = silhouette_alpha(silhouette, size, rng)
    foreground = _colour(rng) + 70 * _stripes(rng, size)[..., None]
    background = _background(rng, size)
    image = alpha[..., None] * foreground + (1 - alpha[..., None]) * background
    image += rng.normal(0, 12, image.shape)
    return (np.clip(np.round(image), 0, 255).astype(np.uint8),
            (alpha > 0.5).astype(np.uint8))
