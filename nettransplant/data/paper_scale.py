"""Paper-scale data: VOC 2012 classification, Oxford-IIIT Pet and VOC + SBD segmentation.

No machine here can download these; the loaders are the real code paths and are
tested under ``tfds.testing.mock_data`` and on tiny fabricated folders. Every
loader reads through TFDS array-record data sources, so none needs TensorFlow.

* :func:`voc_classification` — TFDS ``voc/2012``: images containing the
  category (label 1) vs as many random images without it (label 0).
* :func:`pet_segmentation` — TFDS ``oxford_iiit_pet``: cats or dogs with a
  binary mask from the pet's trimap.
* :class:`VocSbdSegmentation` — a TFDS builder over a manually downloaded
  ``VOCdevkit/VOC2012`` and SBD ``benchmark_RELEASE`` in ``manual_dir``;
  :func:`voc_sbd_segmentation` gives the single-category view.

Images get torchvision's VGG geometry (:func:`vgg_geometry`) and stay uint8;
:func:`nettransplant.data.normalize_images` then applies the ImageNet mean/std
on [0, 1] RGB. Masks get the same geometry with nearest-neighbour resampling.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nettransplant.data.silhouettes import ImageSet

VOC_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                  "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                  "sheep", "sofa", "train", "tvmonitor")
VOC_IGNORE = 255  # void pixels (object boundaries) in VOC class maps
PET_SPECIES = ("cat", "dog")
# Oxford-IIIT Pet trimap values.
PET_TRIMAP_PET, PET_TRIMAP_BACKGROUND, PET_TRIMAP_BORDER = 1, 2, 3
NOT_THE_CATEGORY = -1  # ``ImageSet.categories`` of negatives in a classification view


def vgg_geometry(image: np.ndarray, mask: np.ndarray | None = None, *, size: int = 224,
                 resize: int | None = None, crop: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """torchvision's VGG input geometry on a uint8 image (and its mask).

    With ``crop`` (``Resize(resize)`` then ``CenterCrop(size)``): the shorter
    side becomes ``resize`` (default ``round(size * 256 / 224)``, 256 for 224)
    and the longer ``int(resize * long / short)``, bilinear (PIL, as
    torchvision does for PIL images); then the centred ``size × size`` window
    with offsets ``int(round((H' - size) / 2))`` is cut. Without ``crop``
    (``Resize((size, size))``): the image is resized to ``size × size``.

    Args:
      image: ``(H, W, 3)`` uint8.
      mask: optional ``(H, W)`` uint8 label map; resampled nearest-neighbour.
      size: output side.
      resize: shorter side before cropping (>= size).
      crop: resize-then-centre-crop (True) or plain resize (False).

    Returns:
      ``(image (size, size, 3) uint8, mask (size, size) uint8 or None)``.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    if mask is not None and mask.shape[:2] != (h, w):
        raise ValueError(f"mask {mask.shape[:2]} and image {(h, w)} differ in size")
    if crop:
        resize = resize or round(size * 256 / 224)
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size}) to centre-crop")
        if h <= w:
            new_h, new_w = resize, int(resize * w / h)
        else:
            new_h, new_w = int(resize * h / w), resize
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        box = (left, top, left + size, top + size)
    else:
        new_h = new_w = size
        box = (0, 0, size, size)
    out = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).crop(box))
    if mask is None:
        return out, None
    m = Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST).crop(box)
    return out, np.asarray(m)


def _category_index(category: str, names: tuple[str, ...], dataset: str) -> int:
    if category not in names:
        raise ValueError(f"{dataset} has no category {category!r}; it has {list(names)}")
    return names.index(category)


def _as_names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _stack_view(images: list[np.ndarray], labels: np.ndarray, masks: list[np.ndarray] | None,
                categories: np.ndarray, rows: np.ndarray, size: int) -> ImageSet:
    n = len(images)
    return ImageSet(
        images=np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8),
        labels=labels.astype(np.int64),
        masks=None if masks is None else (
            np.stack(masks) if n else np.zeros((0, size, size), np.uint8)),
        categories=categories.astype(np.int64),
        index=rows.astype(np.int64))


def voc_classification(category: str | Sequence[str], split: str = "train", *,
                       size: int = 224, crop: bool = True, data_dir: str | Path | None = None,
                       seed: int = 0, max_positives: int | None = None,
                       include_difficult: bool = True, exclude: Sequence[str] = ()) -> ImageSet:
    """VOC 2012 "``category`` vs random images", balanced, VGG geometry.

    Positives are the split's images containing ``category`` (any of them, for
    a list: a generic module's "object vs random images"; at most
    ``max_positives``, and no more than there are negatives: a seeded random
    subset); negatives are as many images drawn at random from those with none
    of ``category`` and none of ``exclude``.

    Args:
      category: one of :data:`VOC_CATEGORIES`, or a list of them.
      split: a TFDS split of ``voc/2012`` (``train``, ``validation``, ``test``).
      size, crop: see :func:`vgg_geometry`.
      data_dir: TFDS data dir (default TFDS's).
      seed: chooses positives (when capped), negatives and the order.
      include_difficult: count objects marked difficult (TFDS ``labels``) or
        not (``labels_no_difficult``).
      exclude: categories no negative may contain (e.g. a held-out category).

    Returns:
      ``ImageSet``: ``images (2P, size, size, 3)`` uint8, ``labels`` 1 then 0,
      ``masks`` None, ``categories`` for positives the index of the first
      listed category the image contains, :data:`NOT_THE_CATEGORY` for
      negatives, ``index`` rows of the TFDS split.
    """
    names = _as_names(category)
    wanted = [_category_index(c, VOC_CATEGORIES, "voc/2012") for c in names]
    avoided = set(wanted) | {_category_index(c, VOC_CATEGORIES, "voc/2012") for c in exclude}
    source = tfds.data_source("voc/2012", split=split,
                              data_dir=None if data_dir is None else str(data_dir))
    key = "labels" if include_difficult else "labels_no_difficult"
    contained = [set(np.asarray(source[i][key]).tolist()) for i in range(len(source))]
    present = np.array([bool(c & set(wanted)) for c in contained], bool)
    clean = np.array([not c & avoided for c in contained], bool)
    rng = np.random.default_rng(seed)
    pos = rng.permutation(np.flatnonzero(present))[:max_positives]
    neg_pool = np.flatnonzero(clean)
    if len(pos) == 0 or len(neg_pool) == 0:
        avoided_names = [VOC_CATEGORIES[k] for k in sorted(avoided)]
        raise ValueError(f"voc/2012 {split} has {len(pos)} images with {list(names)} and "
                         f"{len(neg_pool)} with none of {avoided_names}: cannot build a "
                         "balanced view")
    pos = pos[: len(neg_pool)]  # balanced: no more positives than negatives
    neg = rng.permutation(neg_pool)[: len(pos)]
    rows = np.concatenate([pos, neg])
    images = [vgg_geometry(np.asarray(source[int(i)]["image"]), size=size, crop=crop)[0]
              for i in rows]
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    first = [next(k for k in wanted if k in contained[int(i)]) for i in pos]
    categories = np.concatenate([np.array(first, np.int64),
                                 np.full(len(neg), NOT_THE_CATEGORY)])
    return _stack_view(images, labels, None, categories, rows, size)


def trimap_to_mask(trimap: np.ndarray,
                   border: Literal["foreground", "background", "ignore"] = "foreground"
                   ) -> np.ndarray:
    """Oxford-IIIT Pet trimap (1 pet, 2 background, 3 border) → uint8 mask.

    ``border`` decides the border pixels: 1 (``foreground``, the default: the
    outline belongs to the pet), 0 (``background``) or :data:`VOC_IGNORE`
    (``ignore``).
    """
    fill = {"foreground": 1, "background": 0, "ignore": VOC_IGNORE}
    if border not in fill:
        raise ValueError(f"border must be one of {list(fill)}, got {border!r}")
    mask = (trimap == PET_TRIMAP_PET).astype(np.uint8)
    mask[trimap == PET_TRIMAP_BORDER] = fill[border]
    return mask


def pet_segmentation(species: str, split: str = "train", *, size: int = 224, crop: bool = True,
                     data_dir: str | Path | None = None, max_images: int | None = None,
                     border: Literal["foreground", "background", "ignore"] = "foreground"
                     ) -> ImageSet:
    """Oxford-IIIT Pet cats or dogs with binary masks, VGG geometry.

    Args:
      species: ``cat`` or ``dog``.
      split: ``train`` or ``test``.
      size, crop: see :func:`vgg_geometry`.
      data_dir: TFDS data dir (default TFDS's).
      max_images: stop after this many images of the species (in split order).
      border: what the trimap's border becomes (:func:`trimap_to_mask`).

    Returns:
      ``ImageSet``: ``images (N, size, size, 3)`` uint8, ``masks (N, size,
      size)`` uint8 (1 pet, 0 background, 255 ignored border if asked),
      ``labels`` all 1, ``categories`` the species index, ``index`` split rows.
    """
    index = _category_index(species, PET_SPECIES, "oxford_iiit_pet")
    source = tfds.data_source("oxford_iiit_pet", split=split,
                              data_dir=None if data_dir is None else str(data_dir))
    images, masks, rows = [], [], []
    for i in range(len(source)):
        if max_images is not None and len(rows) >= max_images:
            break
        example = source[i]
        if int(example["species"]) != index:
            continue
        image = np.asarray(example["image"])
        trimap = np.asarray(example["segmentation_mask"])[..., 0]
        if trimap.shape != image.shape[:2]:  # keep image and mask on one grid
            trimap = np.asarray(Image.fromarray(trimap).resize(
                (image.shape[1], image.shape[0]), Image.NEAREST))
        image, mask = vgg_geometry(image, trimap_to_mask(trimap, border), size=size, crop=crop)
        images.append(image)
        masks.append(mask)
        rows.append(i)
    if not rows:
        raise ValueError(f"oxford_iiit_pet {split} has no {species} images")
    n = len(rows)
    return _stack_view(images, np.ones(n), masks, np.full(n, index), np.array(rows), size)


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} is missing from the manual folder")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_sbd_class_map(path: str | Path) -> np.ndarray:
    """SBD ``cls/<id>.mat``: the ``GTcls.Segmentation`` class map, ``(H, W)`` uint8."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        class_map = np.asarray(gt.Segmentation)
    except (KeyError, AttributeError, ValueError, TypeError, OSError) as err:
        raise ValueError(f"{path} is not an SBD class file with GTcls.Segmentation") from err
    valid = (class_map >= 0) & (class_map <= len(VOC_CATEGORIES)) | (class_map == VOC_IGNORE)
    if class_map.ndim != 2 or class_map.size == 0 or not valid.all():
        raise ValueError(f"{path}: GTcls.Segmentation must be a 2-D map of classes "
                         f"0..{len(VOC_CATEGORIES)} (or {VOC_IGNORE}), got shape "
                         f"{class_map.shape}, values {np.unique(class_map)[:10]}")
    return class_map.astype(np.uint8)


def read_voc_class_map(path: str | Path) -> np.ndarray:
    """VOC ``SegmentationClass/<id>.png`` (palette PNG): pixel values are class indices."""
    with Image.open(path) as png:
        if png.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette (P) or grayscale PNG, got {png.mode}")
        return np.asarray(png, np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class VocSbdSegmentation(tfds.core.GeneratorBasedBuilder):
    """VOC 2012 segmentation + SBD, from a manually downloaded folder.

    ``train``: VOC seg ``train`` ∪ SBD ``train`` ∪ SBD ``val`` (SBD's lists, or
    every ``cls/*.mat`` when they are absent), minus VOC seg ``val``;
    ``validation``: VOC seg ``val``. Class maps: 0 background, k + 1 for
    :data:`VOC_CATEGORIES` [k], 255 void (VOC's own maps only). VOC's PNG is
    used where both exist. Images are the original JPEG bytes.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Raw image and class-map tensors.",
        "2.0.0": "JPEG bytes, PNG class maps and the classes present per image.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the extracted VOC 2012 trainval archive (VOCdevkit/VOC2012/JPEGImages, "
        "SegmentationClass, ImageSets/Segmentation/{train,val}.txt) and, for the augmented "
        "train split, the SBD release (benchmark_RELEASE/dataset/cls/*.mat, train.txt, "
        "val.txt) in manual_dir.")

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # readable without TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "class_map": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "labels": tfds.features.Sequence(
                    tfds.features.ClassLabel(names=list(VOC_CATEGORIES))),
                "name": tfds.features.Text(),
            }))

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        voc = root / "VOCdevkit" / "VOC2012"
        sbd = root / "benchmark_RELEASE" / "dataset"
        if not voc.is_dir():
            raise FileNotFoundError(f"{voc} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        val = _read_ids(voc / "ImageSets" / "Segmentation" / "val.txt")
        train = set(_read_ids(voc / "ImageSets" / "Segmentation" / "train.txt"))
        if sbd.is_dir():
            lists = [sbd / name for name in ("train.txt", "val.txt") if (sbd / name).is_file()]
            if lists:
                for path in lists:
                    train |= set(_read_ids(path))
            else:
                train |= {p.stem for p in (sbd / "cls").glob("*.mat")}
        train -= set(val)
        return {"train": self._generate_examples(voc, sbd, sorted(train)),
                "validation": self._generate_examples(voc, sbd, val)}

    def _generate_examples(self, voc: Path, sbd: Path, ids):
        for name in ids:
            voc_png = voc / "SegmentationClass" / f"{name}.png"
            sbd_mat = sbd / "cls" / f"{name}.mat"
            if voc_png.is_file():
                class_map = read_voc_class_map(voc_png)
            elif sbd_mat.is_file():
                class_map = read_sbd_class_map(sbd_mat)
            else:
                raise FileNotFoundError(f"no class map for {name}: neither {voc_png} nor {sbd_mat}")
            image_path = voc / "JPEGImages" / f"{name}.jpg"
            if not image_path.is_file() and (sbd / "img" / f"{name}.jpg").is_file():
                image_path = sbd / "img" / f"{name}.jpg"
            if not image_path.is_file():
                raise FileNotFoundError(f"no image for {name}: {image_path} is missing")
            with Image.open(image_path) as jpeg:
                image_size = jpeg.size[::-1]
            if image_size != class_map.shape:
                raise ValueError(f"{name}: image {image_size} and class map "
                                 f"{class_map.shape} differ in size")
            present = sorted({int(c) - 1 for c in np.unique(class_map)
                              if 1 <= c <= len(VOC_CATEGORIES)})
            yield name, {"image": image_path.read_bytes(), "class_map": _png_bytes(class_map),
                         "labels": present, "name": name}


def voc_sbd_segmentation(category: str | Sequence[str], split: str = "train", *,
                         manual_dir: str | Path, data_dir: str | Path | None = None,
                         size: int = 224, crop: bool = True,
                         boundary: Literal["background", "ignore"] = "background") -> ImageSet:
    """Images containing ``category`` with its binary mask, VGG geometry.

    Builds :class:`VocSbdSegmentation` from ``manual_dir`` on first use. For a
    list of categories (a generic module's segmentation) the images hold any of
    them and the mask covers all of them.

    Args:
      category: one of :data:`VOC_CATEGORIES`, or a list of them.
      split: ``train`` (VOC + SBD) or ``validation`` (VOC seg val).
      manual_dir: folder holding ``VOCdevkit/`` and optionally ``benchmark_RELEASE/``.
      data_dir: TFDS data dir (default TFDS's).
      size, crop: see :func:`vgg_geometry`.
      boundary: VOC's void pixels become background (0) or stay 255 (``ignore``).

    Returns:
      ``ImageSet``: ``images (N, size, size, 3)`` uint8, ``masks (N, size,
      size)`` uint8 (1 the category, 0 the rest, 255 void if kept), ``labels``
      all 1, ``categories`` the index in :data:`VOC_CATEGORIES` of the first
      listed category the image contains, ``index`` rows of the split.
    """
    wanted = [_category_index(c, VOC_CATEGORIES, "VOC") for c in _as_names(category)]
    if boundary not in ("background", "ignore"):
        raise ValueError(f"boundary must be 'background' or 'ignore', got {boundary!r}")
    builder = VocSbdSegmentation(data_dir=None if data_dir is None else str(data_dir))
    voc = Path(manual_dir) / "VOCdevkit" / "VOC2012"
    if not builder.is_prepared() and not voc.is_dir():
        raise FileNotFoundError(
            f"{voc} not found. {VocSbdSegmentation.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    # Find the images first from their class lists, without decoding pixels.
    listing = builder.as_data_source(split=split, decoders={
        "image": tfds.decode.SkipDecoding(), "class_map": tfds.decode.SkipDecoding()})
    contained = {i: set(np.asarray(listing[i]["labels"]).tolist()) for i in range(len(listing))}
    rows = [i for i, c in contained.items() if c & set(wanted)]
    if not rows:
        raise ValueError(f"no {split} image in {manual_dir} contains {category}")
    source = builder.as_data_source(split=split)
    images, masks = [], []
    for i in rows:
        example = source[i]
        class_map = np.asarray(example["class_map"])[..., 0]
        mask = np.isin(class_map, np.array(wanted) + 1).astype(np.uint8)
        if boundary == "ignore":
            mask[class_map == VOC_IGNORE] = VOC_IGNORE
        image, mask = vgg_geometry(np.asarray(example["image"]), mask, size=size, crop=crop)
        images.append(image)
        masks.append(mask)
    n = len(rows)
    first = [next(k for k in wanted if k in contained[i]) for i in rows]
    return _stack_view(images, np.ones(n), masks, np.array(first), np.array(rows), size)
