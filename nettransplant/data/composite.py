"""Compositing silhouettes into images whose segmentation needs shape, not intensity.

Every region of an image — the background, each clutter ellipse and the
object — is filled with a texture drawn from one family (a flat colour; stripes
of random period and orientation; a two-colour blotch pattern), with colours
drawn uniformly from RGB. Object and background therefore share their
intensity, colour and texture statistics: no global threshold and no "is this
pixel textured" rule finds the object; what sets it apart is its shape.

The object is the silhouette's support (pixels above :data:`SUPPORT_THRESHOLD`,
closed and hole-filled, so a zebra's dark stripes and an elephant's eye belong
to the animal) cropped to its bounding box, rescaled so that its longer side is
:data:`SCALE_RANGE` of the image side, and placed at a random position. Its
edge is anti-aliased; the mask is where its alpha exceeds 1/2. Every region's
contour is drawn dark (:data:`OUTLINE_WIDTH` pixels at 32²), as a cartoon
draws it: the clutter ellipses' visible edges and the mask's inner border.
Contours carry the shapes, which random colours and textures otherwise leave
for a network to find in a few thousand examples; since the clutter has them
too, a dark pixel says "an edge", not "the animal". Gaussian noise
goes on top, one value per pixel at 32² (at larger sizes each noise value covers
a block, like every other feature of the scene, which also keeps the dataset
compressible).

Every category wears its own *coat*, as animals do: a texture kind with a
fixed period and orientation (:data:`COATS`), in random colours. One clutter
ellipse, the *decoy*, wears the animal's coat in the animal's colours, so a
coat says which category an image shows but not where the animal is: the
decoy looks exactly like it, and only the shape tells them apart. Scenes
without an animal (:func:`background_scenes`) have no coat and no decoy.

Generation is split in two so that thousands of images take about a second:
:func:`sample_scene` draws one example's randomness from its own generator (so
an example is a pure function of its silhouette, size and seed, whatever it is
batched with), and :func:`render_scenes` paints a batch with array operations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

SCALE_RANGE = (0.85, 1.0)  # longer side of the object / image side
SUPPORT_THRESHOLD = 40  # silhouette intensity (0..255) above which a pixel is the animal
NUM_BLOBS = (3, 7)  # clutter ellipses per image, [low, high)
BLOB_RADIUS = (0.08, 0.35)  # ellipse semi-axes / image side
STRIPE_PERIOD = (2.5, 6.0)  # pixels at 32², scaled with the image side
STRIPE_AMPLITUDE = (40.0, 80.0)  # 0..255 units
BLOTCH_PERIOD = (8.0, 16.0)  # pixels at 32², scaled with the image side
NOISE_STD = 12.0  # Gaussian noise, 0..255 units
NOISE_GRID = 32  # noise is drawn on a 32×32 grid and scaled up with the image
OUTLINE_WIDTH = 1  # pixels at 32² (scaled with the image side) of the object's dark contour
OUTLINE_LEVEL = 0.0  # 0..255, every channel, before noise

FLAT, STRIPES, BLOTCHES = 0, 1, 2  # texture kinds
# Coats: category → (texture kind, period in pixels at 32², orientation in degrees).
# The five mammals differ in orientation (and the cow in kind); the other five
# repeat the stripe orientations at a longer period, the bear is flat.
COATS = {
    "cat": (STRIPES, 3.5, 0.0), "dog": (STRIPES, 3.5, 90.0),
    "horse": (STRIPES, 3.5, 45.0), "sheep": (STRIPES, 3.5, 135.0),
    "cow": (BLOTCHES, 9.0, 30.0), "bear": (FLAT, 4.0, 0.0),
    "bird": (STRIPES, 5.5, 0.0), "elephant": (STRIPES, 5.5, 90.0),
    "giraffe": (STRIPES, 5.5, 45.0), "zebra": (STRIPES, 5.5, 135.0),
}
# The decoy is the top clutter ellipse (the last drawn): it wears the animal's coat.

Seed = int | Sequence[int] | np.random.Generator  # what np.random.default_rng accepts
_MAX_BLOBS = NUM_BLOBS[1] - 1
# Regions: 0 the background base, 1.._MAX_BLOBS the ellipses (later ones on
# top), then the object.
_NUM_REGIONS = _MAX_BLOBS + 2
_OBJECT = _NUM_REGIONS - 1
# Uniforms per region: kind, 2 colours, stripe amplitude, 2 wave angles, 2 wave
# phases, 2 blotch periods, a stripe period; then the ellipse count and 4 per
# ellipse (centre y, x, radius y, x).
_PER_REGION = 15
NUM_UNIFORMS = _NUM_REGIONS * _PER_REGION + 1 + 4 * _MAX_BLOBS
# Planes of the per-region texture table (see _texture_table).
_KIND, _AMPLITUDE, _KY0, _KX0, _PHASE0, _KY1, _KX1, _PHASE1 = range(8)
_COLOUR0, _COLOUR1 = slice(8, 11), slice(11, 14)
_NUM_PLANES = 14


@dataclasses.dataclass(frozen=True)
class SceneDraws:
    """Everything random about a batch of N examples of side S.

    Attributes:
      uniforms: ``(N, NUM_UNIFORMS)`` float64 in [0, 1) — textures and clutter.
      alpha: ``(N, S, S)`` float32 — the placed object's coverage in [0, 1].
      noise: ``(N, NOISE_GRID, NOISE_GRID, 3)`` float32 — standard normal.
    """

    uniforms: np.ndarray
    alpha: np.ndarray
    noise: np.ndarray

    @staticmethod
    def stack(draws: list[SceneDraws]) -> SceneDraws:
        """Concatenates along the example axis."""
        return SceneDraws(*(np.concatenate([getattr(d, f.name) for d in draws])
                            for f in dataclasses.fields(SceneDraws)))


def _between(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Maps uniforms in [0, 1) to [low, high)."""
    return bounds[0] + (bounds[1] - bounds[0]) * u


def silhouette_supports(silhouettes: np.ndarray) -> np.ndarray:
    """The animal's region in each silhouette: thresholded, closed, hole-filled.

    Args:
      silhouettes: ``(N, H, W)`` or ``(H, W)`` uint8, white animal on black.

    Returns:
      bool array of the same shape. Closing joins a zebra's stripes; filling
      adds enclosed holes (an elephant's eye) to the animal.
    """
    single = silhouettes.ndim == 2
    stack = silhouettes[None] if single else silhouettes
    if stack.ndim != 3:
        raise ValueError(f"silhouettes must be (H, W) or (N, H, W), got {silhouettes.shape}")
    # Pad every image by one empty pixel (so the border does not erode the
    # closing) and the stack by an empty image at each end, and connect pixels
    # only within an image, so one call treats every image on its own.
    support = np.pad(stack > SUPPORT_THRESHOLD, 1)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    support = ndimage.binary_closing(support, structure=in_plane)
    support = ndimage.binary_fill_holes(support, structure=in_plane)[1:-1, 1:-1, 1:-1]
    return support[0] if single else support


def _object_alpha(support: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    if rows.size == 0:
        raise ValueError("silhouette has no pixel above the support threshold")
    crop = support[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1].astype(np.uint8) * 255
    longer = max(crop.shape)
    target = rng.uniform(*SCALE_RANGE) * size
    h = min(size, max(2, int(round(crop.shape[0] * target / longer))))
    w = min(size, max(2, int(round(crop.shape[1] * target / longer))))
    resized = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR),
                         np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)
    y0 = rng.integers(0, size - h + 1)
    x0 = rng.integers(0, size - w + 1)
    alpha[y0: y0 + h, x0: x0 + w] = resized
    return alpha


def _dress(uniforms: np.ndarray, coat: str) -> None:
    """Writes ``coat`` (a :data:`COATS` key) into one scene's uniforms, in place.

    The object's region gets the coat's kind, period and orientation (its
    colours, amplitude and phases stay random); the top clutter ellipse, the
    decoy, gets the object's whole texture but its own phases.
    """
    if coat not in COATS:
        raise ValueError(f"unknown coat {coat!r}; coats are {sorted(COATS)}")
    kind, period, degrees = COATS[coat]
    obj = uniforms[_OBJECT * _PER_REGION: (_OBJECT + 1) * _PER_REGION]
    obj[0] = (kind + 0.5) / 3
    obj[8] = degrees / 180
    obj[9] = ((degrees + 60) % 180) / 180  # the blotches' second wave
    obj[12:14] = (np.clip(period, *BLOTCH_PERIOD) - BLOTCH_PERIOD[0]) / np.subtract(
        *BLOTCH_PERIOD[::-1])
    obj[14] = (np.clip(period, *STRIPE_PERIOD) - STRIPE_PERIOD[0]) / np.subtract(
        *STRIPE_PERIOD[::-1])
    spread = NUM_BLOBS[1] - NUM_BLOBS[0]
    decoy = NUM_BLOBS[0] + min(int(spread * uniforms[_NUM_REGIONS * _PER_REGION]), spread - 1)
    region = uniforms[decoy * _PER_REGION: (decoy + 1) * _PER_REGION]
    phases = region[10:12].copy()
    region[:] = obj
    region[10:12] = phases


def sample_scene(support: np.ndarray | None, size: int, rng: np.random.Generator,
                 coat: str | None = None) -> SceneDraws:
    """Draws one example's randomness (a batch of one).

    Args:
      support: ``(H, W)`` bool region of the animal (:func:`silhouette_supports`),
        or None for a background-only scene.
      size: output side S (>= 16).
      rng: the only source of randomness.
      coat: the animal's category (a :data:`COATS` key): its coat, worn by the
        animal and the decoy; None leaves every texture random.
    """
    if size < 16:
        raise ValueError(f"image size must be >= 16, got {size}")
    alpha = (np.zeros((size, size), np.float32) if support is None
             else _object_alpha(support, size, rng))
    uniforms = rng.random(NUM_UNIFORMS)
    if coat is not None:
        _dress(uniforms, coat)
    noise = rng.standard_normal((NOISE_GRID, NOISE_GRID, 3), dtype=np.float32)
    return SceneDraws(uniforms[None], alpha[None], noise[None])


def _texture_table(uniforms: np.ndarray, size: int) -> np.ndarray:
    """Per-region texture parameters, ``(_NUM_PLANES, N, R)`` float32.

    Planes: kind (FLAT/STRIPES/BLOTCHES), stripe amplitude, two plane waves
    ``(k_y, k_x, phase)`` (the texture samples ``sin(k_y y + k_x x + phase)``),
    the region's colour and its second (blotch) colour, RGB in 0..255.
    """
    n = uniforms.shape[0]
    r = uniforms[:, : _NUM_REGIONS * _PER_REGION].reshape(n, _NUM_REGIONS, _PER_REGION)
    kind = np.minimum(np.floor(3 * r[..., 0]), 2)
    scale = size / 32
    angle = np.pi * r[..., 8:10]
    phase = 2 * np.pi * r[..., 10:12]
    period = _between(r[..., 12:14], BLOTCH_PERIOD) * scale
    period[..., 0] = np.where(kind == STRIPES, _between(r[..., 14], STRIPE_PERIOD) * scale,
                              period[..., 0])
    k = 2 * np.pi / period
    table = np.empty((_NUM_PLANES, n, _NUM_REGIONS), np.float32)
    table[_KIND] = kind
    table[_AMPLITUDE] = _between(r[..., 7], STRIPE_AMPLITUDE)
    for j, (ky, kx, ph) in enumerate([(_KY0, _KX0, _PHASE0), (_KY1, _KX1, _PHASE1)]):
        table[ky] = k[..., j] * np.sin(angle[..., j])
        table[kx] = k[..., j] * np.cos(angle[..., j])
        table[ph] = phase[..., j]
    table[_COLOUR0] = np.moveaxis(255 * r[..., 1:4], -1, 0)
    table[_COLOUR1] = np.moveaxis(255 * r[..., 4:7], -1, 0)
    return table


def _ellipses(uniforms: np.ndarray, size: int) -> np.ndarray:
    """Clutter ellipses ``(4, N, E)``: centre y, x and radius y, x in pixels."""
    b = uniforms[:, _NUM_REGIONS * _PER_REGION:]
    spread = NUM_BLOBS[1] - NUM_BLOBS[0]
    count = NUM_BLOBS[0] + np.minimum(np.floor(spread * b[:, 0]), spread - 1)
    e = np.moveaxis(b[:, 1:].reshape(-1, _MAX_BLOBS, 4), -1, 0).astype(np.float32)
    centre = size * e[:2]
    centre[:, np.arange(_MAX_BLOBS)[None] >= count[:, None]] = -1e6  # unused: covers nothing
    return np.concatenate([centre, _between(e[2:], BLOB_RADIUS) * size])


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _paint(p: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> list[np.ndarray]:
    """Texture values at pixels ``(yy, xx)``: three channel planes.

    ``p`` is ``(_NUM_PLANES, …)``: each pixel's region parameters, with ``…``
    broadcastable against the pixel grid.
    """
    w0 = np.sin(p[_KY0] * yy + p[_KX0] * xx + p[_PHASE0])
    w1 = np.sin(p[_KY1] * yy + p[_KX1] * xx + p[_PHASE1])
    second = (p[_KIND] == BLOTCHES) & (w0 + w1 <= 0)
    stripe = np.where(p[_KIND] == STRIPES, p[_AMPLITUDE], np.float32(0)) * w0
    c0, c1 = p[_COLOUR0], p[_COLOUR1]
    return [np.where(second, c1[c], c0[c]) + stripe for c in range(3)]


def render_scenes(draws: SceneDraws) -> tuple[np.ndarray, np.ndarray]:
    """Paints a batch: ``(images (N, S, S, 3) uint8, masks (N, S, S) uint8 in {0, 1})``."""
    n, size = draws.alpha.shape[:2]
    yy, xx = _grid(size)
    table = _texture_table(draws.uniforms, size)
    cy, cx, ry, rx = (a[:, :, None, None] for a in _ellipses(draws.uniforms, size))
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1  # (N, E, S, S)
    # Each background pixel shows the last ellipse covering it, else the base.
    order = np.arange(1, _MAX_BLOBS + 1, dtype=np.int64)[None, :, None, None]
    region = (inside * order).max(axis=1)
    flat_region = (np.arange(n)[:, None, None] * _NUM_REGIONS + region).ravel()
    per_pixel = table.reshape(_NUM_PLANES, -1)[:, flat_region].reshape(
        _NUM_PLANES, n, size, size)
    background = _paint(per_pixel, yy, xx)
    foreground = _paint(table[:, :, _OBJECT, None, None], yy, xx)
    alpha = draws.alpha
    cells = np.arange(size) * NOISE_GRID // size  # noise cell of each pixel row / column
    noise = draws.noise[:, cells[:, None], cells[None, :]]
    channels = [bg + alpha * (fg - bg) + NOISE_STD * noise[..., c]
                for c, (bg, fg) in enumerate(zip(background, foreground, strict=True))]
    image = np.stack(channels, axis=-1)
    masks = alpha > 0.5
    width = max(1, round(OUTLINE_WIDTH * size / 32))
    outline = _inner_border(masks, width) | (_region_edges(region, width) & ~masks)
    image[outline] = OUTLINE_LEVEL + NOISE_STD * noise[outline]
    images = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return images, masks.astype(np.uint8)


def _region_edges(region: np.ndarray, width: int) -> np.ndarray:
    """Pixels of an ``(N, S, S)`` region map within ``width`` of a pixel of another region.

    A pixel is marked where the region below or to the right (up to ``width``
    pixels away) differs, so an edge is ``width`` pixels wide.
    """
    edges = np.zeros(region.shape, bool)
    for d in range(1, width + 1):
        edges[:, :-d] |= region[:, :-d] != region[:, d:]
        edges[:, :, :-d] |= region[:, :, :-d] != region[:, :, d:]
    return edges


def _inner_border(masks: np.ndarray, width: int) -> np.ndarray:
    """Pixels of each ``(N, S, S)`` mask within ``width`` (4-connected steps) of its outside."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    # Outside the image counts as outside the object: pad with background.
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    eroded = ndimage.binary_erosion(padded, structure=in_plane, iterations=width)
    return masks & ~eroded[:, 1:-1, 1:-1]


def composite_batch(supports: np.ndarray, size: int, seeds: Sequence[Seed],
                    coats: Sequence[str | None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``i`` drawn from ``np.random.default_rng(seeds[i])``.

    Args:
      supports: ``(N, H, W)`` bool (:func:`silhouette_supports`).
      size: output side S.
      seeds: N seeds (anything ``np.random.default_rng`` accepts).
      coats: N categories whose coats the animals wear (:data:`COATS`), or None:
        random textures.

    Returns:
      ``(images (N, S, S, 3) uint8, masks (N, S, S) uint8 in {0, 1})``; row i
      does not depend on the other rows.
    """
    if len(supports) != len(seeds):
        raise ValueError(f"{len(supports)} supports but {len(seeds)} seeds")
    if len(seeds) == 0:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8)
    coats = [None] * len(seeds) if coats is None else list(coats)
    if len(coats) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(coats)} coats")
    draws = [sample_scene(s, size, np.random.default_rng(seed), coat)
             for s, seed, coat in zip(supports, seeds, coats, strict=True)]
    return render_scenes(SceneDraws.stack(draws))


def composite(silhouette: np.ndarray, size: int, seed: Seed, coat: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """One example from a 28×28 uint8 silhouette (white animal on black).

    Args:
      silhouette: ``(H, W)`` uint8.
      size: output side S.
      seed: anything ``np.random.default_rng`` accepts.
      coat: the category whose coat the animal wears, or None (random texture).

    Returns:
      ``(image (S, S, 3) uint8 RGB, mask (S, S) uint8 in {0, 1})``.
    """
    if silhouette.ndim != 2:
        raise ValueError(f"silhouette must be 2-D (H, W), got shape {silhouette.shape}")
    images, masks = composite_batch(silhouette_supports(silhouette)[None], size, [seed],
                                    [coat])
    return images[0], masks[0]


def background_scenes(num_images: int, size: int, seed: int) -> np.ndarray:
    """Cluttered scenes with no animal: "random images" for when every category is positive.

    Args:
      num_images: N.
      size: side S.
      seed: scene i is drawn from ``np.random.default_rng([seed, i, 1])``, a
        stream no dataset example uses.

    Returns:
      ``(N, S, S, 3)`` uint8, with the same background statistics as the dataset.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if num_images == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    draws = [sample_scene(None, size, np.random.default_rng([seed, i, 1]))
              for i in range(num_images)]
    return render_scenes(SceneDraws.stack(draws))[0]
