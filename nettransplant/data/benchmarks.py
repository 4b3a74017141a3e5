"""Benchmarks: every image set the main job trains and evaluates on, per dataset.

``nettransplant reproduce`` asks a :class:`Benchmark` for views and never for a
dataset directly, so the same code runs the embedded benchmark on a laptop and
VOC + SBD at paper scale:

* :class:`Silhouettes` (``config.data = "silhouettes"``): the embedded animal
  silhouettes; teachers train on several renderings of their silhouettes
  (augmentation), generic modules on "any of the categories vs object-free
  scenes", and a 10-way backbone pre-trains on every category.
* :class:`VocSbd` (``config.data = "voc_sbd"``): VOC 2012 classification
  (TFDS ``voc/2012``) and VOC + SBD segmentation from ``config.voc.manual_dir``;
  VOC's validation split is the test split; generic modules are "any of the
  categories vs images holding none of them nor the held-out mammal". Teachers
  start from torchvision's VGG-16 (``config.pretrain.weights``), not from a
  backbone trained here.

Splits are ``"train"`` and ``"test"``; the two share no image. Views are
:class:`~nettransplant.data.silhouettes.ImageSet` of uint8 images.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nettransplant.data import paper_scale, tasks
from nettransplant.data.animal_mnist import CATEGORIES, DISSIMILAR, MAMMALS
from nettransplant.data.composite import background_scenes
from nettransplant.data.silhouettes import AnimalSilhouettes, ImageSet, load_silhouettes, rerender

SPLITS = ("train", "test")
_RENDERING_SEED = 1000  # compositing seeds of the teachers' extra renderings start here


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _concatenate(views: Sequence[ImageSet]) -> ImageSet:
    return ImageSet(*(None if getattr(views[0], f.name) is None else
                      np.concatenate([getattr(v, f.name) for v in views])
                      for f in dataclasses.fields(ImageSet)))


class Benchmark:
    """The views of one dataset (see the module docstring); subclasses fill them in."""

    name: str = ""
    categories: tuple[str, ...] = ()  # every category the dataset names
    mammals: tuple[str, ...] = MAMMALS  # Table 4 holds out one of these
    dissimilar: tuple[str, ...] = ()  # Table 4's generic modules also learn these

    @property
    def version(self) -> str:
        """Identifies the data in teacher fingerprints (a new version retrains teachers)."""
        raise NotImplementedError

    def classification(self, category: str, split: str) -> ImageSet:
        """"``category`` vs random images", balanced: labels 1 then 0."""
        raise NotImplementedError

    def segmentation(self, category: str, split: str) -> ImageSet:
        """The images of ``category`` with its binary masks."""
        raise NotImplementedError

    def unlabelled(self, categories: Sequence[str], num_images: int) -> np.ndarray:
        """``(num_images, H, W, 3)`` uint8 train images of ``categories`` (e.g. for β)."""
        raise NotImplementedError

    def teacher_sets(self, category: str) -> tuple[ImageSet, ImageSet]:
        """A category teacher's training sets: (classification, segmentation)."""
        raise NotImplementedError

    def generic_sets(self, held_out: str, split: str) -> tuple[ImageSet, ImageSet]:
        """Table 4's generic module for ``held_out``: (classification, segmentation) sets."""
        raise NotImplementedError

    def target_classification(self, category: str, split: str) -> ImageSet:
        """Table 4's target task: ``category`` vs the "random images" its leave-one-out
        generic module learnt to reject. Default: :meth:`classification`'s negatives."""
        return self.classification(category, split)

    def pretraining_set(self, split: str) -> ImageSet:
        """The backbone's multi-way set: ``categories`` holds the class of each image."""
        raise NotImplementedError(f"{self.name!r} has no backbone pre-training set")

    @classmethod
    def check_config(cls, config) -> None:
        """Fail, naming the config field, on settings this benchmark cannot run."""

    def leave_one_out_categories(self, held_out: str) -> tuple[str, ...]:
        """The paper's generic training categories: every mammal but ``held_out``, then
        the dissimilar categories."""
        if held_out not in self.mammals:
            raise ValueError(f"held_out must be one of the mammals {list(self.mammals)}, "
                             f"got {held_out!r}")
        return tuple(c for c in self.mammals if c != held_out) + self.dissimilar


class Silhouettes(Benchmark):
    """The embedded benchmark (:mod:`nettransplant.data.silhouettes`).

    Args:
      image_size: side of the square images.
      seed: compositing seed and the seed of every view.
      renderings: a teacher trains on its silhouettes in this many scenes (the
        stored one + fresh renderings; no test silhouette is used).
      generic_images: positives (and as many object-free scenes) per generic module.
      data_dir: where the TFDS dataset is built (default
        :func:`~nettransplant.data.default_data_dir`).
    """

    name = "silhouettes"
    categories = CATEGORIES
    dissimilar = DISSIMILAR

    def __init__(self, *, image_size: int, seed: int, renderings: int = 1,
                 generic_images: int = 1600, data_dir: str | Path | None = None):
        if renderings < 1:
            raise ValueError(f"renderings must be >= 1, got {renderings}")
        self.image_size, self.seed = image_size, seed
        self.renderings, self.generic_images = renderings, generic_images
        self.splits = load_silhouettes(image_size, seed, data_dir)

    @property
    def version(self) -> str:
        return str(AnimalSilhouettes.VERSION)

    def _split(self, split: str) -> ImageSet:
        _check_split(split)
        return self.splits[split]

    def classification(self, category: str, split: str) -> ImageSet:
        return tasks.binary_classification(self._split(split), [category], seed=self.seed)

    def segmentation(self, category: str, split: str) -> ImageSet:
        return tasks.segmentation(self._split(split), [category], seed=self.seed)

    def unlabelled(self, categories: Sequence[str], num_images: int) -> np.ndarray:
        return tasks.unlabelled_images(self.splits["train"], categories, num_images,
                                       seed=self.seed)

    def rendered(self, view: ImageSet, renderings: int | None = None) -> ImageSet:
        """``view`` in ``renderings`` (default: the teachers') renderings: the stored one +
        fresh scenes.

        The same training silhouettes in new colours, textures, clutter and
        placement: the teachers' (and the backbone's) data augmentation.
        """
        renderings = self.renderings if renderings is None else renderings
        return _concatenate([view] + [rerender(view, _RENDERING_SEED + self.seed * 100 + k)
                                      for k in range(1, renderings)])

    @staticmethod
    def rendered_rows(rendered: ImageSet, source: ImageSet, view: ImageSet) -> ImageSet:
        """``rendered(view)`` taken from ``rendered = rendered(source)``.

        A rendering depends only on the silhouette's index and the seed, so the
        rows of ``view`` (a subset of ``source``'s silhouettes, any order) are
        picked instead of composited again; ``view``'s labels are kept.
        """
        position = {int(i): r for r, i in enumerate(source.index)}
        missing = [int(i) for i in view.index if int(i) not in position]
        if missing:
            raise ValueError(f"silhouettes {missing[:5]} of the view are not in the source")
        rows = np.array([position[int(i)] for i in view.index], np.int64)
        copies = len(rendered) // len(source)
        picked = rendered.take(np.concatenate([rows + k * len(source) for k in range(copies)]))
        return ImageSet(picked.images, np.tile(view.labels, copies), picked.masks,
                        picked.categories, picked.index)

    def teacher_sets(self, category: str) -> tuple[ImageSet, ImageSet]:
        cls_view = self.classification(category, "train")
        cls = self.rendered(cls_view)  # the positives' renderings serve segmentation too
        return cls, self.rendered_rows(cls, cls_view, self.segmentation(category, "train"))

    def target_classification(self, category: str, split: str) -> ImageSet:
        """"``category`` vs object-free scenes": every image of the category in ``split``
        and as many scenes without an animal, the negatives of the generic modules.

        Table 4 transplants a category onto a module that says "any animal of the
        other categories vs random images"; here the random images are scenes (every
        category is positive for some module), so the target task's negatives are
        scenes too (drawn apart from the modules' own: seeds ``seed + 303`` for
        ``train``, ``seed + 404`` for ``test``). With other animals as negatives, the
        generic module would answer "yes" to both classes of the target task.
        """
        positives = tasks.positive_set(self._split(split), [category], seed=self.seed)
        n = len(positives)
        scene_seed = self.seed + (303 if split == "train" else 404)
        return ImageSet(
            np.concatenate([positives.images,
                            background_scenes(n, self.image_size, seed=scene_seed)]),
            np.concatenate([np.ones(n), np.zeros(n)]).astype(np.int64), None, None, None)

    def generic_sets(self, held_out: str, split: str) -> tuple[ImageSet, ImageSet]:
        """"Any of the leave-one-out categories vs object-free scenes" (no category is
        left to draw negatives from) + segmentation of them all.

        ``train``: ``generic_images`` positives in ``renderings`` renderings;
        ``test``: at most 400 positives. As many scenes as positives either way.
        """
        categories = self.leave_one_out_categories(held_out)
        if split == "train":
            positives = self.rendered(tasks.positive_set(
                self.splits["train"], categories, num_images=self.generic_images,
                seed=self.seed))
            scene_seed = self.seed + 101
        else:
            test = self._split(split)
            positives = tasks.positive_set(test, categories, num_images=min(len(test), 400),
                                           seed=self.seed)
            scene_seed = self.seed + 202
        n = len(positives)
        cls = ImageSet(
            np.concatenate([positives.images,
                            background_scenes(n, self.image_size, seed=scene_seed)]),
            np.concatenate([np.ones(n), np.zeros(n)]).astype(np.int64), None, None, None)
        return cls, positives

    def pretraining_set(self, split: str) -> ImageSet:
        return self._split(split)


class VocSbd(Benchmark):
    """VOC 2012 classification + VOC/SBD segmentation (:mod:`nettransplant.data.paper_scale`).

    Args:
      manual_dir: folder holding ``VOCdevkit/VOC2012`` and ``benchmark_RELEASE``
        (see :class:`~nettransplant.data.paper_scale.VocSbdSegmentation`).
      data_dir: TFDS data dir holding ``voc/2012`` (default TFDS's).
      image_size: side of the VGG-geometry crop.
      seed: chooses negatives and caps.
      generic_images: at most this many positives per generic module.
    """

    name = "voc_sbd"
    categories = paper_scale.VOC_CATEGORIES
    dissimilar = ("aeroplane", "bicycle", "bird", "boat")  # the paper's Table 4

    _TFDS_SPLITS = {"train": "train", "test": "validation"}

    def __init__(self, *, manual_dir: str | Path, data_dir: str | Path | None = None,
                 image_size: int = 224, seed: int = 0, generic_images: int = 1600):
        if not str(manual_dir):
            raise ValueError("manual_dir is empty: "
                             + paper_scale.VocSbdSegmentation.MANUAL_DOWNLOAD_INSTRUCTIONS)
        self.manual_dir, self.data_dir = Path(manual_dir), data_dir or None
        self.image_size, self.seed, self.generic_images = image_size, seed, generic_images

    @property
    def version(self) -> str:
        return f"voc/2012 + voc_sbd {paper_scale.VocSbdSegmentation.VERSION}"

    @classmethod
    def check_config(cls, config) -> None:
        if config.pretrain.num_steps:
            raise ValueError("config.pretrain.num_steps: 'voc_sbd' has no backbone "
                             "pre-training set; set it to 0 (teachers start from "
                             "config.pretrain.weights, or from scratch)")
        if config.teacher.renderings != 1:
            raise ValueError("config.teacher.renderings: re-rendering is the silhouettes' "
                             f"augmentation; 'voc_sbd' needs 1, got {config.teacher.renderings}")
        if not config.voc.manual_dir:
            raise ValueError("config.voc.manual_dir is empty: "
                             + paper_scale.VocSbdSegmentation.MANUAL_DOWNLOAD_INSTRUCTIONS)

    @functools.cache  # noqa: B019 (a benchmark lives as long as the run)
    def _classification(self, categories: tuple[str, ...], split: str,
                        exclude: tuple[str, ...] = (), max_positives: int | None = None
                        ) -> ImageSet:
        _check_split(split)
        return paper_scale.voc_classification(
            categories, self._TFDS_SPLITS[split], size=self.image_size,
            data_dir=self.data_dir, seed=self.seed, max_positives=max_positives,
            exclude=exclude)

    @functools.cache  # noqa: B019
    def _segmentation(self, categories: tuple[str, ...], split: str) -> ImageSet:
        _check_split(split)
        return paper_scale.voc_sbd_segmentation(
            categories, self._TFDS_SPLITS[split], manual_dir=self.manual_dir,
            data_dir=self.data_dir, size=self.image_size)

    def classification(self, category: str, split: str) -> ImageSet:
        return self._classification((category,), split)

    def segmentation(self, category: str, split: str) -> ImageSet:
        return self._segmentation((category,), split)

    def unlabelled(self, categories: Sequence[str], num_images: int) -> np.ndarray:
        view = self._classification(tuple(categories), "train")
        positives = view.images[view.labels == 1]
        if not 0 <= num_images <= len(positives):
            raise ValueError(f"asked for {num_images} train images of {list(categories)}, "
                             f"voc/2012 has {len(positives)}")
        rows = np.random.default_rng(self.seed).permutation(len(positives))[:num_images]
        return positives[rows]

    def teacher_sets(self, category: str) -> tuple[ImageSet, ImageSet]:
        return self.classification(category, "train"), self.segmentation(category, "train")

    def generic_sets(self, held_out: str, split: str) -> tuple[ImageSet, ImageSet]:
        categories = self.leave_one_out_categories(held_out)
        cls = self._classification(categories, split, exclude=(held_out,),
                                   max_positives=self.generic_images if split == "train"
                                   else None)
        return cls, self._segmentation(categories, split)


def make_benchmark(config) -> Benchmark:
    """The benchmark ``config.data`` names, built from the config's fields."""
    if config.data == "silhouettes":
        return Silhouettes(image_size=config.model.image_size, seed=config.seed,
                           renderings=config.teacher.renderings,
                           generic_images=config.teacher.generic_images)
    if config.data == "voc_sbd":
        return VocSbd(manual_dir=config.voc.manual_dir, data_dir=config.voc.tfds_data_dir,
                      image_size=config.model.image_size, seed=config.seed,
                      generic_images=config.teacher.generic_images)
    raise ValueError(f"config.data={config.data!r}: unknown benchmark; choose from "
                     f"{list(BENCHMARKS)}")


BENCHMARKS = {"silhouettes": Silhouettes, "voc_sbd": VocSbd}
