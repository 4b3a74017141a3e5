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
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nettransplant.data.animal_mnist import CATEGORIES, DataFileError, load_animal_mnist
from nettransplant.data.composite import composite_batch, silhouette_supports
from nettransplant.runtime.files import file_sha256

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

    VERSION = tfds.core.Version("4.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Striped objects on flat-blob clutter.",
        "2.0.0": "One texture family for object and clutter; hole-filled animal masks.",
        "3.0.0": "A dark contour on the animal's inner border.",
        "4.0.0": "Each category wears its own coat; a decoy ellipse wears it too.",
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
                                            [[cfg.seed, i] for i in rows],
                                            [CATEGORIES[labels[i]] for i in rows])
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


# Written beside the shards of every dataset this module builds: each shard's
# size, SHA-256 and record count, checked before the dataset is read, so a
# truncated or damaged cache is rebuilt instead of read.
SHARD_MANIFEST = "nettransplant_shards.json"
MANIFEST_FORMAT = 1


def _dataset_dir(root: Path, config: AnimalSilhouettesConfig) -> Path:
    """Where TFDS keeps the dataset of ``config`` under the data dir ``root``."""
    return root / AnimalSilhouettes.name / config.name / str(AnimalSilhouettes.VERSION)


def _expected_shards(builder: AnimalSilhouettes) -> dict[str, int]:
    """``{shard file name: number of records}`` as TFDS recorded them at build time."""
    return {name: int(length) for split in builder.info.splits.values()
            for name, length in zip(split.filenames, split.shard_lengths, strict=True)}


def _write_manifest(directory: Path, shards: dict[str, int]) -> None:
    """Record each shard's size and SHA-256; written atomically (concurrent builders agree)."""
    record = {"format": MANIFEST_FORMAT, "shards": {
        name: {"bytes": (directory / name).stat().st_size,
               "sha256": file_sha256(directory / name), "records": records}
        for name, records in sorted(shards.items())}}
    staging = directory / f".{SHARD_MANIFEST}.{os.getpid()}"
    staging.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(staging, directory / SHARD_MANIFEST)


def _check_records(directory: Path, shards: dict[str, int]) -> str | None:
    """Read every record of every shard; array_record checks each chunk's hash as it reads.

    Returns:
      None when every shard reads completely with the recorded number of
      records, else what is wrong (naming the shard).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    for name, records in shards.items():
        path = directory / name
        if not path.is_file():
            return f"shard {path} is missing"
        try:
            reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
            try:
                if reader.num_records() != records:
                    return (f"shard {path} holds {reader.num_records()} records, "
                            f"{records} when built")
                for start in range(0, records, 1024):  # bounded memory at 224²
                    reader.read(start, min(start + 1024, records))
            finally:
                reader.close()
        except (RuntimeError, OSError, ValueError) as err:  # riegeli reports corruption so
            return f"shard {path} is damaged ({_one_line(err)})"
    return None


def _check_shards(builder: AnimalSilhouettes) -> str | None:
    """Whether the built shards are those written at build time.

    Compares each shard with :data:`SHARD_MANIFEST` (size, then SHA-256). A
    dataset without a manifest (built by an older nettransplant, or by another
    process that is writing it) is checked record by record instead, and gets
    its manifest when it passes.

    Returns:
      None if the shards are intact, else a one-line description naming the shard.
    """
    directory = Path(builder.data_dir)
    if set(builder.info.splits) != {"train", "test"}:
        return (f"its dataset_info.json lists the splits {sorted(builder.info.splits)}, not "
                "['test', 'train'] (missing or incomplete metadata)")
    shards = _expected_shards(builder)
    manifest_path = directory / SHARD_MANIFEST
    if not manifest_path.exists():
        problem = _check_records(directory, shards)
        if problem is None:
            _write_manifest(directory, shards)
        return problem
    try:
        recorded = json.loads(manifest_path.read_text())["shards"]
        recorded = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its shard manifest {manifest_path} is unreadable ({_one_line(err)})"
    if set(recorded) != set(shards):
        return (f"its shard manifest {manifest_path} lists {sorted(recorded)}, but "
                f"dataset_info.json lists {sorted(shards)}")
    for name, (size, sha256) in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            return f"shard {path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"shard {path} has {actual} bytes, {size} when built (truncated?)"
        if file_sha256(path) != sha256:
            return f"shard {path} has another SHA-256 than when built (damaged)"
    return None


def _one_line(text: object) -> str:
    """``str(text)`` with its lines joined, so that a message stays on one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _prepare(config: AnimalSilhouettesConfig, root: Path) -> AnimalSilhouettes:
    # TFDS wants the configs it lists by name.
    name_or_config = (config.name if config.name in AnimalSilhouettes.builder_configs
                      else config)
    builder = AnimalSilhouettes(config=name_or_config, data_dir=str(root))
    builder.download_and_prepare()
    return builder


def build_silhouettes(image_size: int = 32, seed: int = 0,
                      data_dir: str | Path | None = None) -> AnimalSilhouettes:
    """Builds the embedded dataset (once, offline) and returns its TFDS builder.

    A dataset already in ``data_dir`` is checked first: its shards against the
    sizes and SHA-256 recorded when they were written. A damaged one
    (truncated, altered, unreadable metadata) is moved aside to
    ``<version>.damaged-<time>-<pid>`` (delete it at will) and rebuilt, with a
    one-line :class:`RuntimeWarning`; damaged data is never returned.

    Args:
      image_size: side of the square images (>= 16).
      seed: compositing seed (>= 0).
      data_dir: TFDS data dir; default :func:`default_data_dir`.

    Returns:
      The prepared builder; ``builder.as_data_source()`` gives TF-free
      random access to ``{"train", "test"}``.
    Raises:
      DataFileError: the dataset is still damaged right after rebuilding it.
    """
    config = AnimalSilhouettesConfig(image_size=image_size, seed=seed)
    root = Path(data_dir or default_data_dir()).expanduser()
    directory = _dataset_dir(root, config)
    existed = directory.exists()
    try:
        builder = _prepare(config, root)
    except Exception as err:  # TFDS's metadata files of an existing dataset are unreadable
        if not existed:
            raise
        problem = f"its metadata cannot be read ({type(err).__name__}: {_one_line(err)})"
    else:
        directory = Path(builder.data_dir)
        if not existed:
            _write_manifest(directory, _expected_shards(builder))
            return builder
        problem = _check_shards(builder)
        if problem is None:
            return builder

    aside = directory.with_name(
        f"{directory.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.rename(directory, aside)  # not a valid version name: TFDS ignores it
    warnings.warn(f"the animal_silhouettes dataset at {directory} is damaged: {problem}; "
                  f"moved it to {aside} and rebuilding it", RuntimeWarning, stacklevel=2)
    builder = _prepare(config, root)
    _write_manifest(Path(builder.data_dir), _expected_shards(builder))
    problem = _check_shards(builder)
    if problem is not None:
        raise DataFileError(f"the rebuilt animal_silhouettes dataset at {builder.data_dir} is "
                            f"damaged too: {problem}; check the disk (space, errors), delete "
                            "the folder and retry")
    return builder


def _read_split(source, name: str = "split", directory: str = "the dataset") -> ImageSet:
    """Every example of one split, ordered by source index, as read-only arrays.

    Raises:
      DataFileError: a record cannot be read or decoded, or the split does not
        hold each source index once; the message says how to rebuild.
    """
    rebuild = f"delete {directory} and load it again to rebuild it"
    try:
        examples = source.__getitems__(list(range(len(source))))
    except Exception as err:  # riegeli and zlib report corrupt records as they read them
        raise DataFileError(f"the {name} split of {directory} cannot be read "
                            f"({type(err).__name__}: {_one_line(err)}); {rebuild}") from err
    index = np.array([int(e["index"]) for e in examples], np.int64)
    if len(np.unique(index)) != len(index):
        raise DataFileError(f"the {name} split of {directory} holds a source index twice; "
                            f"{rebuild}")
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
    expected = {name: split.num_examples for name, split in builder.info.splits.items()}
    splits = []
    for name, source in sorted(builder.as_data_source().items()):
        split = _read_split(source, name, builder.data_dir)
        if len(split) != expected[name]:
            raise DataFileError(
                f"the {name} split of {builder.data_dir} has {len(split)} examples, "
                f"{expected[name]} when built; delete {builder.data_dir} and load it again "
                "to rebuild it")
        splits.append((name, split))
    return tuple(splits)


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
def _labels() -> np.ndarray:
    return load_animal_mnist()[1]


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
    coats = [CATEGORIES[c] for c in _labels()[view.index]]
    images, masks = composite_batch(_supports()[view.index], size,
                                    [[int(seed), int(i)] for i in view.index], coats)
    return ImageSet(images, view.labels, masks, view.categories, view.index)
