"""The embedded animal-silhouette benchmark: offline build, determinism, safety, task views."""

import gzip
import json
import pickle
import shutil
import socket

import numpy as np
import pytest

from launch import data_report
from nettransplant import data
from nettransplant.data import animal_mnist, composite, pipeline, silhouettes

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    original_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("the embedded dataset must build without network access")

    socket.socket.connect = no_network
    try:
        return data.load_silhouettes(IMAGE_SIZE, 0, str(data_dir))
    finally:
        socket.socket.connect = original_connect


def test_builder_builds_offline_with_documented_shapes_dtypes_and_balance(splits):
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (8000, 2000)
    assert train.images.shape == (8000, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert train.images.dtype == np.uint8
    assert train.masks.shape == (8000, IMAGE_SIZE, IMAGE_SIZE) and train.masks.dtype == np.uint8
    assert set(np.unique(train.masks)) == {0, 1}
    assert np.bincount(train.labels).tolist() == [800] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert not set(train.index) & set(test.index)
    # Objects cover a substantial share of the image, as VOC objects do.
    assert 0.2 < train.masks.mean() < 0.5


def test_same_seed_gives_identical_bytes_and_another_seed_differs(splits):
    images, _ = data.load_animal_mnist()
    train = splits["train"]
    for row in (0, 1234, 7999):
        i = int(train.index[row])
        image, mask = composite.composite(images[i], IMAGE_SIZE, np.random.default_rng([0, i]))
        assert image.tobytes() == train.images[row].tobytes()
        assert mask.tobytes() == train.masks[row].tobytes()
        other, _ = composite.composite(images[i], IMAGE_SIZE, np.random.default_rng([1, i]))
        assert other.tobytes() != image.tobytes()


def test_split_is_fixed_and_independent_of_the_compositing_seed():
    _, labels = data.load_animal_mnist()
    a, b = silhouettes.split_indices(labels), silhouettes.split_indices(labels)
    np.testing.assert_array_equal(a["train"], b["train"])
    assert len(np.intersect1d(a["train"], a["test"])) == 0


def test_threshold_baseline_is_at_most_75_percent_pixel_accuracy(splits):
    train, test = splits["train"], splits["test"]
    baseline = data_report.threshold_baseline(train.images, train.masks, test.images, test.masks)
    assert baseline["test_acc"] <= 0.75
    assert baseline["upper_bound"] <= 0.75
    assert 1 - test.masks.mean() <= 0.80  # the majority baseline is informative


def test_threshold_search_finds_a_perfect_rule_when_one_exists():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (4, 8, 8)).astype(np.uint8)
    images = np.where(masks[..., None] == 1, 200, 30).astype(np.uint8).repeat(3, axis=-1)
    baseline = data_report.threshold_baseline(images, masks, images, masks)
    assert baseline["test_acc"] == 1.0


def _copy_data_files(tmp_path):
    source = animal_mnist._package_dir()
    for name, _ in animal_mnist.DATA_FILES.values():
        shutil.copy(source / name, tmp_path / name)
    return tmp_path


def test_wrong_checksum_fails_naming_the_file(tmp_path):
    folder = _copy_data_files(tmp_path)
    path = folder / animal_mnist.DATA_FILES["labels"][0]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(data.DataFileError, match="animal_label_version_3.gz"):
        data.load_animal_mnist(folder)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_nothing_is_executed(tmp_path):
    marker = tmp_path / "executed"
    raw = gzip.compress(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(data.DataFileError, match="evil.gz.*only numpy arrays"):
        animal_mnist.load_numpy_pickle(raw, "evil.gz")
    assert not marker.exists()


def test_a_data_file_holding_code_fails_naming_the_file_even_with_a_matching_checksum(
        tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    name = animal_mnist.DATA_FILES["images"][0]
    raw = gzip.compress(pickle.dumps(_RunsCode(marker)))
    (tmp_path / name).write_bytes(raw)
    import hashlib
    files = dict(animal_mnist.DATA_FILES)
    files["images"] = (name, hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(animal_mnist, "DATA_FILES", files)
    with pytest.raises(data.DataFileError, match=name):
        data.load_animal_mnist(tmp_path)
    assert not marker.exists()


def test_pickle_of_something_other_than_an_array_is_refused():
    with pytest.raises(data.DataFileError, match="labels.gz"):
        animal_mnist.load_numpy_pickle(pickle.dumps({"a": 1}), "labels.gz")
    with pytest.raises(data.DataFileError, match="not a readable"):
        animal_mnist.load_numpy_pickle(b"\x80\x04garbage", "bad.gz")


@pytest.mark.parametrize("category", ["cat", "dog"])
def test_binary_view_is_category_vs_random_images_and_balanced(splits, category):
    view = data.binary_classification(splits["test"], [category], seed=3)
    assert len(view) == 400 and view.labels.sum() == 200
    cid = data.CATEGORIES.index(category)
    assert np.all(view.categories[view.labels == 1] == cid)
    assert np.all(view.categories[view.labels == 0] != cid)
    again = data.binary_classification(splits["test"], [category], seed=3)
    np.testing.assert_array_equal(view.index, again.index)


def test_generic_view_takes_several_positive_categories_and_chosen_negatives(splits):
    view = data.binary_classification(splits["train"], ["cow", "horse", "bear"],
                                      negatives=["zebra", "giraffe", "bird"], seed=0)
    assert len(view) == 4800 and view.labels.mean() == 0.5
    with pytest.raises(ValueError, match="both positive and negative"):
        data.binary_classification(splits["train"], ["cow"], negatives=["cow"])
    with pytest.raises(ValueError, match="unknown categories.*'lion'"):
        data.binary_classification(splits["train"], ["lion"])


def test_few_shot_sets_are_exact_balanced_nested_seeded_and_disjoint_from_test(splits):
    train_view = data.binary_classification(splits["train"], ["sheep"], seed=0)
    previous = set()
    for n in data.SAMPLE_COUNTS:
        subset = data.few_shot(train_view, n, seed=5)
        assert len(subset) == n
        assert subset.labels.sum() == n // 2
        rows = set(subset.index.tolist())
        assert previous <= rows  # nested
        previous = rows
        assert not rows & set(splits["test"].index.tolist())
    a = data.few_shot(train_view, 20, seed=5)
    b = data.few_shot(train_view, 20, seed=6)
    assert set(a.index) != set(b.index)
    with pytest.raises(ValueError, match="num_samples"):
        data.few_shot(train_view, 10**6)


def test_segmentation_view_and_unlabelled_images(splits):
    view = data.segmentation(splits["train"], ["horse"])
    assert len(view) == 800
    assert np.all(view.categories == data.CATEGORIES.index("horse"))
    assert view.masks.shape == (800, IMAGE_SIZE, IMAGE_SIZE)
    images = data.unlabelled_images(splits["train"], ["dog"], 64, seed=0)
    assert images.shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3)
    normalised = data.normalize_images(images)
    assert normalised.dtype == np.float32 and abs(float(normalised.mean())) < 2


def test_pipeline_order_is_deterministic_padded_and_prefetched_batches_match():
    arrays = {"x": np.arange(10)[:, None].astype(np.float32), "y": np.arange(10)}
    plain = list(pipeline.iterate_batches(arrays, 4, seed=1, prefetch=0))
    prefetched = list(pipeline.iterate_batches(arrays, 4, seed=1, prefetch=2))
    assert len(plain) == 3
    for a, b in zip(plain, prefetched, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert plain[-1]["valid"].tolist() == [1, 1, 0, 0]
    seen = np.concatenate([b["y"][b["valid"] == 1] for b in plain])
    assert sorted(seen.tolist()) == list(range(10))
    other = list(pipeline.iterate_batches(arrays, 4, seed=2, prefetch=0))
    assert not np.array_equal(plain[0]["y"], other[0]["y"])
    with pytest.raises(ValueError, match="multiple of the device count 3"):
        next(pipeline.iterate_batches(arrays, 4, device_count=3))
    with pytest.raises(ValueError, match="leading size"):
        next(pipeline.iterate_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))


def test_data_report_writes_json_and_grids(splits, tmp_path, monkeypatch):
    monkeypatch.setattr(data_report, "load_silhouettes", lambda *a, **k: splits)
    out = tmp_path / "report"
    report = data_report.main(["--json", str(tmp_path / "r.json"), "--out", str(out)])
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["threshold_baseline_pixel_acc"] == pytest.approx(
        report["threshold_baseline_pixel_acc"])
    assert stored["threshold_baseline_pixel_acc"] <= 75
    assert stored["majority_baseline_pixel_acc"] < 80
    assert (out / "examples_test.png").stat().st_size > 1000
