"""Reading the animal-mnist files: pinned checksums, a numpy-only unpickler, install errors."""

import gzip
import hashlib
import importlib.resources
import os
import pickle
import shutil

import numpy as np
import pytest

from nettransplant import data
from nettransplant.data import animal_mnist


def test_the_installed_files_load_with_the_documented_shapes():
    images, labels = data.load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(data.CATEGORIES) == 10
    assert set(data.MAMMALS) | set(data.DISSIMILAR) == set(data.CATEGORIES)


def _copy_data_files(folder):
    source = animal_mnist._package_dir()
    for name, _ in animal_mnist.DATA_FILES.values():
        shutil.copy(source / name, folder / name)
    return folder


def test_wrong_checksum_fails_naming_the_file(tmp_path):
    folder = _copy_data_files(tmp_path)
    path = folder / animal_mnist.DATA_FILES["labels"][0]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(data.DataFileError, match="animal_label_version_3.gz.*SHA-256"):
        data.load_animal_mnist(folder)


def test_a_missing_file_fails_naming_it_and_the_install_command(tmp_path):
    folder = _copy_data_files(tmp_path)
    (folder / animal_mnist.DATA_FILES["images"][0]).unlink()
    with pytest.raises(data.DataFileError, match="animal_data_version_3.gz.*--no-deps"):
        data.load_animal_mnist(folder)


def test_a_missing_package_gives_the_exact_install_command(monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    with pytest.raises(data.DataFileError) as error:
        data.load_animal_mnist()
    assert "pip install --no-deps animal-mnist==0.4" in str(error.value)


class _CallsOsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_CallsOsSystem, _OpensAFile])
def test_a_data_file_holding_code_fails_naming_the_file_and_nothing_runs(
        tmp_path, monkeypatch, payload):
    marker = tmp_path / "executed"
    name = animal_mnist.DATA_FILES["images"][0]
    raw = gzip.compress(pickle.dumps(payload(marker)))
    (tmp_path / name).write_bytes(raw)
    # Even with a matching checksum the unpickler refuses anything but arrays.
    files = dict(animal_mnist.DATA_FILES)
    files["images"] = (name, hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(animal_mnist, "DATA_FILES", files)
    with pytest.raises(data.DataFileError, match=f"{name}.*only numpy arrays"):
        data.load_animal_mnist(tmp_path)
    assert not marker.exists()


def test_only_plain_numeric_arrays_come_out_of_a_pickle():
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    np.testing.assert_array_equal(
        animal_mnist.load_numpy_pickle(gzip.compress(pickle.dumps(array)), "ok.gz"), array)
    with pytest.raises(data.DataFileError, match="labels.gz"):
        animal_mnist.load_numpy_pickle(pickle.dumps({"a": 1}), "labels.gz")
    with pytest.raises(data.DataFileError, match="objects.gz"):
        animal_mnist.load_numpy_pickle(pickle.dumps(np.array([1, "x"], object)), "objects.gz")
    with pytest.raises(data.DataFileError, match="bad.gz.*not a readable"):
        animal_mnist.load_numpy_pickle(b"\x80\x04garbage", "bad.gz")
