"""``animal_silhouettes``: the embedded benchmark as a TFDS dataset that builds offline.

Each example is an RGB image (``image_size`` configurable: 32 by default, 64
and 224 predefined, any size >= 16 on request), the class label (one of
:data:`CATEGORIES`), a binary segmentation mask and the index of the source
silhouette (see :mod:`nettransplant.data.composite` for how images are made).
The split is fixed: per class, a seeded permutation puts 800 images in
``train`` and 200 in ``test`` (split seed 0, whatever the compositing seed).

Built in ``array_record`` format with raw (zlib) tensors, so neither building
nor reading needs TensorFlow; the build is offline and cached under
``data_dir`` (default ``$NETTRANSPLANT_DATA_DIR`` or ``~/tensorflow_datasets``)
in ``animal_silhouettes/<size>px_seed<seed>/<version>``. Examples are
bit-identical for a seed (given the numpy version and CPU family).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nettransplant.data.animal_mnist import CATEGORIES, load_animal_mnist
from nettransplant.data.composite import composite_batch, silhouette_supports

TRAIN_PER_CLASS = 800
SPLIT_SEED = 0
DATA_DIR_ENV = "NETTRANSPLANT_DATA_DIR"


def default_data_dir() -> Path:
    """``$NETTRANSPLANT_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return Path(os.environ.get(DATA_DIR_ENV, Path.home() / "tensorflow_datasets"))


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed train/test split: per class, 800 / 200 by a seeded permutation."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(len(CATEGORIES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        train.append(members[:TRAIN_PER_CLASS])
        test.append(members[TRAIN_PER_CLASS:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


class AnimalSilhouettesConfig(tfds.core.BuilderConfig):
    """Image size and compositing seed of the embedded benchmark."""

    def __init__(self, *, image_size: int = 32, seed: int = 0):
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        super().__init__(name=f"{image_size}px_seed{seed}",
                         description=f"{image_size}×{image_size} composites, seed {seed}")
        self.image_size = image_size
        self.seed = seed


class AnimalSilhouettes(tfds.core.GeneratorBasedBuilder):
    """Composited animal-mnist silhouettes for classification and segmentation."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Striped objects on flat-blob clutter.",
        "2.0.0": "One texture family for object and clutter; hole-filled animal masks.",
        "3.0.0": "A dark contour on the animal's inner border.",
    }
    BUILDER_CONFIGS = [AnimalSilhouettesConfig(image_size=s, seed=0) for s in (32, 64, 224)]

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # written and read without TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=zlib),
                "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=zlib),
                "label": tfds.features.ClassLabel(names=list(CATEGORIES)),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            # Written in generation order (sorted by source index), which skips
            # the shuffling pass; readers shuffle with their own seed.
            disable_shuffling=True,
            homepage="https://pypi.org/project/animal-mnist/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        images, labels = load_animal_mnist()
        supports = silhouette_supports(images)
        return {name: self._generate_examples(supports, labels, idx)
                for name, idx in split_indices(labels).items()}

    def _generate_examples(self, supports, labels, indices):
        cfg = self.builder_config
        # Example i is drawn from its own generator, seeded (seed, i); batches
        # of about a million pixels are rendered at once.
        chunk = max(1, 2**20 // cfg.image_size**2)
        for start in range(0, len(indices), chunk):
            rows = [int(i) for i in indices[start: start + chunk]]
            images, masks = composite_batch(supports[rows], cfg.image_size,
                                            [[cfg.seed, i] for i in rows])
            for i, image, mask in zip(rows, images, masks, strict=True):
                yield i, {"image": image, "mask": mask, "label": int(labels[i]), "index": i}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Arrays of one split or view (leading axis N).

    Attributes:
      images: ``(N, H, W, 3)`` uint8 RGB (:func:`~nettransplant.data.normalize_images`
        makes the network input).
      labels: ``(N,)`` int64 — the category index in a split; the task label
        in a view (1 / 0 in classification views, 1 in segmentation views).
      masks: ``(N, H, W)`` uint8, 1 object / 0 background (255 = ignore where a
        paper-scale loader keeps void pixels); None for classification-only data.
      categories: ``(N,)`` int64 category index of each image's object (-1 for
        the negatives of a VOC classification view).
      index: ``(N,)`` int64 id of the source example (the silhouette's index in
        animal-mnist, or the row of a TFDS split); disjoint between splits.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    categories: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, rows: np.ndarray) -> ImageSet:
        """The rows ``rows`` (an index array or boolean mask) of every field."""
        return ImageSet(*(None if a is None else a[rows]
                          for a in (getattr(self, f.name) for f in dataclasses.fields(self))))


def build_silhouettes(image_size: int = 32, seed: int = 0,
                      data_dir: str | Path | None = None) -> AnimalSilhouettes:
    """Builds the embedded dataset (once, offline) and returns its TFDS builder.

    Args:
      image_size: side of the square images (>= 16).
      seed: compositing seed (>= 0).
      data_dir: TFDS data dir; default :func:`default_data_dir`.

    Returns:
      The prepared builder; ``builder.as_data_source()`` gives TF-free
      random access to ``{"train", "test"}``.
    """
    config = AnimalSilhouettesConfig(image_size=image_size, seed=seed)
    if config.name in AnimalSilhouettes.builder_configs:  # TFDS wants listed configs by name
        config = config.name
    builder = AnimalSilhouettes(config=config, data_dir=str(data_dir or default_data_dir()))
    builder.download_and_prepare()
    return builder


def _read_split(source) -> ImageSet:
    examples = source.__getitems__(list(range(len(source))))
    index = np.array([int(e["index"]) for e in examples], np.int64)
    order = np.argsort(index, kind="stable")
    labels = np.array([int(examples[i]["label"]) for i in order], np.int64)
    split = ImageSet(
        images=np.stack([examples[i]["image"] for i in order]),
        labels=labels,
        masks=np.stack([examples[i]["mask"] for i in order]),
        categories=labels.copy(),
        index=index[order])
    for field in dataclasses.fields(split):
        getattr(split, field.name).flags.writeable = False  # shared by every caller
    return split


@functools.lru_cache(maxsize=4)
def _load_splits(image_size: int, seed: int, data_dir: str | None) -> tuple[tuple[str, ImageSet],
                                                                           ...]:
    builder = build_silhouettes(image_size, seed, data_dir)
    return tuple((name, _read_split(source))
                 for name, source in sorted(builder.as_data_source().items()))


def load_silhouettes(image_size: int = 32, seed: int = 0,
                     data_dir: str | Path | None = None) -> dict[str, ImageSet]:
    """The embedded dataset's splits, built on first use (offline, 5-7 s at 32²).

    Args:
      image_size: side S of the square images.
      seed: compositing seed (the train/test split does not depend on it).
      data_dir: TFDS data dir; default :func:`default_data_dir`.

    Returns:
      ``{"train": ImageSet, "test": ImageSet}`` (8000 and 2000 examples),
      rows ordered by source index: ``images (N, S, S, 3) uint8``, ``masks
      (N, S, S) uint8`` in {0, 1}, ``labels`` = ``categories`` ``(N,)`` int64
      indexing :data:`CATEGORIES`. Arrays are read-only and cached in memory.
    """
    key = None if data_dir is None else str(data_dir)
    return dict(_load_splits(image_size, seed, key))


@functools.lru_cache(maxsize=1)
def _supports() -> np.ndarray:
    supports = silhouette_supports(load_animal_mnist()[0])
    supports.flags.writeable = False
    return supports


def rerender(view: ImageSet, seed: int) -> ImageSet:
    """The silhouettes of ``view`` composited again with compositing seed ``seed``.

    Row i becomes the example ``view.index[i]`` of the dataset built with seed
    ``seed``: the same animal in a fresh scene (colours, textures, clutter,
    scale, position). Training on several renderings is the embedded
    benchmark's data augmentation; labels and categories are kept.

    Args:
      view: rows of the embedded dataset (a split or a view of one); its
        ``index`` names the source silhouettes.
      seed: compositing seed (>= 0).
    """
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if view.masks is None or view.images.ndim != 4:
        raise ValueError("rerender needs rows of the embedded dataset (images with masks)")
    size = view.images.shape[1]
    if len(view) == 0:
        return view
    images, masks = composite_batch(_supports()[view.index], size,
                                    [[int(seed), int(i)] for i in view.index])
    return ImageSet(images, view.labels, masks, view.categories, view.index)
