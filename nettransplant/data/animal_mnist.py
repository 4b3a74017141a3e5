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
import zlib
from pathlib import Path

import numpy as np

CATEGORIES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
              "zebra")
MAMMALS = ("cat", "cow", "dog", "horse", "sheep")  # the paper's five mammals
DISSIMILAR = ("bear", "bird", "elephant", "giraffe", "zebra")

INSTALL_COMMAND = "pip install --no-deps animal-mnist==0.4"
# pip skips an installed package with damaged files unless told to reinstall it.
REINSTALL_COMMAND = f"{INSTALL_COMMAND} --force-reinstall"
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


def _fix_hint() -> str:
    """How to replace a damaged file: reinstalling the package rewrites its data files."""
    return f"reinstall with {REINSTALL_COMMAND} (or restore the animal-mnist 0.4 file)"


def _one_line(text: object) -> str:
    """``str(text)`` with its lines joined, so that an error message stays on one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        # Every global a pickle names passes through here before it can be
        # called, so refusing all but numpy's array reconstruction means the
        # file cannot run code.
        if (module, name) not in _ALLOWED_GLOBALS:
            # repr: a crafted pickle can put line breaks into the names.
            raise DataFileError(
                f"{self._source} refers to {f'{module}.{name}'!r}; only numpy arrays are "
                f"allowed, nothing was executed; {_fix_hint()}")
        return super().find_class(module, name)


def load_numpy_pickle(raw: bytes, source: str) -> np.ndarray:
    """Unpickle gzip'd (or plain) bytes that must hold exactly one numpy array.

    Args:
      raw: the file's bytes.
      source: names the file in error messages.
    Returns:
      The array (numeric dtype).
    Raises:
      DataFileError: a corrupt or truncated gzip stream or pickle, a global
        other than numpy's array reconstruction (refused before anything runs),
        or something other than one numeric array; one line naming ``source``.
    """
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataFileError(
            f"{source} is not a readable gzip file ({_one_line(err) or type(err).__name__}); "
            f"{_fix_hint()}") from err
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataFileError:
        raise
    except Exception as err:  # a truncated or corrupt stream
        raise DataFileError(
            f"{source} is not a readable numpy pickle ({type(err).__name__}: "
            f"{_one_line(err)}); {_fix_hint()}") from err
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise DataFileError(f"{source} holds {type(value).__name__}, not a numeric numpy array; "
                            f"{_fix_hint()}")
    return value


def _package_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("animal_mnist"))) / "data" / "Animal_MNIST"
    except ModuleNotFoundError as err:
        raise DataFileError(
            f"the embedded dataset needs the animal-mnist package: {INSTALL_COMMAND}") from err


def read_verified(path: Path, sha256: str) -> bytes:
    """File bytes, after checking their SHA-256.

    Raises:
      DataFileError: the file is missing, unreadable or has another SHA-256
        (then nothing of it is unpickled); one line with the reinstall command.
    """
    if not path.is_file():
        raise DataFileError(f"data file {path} is missing; reinstall with {REINSTALL_COMMAND}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"data file {path} cannot be read ({_one_line(err)}); "
                            f"{_fix_hint()}") from err
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DataFileError(
            f"data file {path} has SHA-256 {digest}, expected {sha256}; it was not read "
            f"(damaged or replaced): reinstall with {REINSTALL_COMMAND}")
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
        raise DataFileError(f"unexpected shapes {images.shape} / {labels.shape} in {folder} "
                            f"(expected (10000, 28, 28) / (10000,)); reinstall with "
                            f"{REINSTALL_COMMAND}")
    return images.astype(np.uint8), labels.astype(np.int64)
