"""The ``animal-mnist`` 0.4 data files, read safely.

10 000 real 28×28 grayscale animal silhouettes, 1 000 per class. The package
ships them as gzip'd pickles; they are read with an unpickler that can build
numpy arrays and nothing else, after their SHA-256 is checked, so no code from
the files can run. Install the package without its declared dependencies
(which pull the full TensorFlow, pandas and scikit-learn)::

    pip install --no-deps animal-mnist==0.4
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import pickle
from pathlib import Path

import numpy as np

CATEGORIES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
              "zebra")
MAMMALS = ("cat", "cow", "dog", "horse", "sheep")  # the paper's five mammals
DISSIMILAR = ("bear", "bird", "elephant", "giraffe", "zebra")

INSTALL_COMMAND = "pip install --no-deps animal-mnist==0.4"
DATA_FILES = {
    "images": ("animal_data_version_3.gz",
               "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
    "labels": ("animal_label_version_3.gz",
               "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
}

# What a pickled numpy array needs, and nothing more.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class DataFileError(ValueError):
    """A data file is missing, has the wrong checksum or holds something unexpected."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataFileError(
                f"{self._source} refers to {module}.{name}; only numpy arrays are allowed, "
                "nothing was executed")
        return super().find_class(module, name)


def load_numpy_pickle(raw: bytes, source: str) -> np.ndarray:
    """Unpickle gzip'd (or plain) bytes that must hold exactly one numpy array."""
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataFileError:
        raise
    except Exception as err:  # a truncated or corrupt stream
        raise DataFileError(f"{source} is not a readable numpy pickle: {err}") from err
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise DataFileError(f"{source} holds {type(value).__name__}, not a numeric numpy array")
    return value


def _package_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("animal_mnist"))) / "data" / "Animal_MNIST"
    except ModuleNotFoundError as err:
        raise DataFileError(
            f"the embedded dataset needs the animal-mnist package: {INSTALL_COMMAND}") from err


def read_verified(path: Path, sha256: str) -> bytes:
    """File bytes, after checking their SHA-256."""
    if not path.is_file():
        raise DataFileError(f"data file {path} is missing; reinstall with {INSTALL_COMMAND}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DataFileError(
            f"data file {path} has SHA-256 {digest}, expected {sha256}; it was not read")
    return raw


def load_animal_mnist(directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The silhouettes and their labels.

    Args:
      directory: folder holding the two data files; default the installed package's.
    Returns:
      ``(images (10000, 28, 28) uint8, labels (10000,) int64)``, labels index
      :data:`CATEGORIES`.
    """
    folder = Path(directory) if directory is not None else _package_dir()
    arrays = {}
    for key, (name, sha256) in DATA_FILES.items():
        path = folder / name
        arrays[key] = load_numpy_pickle(read_verified(path, sha256), str(path))
    images, labels = arrays["images"], arrays["labels"]
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataFileError(f"unexpected shapes {images.shape} / {labels.shape} in {folder}")
    return images.astype(np.uint8), labels.astype(np.int64)
