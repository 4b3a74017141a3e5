"""Paper-scale data: VOC 2012 classification, Oxford-IIIT Pet and VOC + SBD segmentation.

No machine here can download these; the loaders are the real code paths and are
tested under ``tfds.testing.mock_data`` and on tiny fabricated folders.

* :func:`voc_classification` — TFDS ``voc/2012``: "category present" vs random
  images without it (balanced).
* :func:`pet_segmentation` — TFDS ``oxford_iiit_pet``: cats or dogs with a binary
  mask (the trimap's foreground and boundary are the object).
* :class:`VocSbdSegmentation` — a TFDS builder over a manually downloaded
  ``VOCdevkit/VOC2012`` and SBD ``benchmark_RELEASE`` in ``manual_dir``;
  :func:`voc_sbd_segmentation` gives the single-category view.

Images get torchvision's VGG geometry (:func:`vgg_geometry`: shorter side to
256, centre crop 224) as uint8; :func:`nettransplant.data.normalize_images`
applies ImageNet mean/std. Masks get the same geometry with nearest-neighbour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nettransplant.data.silhouettes import ImageSet

VOC_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                  "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                  "sheep", "sofa", "train", "tvmonitor")
VOC_IGNORE = 255  # object boundaries in VOC class maps
PET_SPECIES = ("cat", "dog")


def vgg_geometry(image: np.ndarray, mask: np.ndarray | None = None, *, size: int = 224,
                 resize: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize the shorter side to ``resize`` (bilinear) and centre-crop ``size``² (torchvision).

    ``resize`` defaults to ``size · 256 / 224`` (256 for 224). ``mask`` (H, W)
    follows with nearest-neighbour resampling.
    """
    resize = resize or round(size * 256 / 224)
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    box = (left, top, left + size, top + size)
    out = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).crop(box))
    if mask is None:
        return out, None
    if mask.shape[:2] != (h, w):
        raise ValueError(f"mask {mask.shape[:2]} and image {(h, w)} differ in size")
    m = Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST).crop(box)
    return out, np.asarray(m)


def _category_index(category: str, names: tuple[str, ...], dataset: str) -> int:
    if category not in names:
        raise ValueError(f"{dataset} has no category {category!r}; it has {list(names)}")
    return names.index(category)


def voc_classification(category: str, split: str = "train", *, size: int = 224,
                       data_dir: str | None = None, seed: int = 0,
                       max_positives: int | None = None) -> ImageSet:
    """VOC 2012 "``category`` vs random images" (label 1 / 0), balanced, VGG geometry."""
    index = _category_index(category, VOC_CATEGORIES, "voc/2012")
    source = tfds.data_source("voc/2012", split=split, data_dir=data_dir)
    present = np.array([index in np.asarray(source[i]["labels"]).tolist()
                        for i in range(len(source))])
    rng = np.random.default_rng(seed)
    pos = rng.permutation(np.flatnonzero(present))[:max_positives]
    neg_pool = np.flatnonzero(~present)
    if len(pos) == 0 or len(neg_pool) == 0:
        raise ValueError(f"voc/2012 {split} has {len(pos)} images with {category} and "
                         f"{len(neg_pool)} without: cannot build a balanced view")
    pos = pos[: len(neg_pool)]  # balanced: as many negatives as positives
    neg = rng.choice(neg_pool, size=len(pos), replace=False)
    rows = np.concatenate([pos, neg])
    images = np.stack([vgg_geometry(np.asarray(source[int(i)]["image"]), size=size)[0]
                       for i in rows])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]).astype(np.int64)
    return ImageSet(images, labels, None, np.full(len(rows), index, np.int64),
                    rows.astype(np.int64))


def pet_segmentation(species: str, split: str = "train", *, size: int = 224,
                     data_dir: str | None = None, max_images: int | None = None) -> ImageSet:
    """Oxford-IIIT Pet cats or dogs with binary masks (trimap foreground + boundary = 1)."""
    index = _category_index(species, PET_SPECIES, "oxford_iiit_pet")
    source = tfds.data_source("oxford_iiit_pet", split=split, data_dir=data_dir)
    images, masks, rows = [], [], []
    for i in range(len(source)):
        example = source[i]
        if int(example["species"]) != index:
            continue
        image = np.asarray(example["image"])
        trimap = np.asarray(example["segmentation_mask"])[..., 0]
        if trimap.shape != image.shape[:2]:  # keep image and mask on one grid
            trimap = np.asarray(Image.fromarray(trimap).resize(
                (image.shape[1], image.shape[0]), Image.NEAREST))
        mask = np.isin(trimap, (1, 3)).astype(np.uint8)  # 1 pet, 2 background, 3 boundary
        image, mask = vgg_geometry(image, mask, size=size)
        images.append(image)
        masks.append(mask)
        rows.append(i)
        if max_images is not None and len(rows) >= max_images:
            break
    if not rows:
        raise ValueError(f"oxford_iiit_pet {split} has no {species} images")
    n = len(rows)
    return ImageSet(np.stack(images), np.ones(n, np.int64), np.stack(masks),
                    np.full(n, index, np.int64), np.array(rows, np.int64))


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} is missing from the manual folder")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_sbd_class_map(path: Path) -> np.ndarray:
    """SBD ``cls/<id>.mat``: the ``GTcls.Segmentation`` class map as uint8."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, np.uint8)
    except (KeyError, AttributeError, ValueError) as err:
        raise ValueError(f"{path} is not an SBD class file with GTcls.Segmentation") from err


class VocSbdSegmentation(tfds.core.GeneratorBasedBuilder):
    """VOC 2012 segmentation + SBD, from a manually downloaded folder.

    ``train``: SBD train ∪ SBD val ∪ VOC seg train, minus VOC seg val;
    ``validation``: VOC seg val. Class maps: 0 background, 1-20
    :data:`VOC_CATEGORIES`, 255 boundary.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the extracted VOC 2012 trainval archive (VOCdevkit/VOC2012/...) and the SBD "
        "release (benchmark_RELEASE/dataset/...) in manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                              encoding=zlib),
                "class_map": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                                  encoding=zlib),
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
            for name in ("train.txt", "val.txt"):
                if (sbd / name).is_file():
                    train |= set(_read_ids(sbd / name))
        train -= set(val)
        return {"train": self._generate_examples(voc, sbd, sorted(train)),
                "validation": self._generate_examples(voc, sbd, val)}

    def _generate_examples(self, voc: Path, sbd: Path, ids):
        for name in ids:
            image_path = voc / "JPEGImages" / f"{name}.jpg"
            voc_png = voc / "SegmentationClass" / f"{name}.png"
            if voc_png.is_file():  # palette PNG: pixel values are class indices
                class_map = np.asarray(Image.open(voc_png), np.uint8)
            elif (sbd / "cls" / f"{name}.mat").is_file():
                class_map = read_sbd_class_map(sbd / "cls" / f"{name}.mat")
            else:
                raise FileNotFoundError(f"no class map for {name} in {voc} or {sbd}")
            image = np.asarray(Image.open(image_path).convert("RGB"), np.uint8)
            if image.shape[:2] != class_map.shape:
                raise ValueError(f"{name}: image {image.shape[:2]} and class map "
                                 f"{class_map.shape} differ")
            yield name, {"image": image, "class_map": class_map, "name": name}


def voc_sbd_segmentation(category: str, split: str = "train", *, manual_dir: str | Path,
                         data_dir: str | Path | None = None, size: int = 224) -> ImageSet:
    """Images containing ``category`` with its binary mask (boundary pixels → background)."""
    index = _category_index(category, VOC_CATEGORIES, "VOC") + 1  # 0 is background
    builder = VocSbdSegmentation(data_dir=str(data_dir) if data_dir else None,
                                 file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    source = builder.as_data_source()[split]
    images, masks, rows = [], [], []
    for i in range(len(source)):
        example = source[i]
        class_map = np.asarray(example["class_map"])
        if not (class_map == index).any():
            continue
        image, mask = vgg_geometry(np.asarray(example["image"]),
                                   (class_map == index).astype(np.uint8), size=size)
        images.append(image)
        masks.append(mask)
        rows.append(i)
    if not rows:
        raise ValueError(f"no {split} image in {manual_dir} contains {category}")
    n = len(rows)
    return ImageSet(np.stack(images), np.ones(n, np.int64), np.stack(masks),
                    np.full(n, index, np.int64), np.array(rows, np.int64))
