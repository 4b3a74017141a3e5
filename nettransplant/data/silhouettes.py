"""``animal_silhouettes``: the embedded benchmark as a TFDS dataset that builds offline.

Each example is an RGB image (``image_size`` configurable, 32 by default), the
class label (one of :data:`CATEGORIES`), a binary segmentation mask and the
index of the source silhouette. The split is fixed: per class, a seeded
permutation puts 800 images in ``train`` and 200 in ``test`` (seed 0, whatever
the compositing seed). Built in ``array_record`` format with raw (zlib) tensors,
so neither building nor reading needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nettransplant.data.animal_mnist import CATEGORIES, load_animal_mnist
from nettransplant.data.composite import composite

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
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        super().__init__(name=f"{image_size}px_seed{seed}",
                         description=f"{image_size}×{image_size} composites, seed {seed}")
        self.image_size = image_size
        self.seed = seed


class AnimalSilhouettes(tfds.core.GeneratorBasedBuilder):
    """Composited animal-mnist silhouettes for classification and segmentation."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [AnimalSilhouettesConfig(image_size=32, seed=0)]

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
            homepage="https://pypi.org/project/animal-mnist/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        images, labels = load_animal_mnist()
        return {name: self._generate_examples(images, labels, idx)
                for name, idx in split_indices(labels).items()}

    def _generate_examples(self, images, labels, indices):
        cfg = self.builder_config
        for i in indices:
            rng = np.random.default_rng([cfg.seed, int(i)])
            image, mask = composite(images[i], cfg.image_size, rng)
            yield int(i), {"image": image, "mask": mask, "label": int(labels[i]), "index": int(i)}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Arrays of one split or view (leading axis N).

    Attributes:
      images: ``(N, H, W, 3)`` uint8 RGB.
      labels: ``(N,)`` int64 — a category index, or a task label in a view.
      masks: ``(N, H, W)`` uint8 in {0, 1} (None for classification-only data).
      categories: ``(N,)`` int64 category index of each image's object.
      index: ``(N,)`` int64 id of the source silhouette.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    categories: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, rows: np.ndarray) -> ImageSet:
        return ImageSet(*(None if a is None else a[rows]
                          for a in (getattr(self, f.name) for f in dataclasses.fields(self))))


def build_silhouettes(image_size: int = 32, seed: int = 0,
                      data_dir: str | Path | None = None) -> AnimalSilhouettes:
    """Build (once, offline) and return the TFDS builder of the embedded dataset."""
    config = AnimalSilhouettesConfig(image_size=image_size, seed=seed)
    if config.name in AnimalSilhouettes.builder_configs:  # TFDS wants listed configs by name
        config = config.name
    builder = AnimalSilhouettes(config=config, data_dir=str(data_dir or default_data_dir()),
                                file_format="array_record")
    builder.download_and_prepare()
    return builder


@functools.lru_cache(maxsize=4)
def load_silhouettes(image_size: int = 32, seed: int = 0,
                     data_dir: str | Path | None = None) -> dict[str, ImageSet]:
    """``{"train": ImageSet, "test": ImageSet}``, built on first use, ordered by ``index``."""
    builder = build_silhouettes(image_size, seed, data_dir)
    splits = {}
    for name, source in builder.as_data_source().items():
        examples = [source[i] for i in range(len(source))]
        order = np.argsort([int(e["index"]) for e in examples])
        examples = [examples[i] for i in order]
        labels = np.array([e["label"] for e in examples], np.int64)
        splits[name] = ImageSet(
            images=np.stack([e["image"] for e in examples]),
            labels=labels,
            masks=np.stack([e["mask"] for e in examples]),
            categories=labels.copy(),
            index=np.array([e["index"] for e in examples], np.int64))
    return splits
