"""Images and labelled samples for ``nettransplant net``, read with their sizes checked first.

Inputs are a folder of PNG/JPEG files, one PNG/JPEG file, or an ``.npz`` with
an ``images`` array. Whatever their format (8- or 16-bit; gray, gray + alpha,
RGB, RGBA or palette), images come back as the uint8 RGB ``(N, H, W, 3)`` a
net takes: 16-bit values are scaled to 8 bits (their high byte), never
clipped, gray is repeated over the three channels and alpha is dropped.

Sizes are checked before anything is decoded or allocated: an image file's
width × height from its header (at most :data:`MAX_IMAGE_PIXELS`), an ``.npz``
member's shape and dtype from its ``.npy`` header (its bytes must be in the
file, and at most :data:`MAX_INPUT_BYTES`), and the decoded total of a whole
input (at most :data:`MAX_INPUT_BYTES`). Every error is one line naming the
file (a :class:`~nettransplant.runtime.cli.UsageError`).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from nettransplant.runtime.cli import UsageError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 1 << 24  # 16,777,216 pixels per image (4096 × 4096)
MAX_INPUT_BYTES = 1 << 30  # one input's arrays (or decoded images), all together (4× as float)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# --------------------------------------------------------------------------- arrays


def to_rgb8(images: np.ndarray, where: str) -> np.ndarray:
    """``(N, H, W)`` gray or ``(N, H, W, C)`` with C in 1 (gray), 2 (gray + alpha), 3 (RGB)
    or 4 (RGBA), uint8 or uint16 → uint8 RGB ``(N, H, W, 3)``."""
    images = np.asarray(images)
    if images.dtype == np.uint16:
        images = (images >> 8).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 (0..255) or uint16 (0..65535), got "
                         f"{images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise UsageError(f"{where}: images must be (N, H, W) gray or (N, H, W, C) with C in "
                         f"1..4 (gray, gray + alpha, RGB, RGBA), got shape {images.shape}")
    channels = images.shape[-1]
    if channels in (1, 2):
        return np.repeat(images[..., :1], 3, axis=-1)
    return np.ascontiguousarray(images[..., :3])


def _check_pixels(height: int, width: int, where: str) -> None:
    if height < 1 or width < 1:
        raise UsageError(f"{where}: an image of {width}×{height} pixels holds nothing")
    if height * width > MAX_IMAGE_PIXELS:
        raise UsageError(f"{where}: an image of {width}×{height} pixels is over the limit of "
                         f"{MAX_IMAGE_PIXELS:,} pixels; resize it to the net's input size first")


def _check_total(count: int, height: int, width: int, where: str) -> None:
    if count < 1:
        raise UsageError(f"{where}: no images (0 given); give at least one")
    total = count * height * width * 3
    if total > MAX_INPUT_BYTES:
        raise UsageError(f"{where}: {count} images of {width}×{height} would take "
                         f"{total / 2**30:.1f} GiB decoded, over the limit of "
                         f"{MAX_INPUT_BYTES >> 30} GiB; give fewer at a time")


# --------------------------------------------------------------------------- .npz files


def _npy_header(member, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from a ``.npy`` stream's header."""
    version = np.lib.format.read_magic(member)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise UsageError(f"{where}: .npy format version {version} is not supported (1.0 or 2.0)")
    return readers[version](member)


def npz_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of an ``.npz``'s arrays, from their headers alone."""
    path = Path(path)
    with _open_zip(path) as archive:
        return {name: (shape, dtype) for name, shape, dtype, _ in
                (_member_header(archive, info, path) for info in archive.infolist())}


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UsageError(f"{path}: not a readable .npz file ({one_line(err)})") from None


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path
                   ) -> tuple[str, tuple[int, ...], np.dtype, int]:
    """``(name, shape, dtype, bytes held after the header)`` of one ``.npy`` member."""
    if not info.filename.endswith(".npy"):
        raise UsageError(f"{path}: {info.filename!r} is not an array; an .npz holds .npy "
                         "members only")
    name = info.filename.removesuffix(".npy")
    where = f"{path}: array {name!r}"
    try:
        with archive.open(info) as member:
            shape, _, dtype = _npy_header(member, where)
            header_size = member.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{where}: unreadable header ({one_line(err)})") from None
    if dtype.hasobject:
        raise UsageError(f"{where}: holds Python objects; only plain numeric arrays are read")
    return name, tuple(shape), dtype, max(0, info.file_size - header_size)


def _check_member(path: Path, name: str, shape: tuple, dtype: np.dtype, held: int) -> int:
    """The bytes an array's header declares, if within :data:`MAX_INPUT_BYTES` and held."""
    where = f"{path}: array {name!r}"
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_INPUT_BYTES:
        raise UsageError(f"{where}: its header declares shape {shape} {dtype} "
                         f"({nbytes / 2**30:.1f} GiB), over the limit of "
                         f"{MAX_INPUT_BYTES >> 30} GiB")
    if nbytes > held:
        raise UsageError(f"{where}: its header declares shape {shape} {dtype} ({nbytes:,} "
                         f"bytes) but the file holds {held:,}; it is truncated or damaged")
    return nbytes


def read_npz(path: str | os.PathLike, names: tuple[str, ...] | None = None
             ) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (``names`` only, if given); every header is checked first
    (declared bytes held by the file, at most :data:`MAX_INPUT_BYTES` in all)."""
    path = Path(path)
    arrays = {}
    with _open_zip(path) as archive:
        infos = archive.infolist()
        headers = [_member_header(archive, info, path) for info in infos]
        total = sum(_check_member(path, *header) for header in headers)
        if total > MAX_INPUT_BYTES:
            raise UsageError(f"{path}: its arrays declare {total / 2**30:.1f} GiB, over the "
                             f"limit of {MAX_INPUT_BYTES >> 30} GiB")
        for info, (name, *_) in zip(infos, headers, strict=True):
            if names is not None and name not in names:
                continue
            try:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
                raise UsageError(f"{path}: array {name!r} is unreadable "
                                 f"({one_line(err)})") from None
    return arrays


def _images_of_npz(path: Path) -> np.ndarray:
    headers = npz_shapes(path)
    if "images" not in headers:
        raise UsageError(f"{path}: no 'images' array (it holds {sorted(headers)})")
    shape, _ = headers["images"]
    if len(shape) in (3, 4):
        _check_pixels(shape[1], shape[2], f"{path}: 'images'")
        _check_total(shape[0], shape[1], shape[2], f"{path}: 'images'")
    return to_rgb8(read_npz(path, ("images",))["images"], f"{path}: 'images'")


# --------------------------------------------------------------------------- image files


def _image_size(file: Path) -> tuple[int, int]:
    """``(height, width)`` from an image file's header (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"{file}: the image is over the limit of {MAX_IMAGE_PIXELS:,} "
                         "pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"{file}: not a readable image ({one_line(err)})") from None
    _check_pixels(height, width, str(file))
    return height, width


def decode_image(file: Path) -> np.ndarray:
    """One image file as uint8 RGB ``(H, W, 3)``; its size is checked from the header first."""
    from PIL import Image, UnidentifiedImageError

    _image_size(file)
    try:
        with Image.open(file) as image:
            if image.mode in _SIXTEEN_BIT_MODES:
                values = np.asarray(image)
                if values.size and (values.min() < 0 or values.max() > 65535):
                    raise UsageError(f"{file}: {image.mode} pixel values outside 0..65535")
                return to_rgb8(values.astype(np.uint16)[None], str(file))[0]
            if image.mode == "F":
                raise UsageError(f"{file}: floating-point images are not read; save it as an "
                                 "8- or 16-bit PNG")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{file}: not a readable image ({one_line(err)})") from None


def _images_of_files(files: list[Path], where: Path) -> np.ndarray:
    sizes = {file: _image_size(file) for file in files}  # every header before any decode
    distinct = sorted(set(sizes.values()))
    if len(distinct) > 1:
        raise UsageError(f"{where}: the images have different sizes (height, width) "
                         f"{distinct[:4]}; resize them to the net's input size first")
    height, width = distinct[0]
    _check_total(len(files), height, width, str(where))
    return np.stack([decode_image(file) for file in files])


def read_images(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB images ``(N, H, W, 3)``, N >= 1, from a folder of PNG/JPEG files, one such
    file, or an ``.npz`` with ``images`` (see the module docstring for formats and limits)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in the folder "
                             "(0 images)")
        return _images_of_files(files, path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        return _images_of_files([path], path)
    return _images_of_npz(path)


def num_classes(module) -> int:
    """The labels a task module tells apart: 2 for one sigmoid output, else its outputs."""
    return max(2, int(module.num_output_channels()))


def read_samples(path: str | os.PathLike, task, classes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels or masks)`` for ``task`` from a samples ``.npz``.

    Args:
      classes: if given, every label (or mask value) must be an integer in
        ``0 .. classes - 1`` (the task module's classes).
    """
    path = Path(path)
    images = _images_of_npz(path)
    field = task.target_field
    headers = npz_shapes(path)
    if field not in headers:
        raise UsageError(f"{path}: a {task.name} sample file needs a '{field}' array "
                         f"(it holds {sorted(headers)})")
    targets = read_npz(path, (field,))[field]
    expected = images.shape[:3] if field == "masks" else images.shape[:1]
    if targets.shape != expected:
        raise UsageError(f"{path}: '{field}' has shape {targets.shape}, expected {expected} "
                         f"({len(images)} images)")
    if not (np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_):
        raise UsageError(f"{path}: '{field}' must be integers, got {targets.dtype}")
    if classes is not None and targets.size:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise UsageError(f"{path}: '{field}' holds values {low}..{high}; the task module "
                             f"tells {classes} classes apart (0..{classes - 1})")
    return images, targets
