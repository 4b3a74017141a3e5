"""The embedded animal-silhouette benchmark: offline build, determinism, baselines, report."""

import json
import socket

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from nettransplant import data
from nettransplant.commands import data_report
from nettransplant.data import baselines, composite, silhouettes

IMAGE_SIZE = 32


def _build_offline(data_dir):
    original_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("the embedded dataset must build without network access")

    socket.socket.connect = no_network
    try:
        return data.build_silhouettes(IMAGE_SIZE, 0, data_dir)
    finally:
        socket.socket.connect = original_connect


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    _build_offline(path)
    return path


@pytest.fixture(scope="module")
def splits(data_dir):
    return data.load_silhouettes(IMAGE_SIZE, 0, data_dir)


def test_builder_builds_offline_with_documented_shapes_dtypes_and_balance(splits):
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (8000, 2000)
    for split in (train, test):
        n = len(split)
        assert split.images.shape == (n, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert split.images.dtype == np.uint8
        assert split.masks.shape == (n, IMAGE_SIZE, IMAGE_SIZE) and split.masks.dtype == np.uint8
        assert set(np.unique(split.masks)) == {0, 1}
        assert split.labels.dtype == np.int64
        np.testing.assert_array_equal(split.labels, split.categories)
        assert np.all(np.diff(split.index) > 0)  # ordered by source index
    assert np.bincount(train.labels).tolist() == [800] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert not set(train.index) & set(test.index)
    # Objects cover a substantial share of the image, as VOC objects do.
    assert 0.25 < train.masks.mean() < 0.45
    coverage = test.masks.mean(axis=(1, 2))
    assert np.all(coverage > 0.02)  # every image holds its animal


def test_loaded_arrays_are_shared_read_only(splits):
    with pytest.raises(ValueError, match="read-only"):
        splits["train"].images[0, 0, 0, 0] = 1


def test_same_seed_rebuilds_identical_bytes(tmp_path, data_dir, splits):
    again = _build_offline(tmp_path)
    first = sorted((data_dir / "animal_silhouettes").rglob("*.array_record*"))
    second = sorted((tmp_path / "animal_silhouettes").rglob("*.array_record*"))
    assert [p.name for p in first] == [p.name for p in second] and first
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    source = again.as_data_source()["test"]
    for row in (0, 777, 1999):
        example = source[row]
        assert example["image"].tobytes() == splits["test"].images[row].tobytes()
        assert example["mask"].tobytes() == splits["test"].masks[row].tobytes()


def test_examples_are_a_function_of_silhouette_size_and_seed(splits):
    images, labels = data.load_animal_mnist()
    train = splits["train"]
    for row in (0, 1234, 7999):
        i = int(train.index[row])
        image, mask = composite.composite(images[i], IMAGE_SIZE, [0, i],
                                          data.CATEGORIES[labels[i]])
        assert image.tobytes() == train.images[row].tobytes()
        assert mask.tobytes() == train.masks[row].tobytes()
        other, _ = composite.composite(images[i], IMAGE_SIZE, [1, i])
        assert other.tobytes() != image.tobytes()


@pytest.mark.parametrize("size", [64, 224])
def test_compositing_works_at_larger_sizes_and_rows_do_not_depend_on_the_batch(size):
    images, _ = data.load_animal_mnist()
    supports = composite.silhouette_supports(images[::1000])  # one per class
    seeds = [[0, i] for i in range(len(supports))]
    batch_images, batch_masks = composite.composite_batch(supports, size, seeds)
    assert batch_images.shape == (10, size, size, 3) and batch_images.dtype == np.uint8
    assert batch_masks.shape == (10, size, size) and set(np.unique(batch_masks)) == {0, 1}
    assert 0.1 < batch_masks.mean() < 0.6
    alone_image, alone_mask = composite.composite_batch(supports[3:4], size, seeds[3:4])
    assert alone_image[0].tobytes() == batch_images[3].tobytes()
    assert alone_mask[0].tobytes() == batch_masks[3].tobytes()


def test_rerender_composites_the_same_silhouettes_in_fresh_scenes(splits):
    view = splits["train"].take(np.arange(0, 8000, 500))
    same = data.rerender(view, 0)  # the dataset's own compositing seed
    np.testing.assert_array_equal(same.images, view.images)
    np.testing.assert_array_equal(same.masks, view.masks)
    fresh = data.rerender(view, 5)
    np.testing.assert_array_equal(fresh.index, view.index)
    np.testing.assert_array_equal(fresh.labels, view.labels)
    assert not np.array_equal(fresh.images, view.images)
    np.testing.assert_array_equal(fresh.images, data.rerender(view, 5).images)
    with pytest.raises(ValueError, match="seed"):
        data.rerender(view, -1)


def test_contours_are_dark_on_the_animal_and_on_the_clutter():
    images, _ = data.load_animal_mnist()
    supports = composite.silhouette_supports(images[::500])
    rendered, masks = composite.composite_batch(supports, 32, [[0, i] for i in range(20)])
    luminance = rendered.astype(np.float32).mean(-1)
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, within an image
    objects = masks.astype(bool)
    interior = ndimage.binary_erosion(np.pad(objects, ((0, 0), (1, 1), (1, 1))), cross)
    border = objects & ~interior[:, 1:-1, 1:-1]
    assert luminance[border].mean() < composite.OUTLINE_LEVEL + 2 * composite.NOISE_STD
    dark_outside = (luminance < 30) & ~masks.astype(bool)
    assert dark_outside.sum() > 0.5 * border.sum()  # clutter edges are drawn as well


def test_masks_cover_the_whole_animal_including_a_zebras_dark_stripes():
    images, labels = data.load_animal_mnist()
    zebras = images[labels == data.CATEGORIES.index("zebra")][:50]
    supports = composite.silhouette_supports(zebras)
    bright = zebras > 127
    assert supports[bright].all()
    assert supports.sum() > 1.1 * bright.sum()  # stripes and holes are filled in


def test_builder_config_rejects_bad_sizes_and_seeds():
    with pytest.raises(ValueError, match="image_size"):
        silhouettes.AnimalSilhouettesConfig(image_size=8)
    with pytest.raises(ValueError, match="seed"):
        silhouettes.AnimalSilhouettesConfig(image_size=32, seed=-1)
    with pytest.raises(ValueError, match="2-D"):
        composite.composite(np.zeros((2, 28, 28), np.uint8), 32, 0)


def test_background_scenes_hold_no_object_and_are_seeded():
    scenes = data.background_scenes(4, 32, seed=3)
    assert scenes.shape == (4, 32, 32, 3) and scenes.dtype == np.uint8
    np.testing.assert_array_equal(scenes, data.background_scenes(4, 32, seed=3))
    assert not np.array_equal(scenes, data.background_scenes(4, 32, seed=4))


def test_threshold_baseline_is_at_most_75_percent_pixel_accuracy(splits):
    train, test = splits["train"], splits["test"]
    baseline = data.threshold_baseline(train.images, train.masks, test.images, test.masks)
    assert baseline["test_acc"] <= 0.70
    assert baseline["upper_bound"] <= 0.70
    # The majority baseline is informative, and no threshold beats it by much.
    majority = data.majority_baseline(test.masks)
    assert majority <= 0.75
    assert baseline["upper_bound"] - majority < 0.02


def test_threshold_search_finds_a_perfect_rule_when_one_exists():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (4, 8, 8)).astype(np.uint8)
    images = np.where(masks[..., None] == 1, 30, 200).astype(np.uint8).repeat(3, axis=-1)
    baseline = data.threshold_baseline(images, masks, images, masks)
    assert baseline["test_acc"] == 1.0
    assert baseline["rule"]["object"] == "at or below"
    assert 30 <= baseline["rule"]["threshold"] < 200
    ignored = masks.copy()
    ignored[:, 0] = 255  # skipped pixels
    assert data.majority_baseline(ignored) == pytest.approx(
        float((masks[:, 1:] == 0).mean()))


def test_the_stride_8_oracle_keeps_block_masks_and_loses_detail_below_the_block():
    blocks = np.kron(np.random.default_rng(0).integers(0, 2, (3, 4, 4)),
                     np.ones((8, 8))).astype(np.uint8)  # (3, 32, 32), constant 8×8 blocks
    inside = np.zeros((1, 32, 32), np.uint8)
    inside[:, 4:28, 4:28] = 1  # a 24×24 square, its edges inside blocks
    assert baselines.coarse_mask_oracle(inside, 1) == 1.0
    assert baselines.coarse_mask_oracle(inside, 8) < 1.0
    lines = np.zeros((2, 32, 32), np.uint8)
    lines[:, :, ::2] = 1  # 1-pixel stripes vanish at 1/8 resolution
    assert baselines.coarse_mask_oracle(lines, 8) == pytest.approx(0.5)
    assert baselines.coarse_mask_oracle(blocks, 8) >= 0.9  # only block borders blur
    with pytest.raises(ValueError, match="do not divide by stride 5"):
        baselines.coarse_mask_oracle(blocks, 5)


def test_data_report_writes_json_and_grids(data_dir, tmp_path):
    out = tmp_path / "report"
    report = data_report.run(data_report.parse(["--json", str(tmp_path / "r.json"), "--out",
                                                str(out), "--data_dir", str(data_dir)]))
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["threshold_baseline_pixel_acc"] == pytest.approx(
        report["threshold_baseline_pixel_acc"])
    assert stored["threshold_baseline_pixel_acc"] <= 75
    assert stored["threshold_upper_bound_pixel_acc"] >= stored["threshold_baseline_pixel_acc"]
    assert stored["majority_baseline_pixel_acc"] <= 80
    assert 80 <= stored["stride8_oracle_pixel_acc"] <= 95
    assert stored["splits"]["test"]["per_category"] == {c: 200 for c in data.CATEGORIES}
    assert stored["splits"]["train"]["class_balance_pct"]["cat"] == pytest.approx(10.0)
    for name in ("train", "test"):
        grid = out / f"examples_{name}.png"
        assert str(grid) in stored["grids"]
        with Image.open(grid) as image:
            assert image.size[0] > 500 and image.size[1] > 500


@pytest.mark.parametrize("category", ["cat", "dog"])
def test_binary_test_view_is_the_category_vs_random_other_images_and_balanced(splits, category):
    view = data.binary_classification(splits["test"], category, seed=3)
    assert len(view) == 400 and view.labels.sum() == 200
    cid = data.CATEGORIES.index(category)
    assert np.all(view.categories[view.labels == 1] == cid)
    assert np.all(view.categories[view.labels == 0] != cid)
    assert len(np.unique(view.categories[view.labels == 0])) == 9  # random other categories


def test_few_shot_training_sets_are_nested_balanced_and_disjoint_from_the_test_set(splits):
    train_view = data.binary_classification(splits["train"], ["sheep"], seed=0)
    test_view = data.binary_classification(splits["test"], ["sheep"], seed=0)
    seen = set()
    for n in data.SAMPLE_COUNTS:
        shots = data.few_shot(train_view, n, seed=5)
        assert len(shots) == n and shots.labels.sum() == n // 2
        rows = set(shots.index.tolist())
        assert seen <= rows
        seen = rows
        assert not rows & set(test_view.index.tolist())
        assert not rows & set(splits["test"].index.tolist())


def test_every_category_wears_its_coat_and_a_decoy_wears_it_too():
    """The object's texture has its category's orientation; the top clutter ellipse
    (the decoy) wears the same texture (kind, period, angle and colours)."""
    rng = np.random.default_rng(0)
    for category, (kind, period, degrees) in composite.COATS.items():
        uniforms = rng.random(composite.NUM_UNIFORMS)
        composite._dress(uniforms, category)
        table = composite._texture_table(uniforms[None], 32)
        obj = composite._OBJECT
        assert table[composite._KIND, 0, obj] == kind, category
        if kind == composite.STRIPES:
            k = np.hypot(table[composite._KY0, 0, obj], table[composite._KX0, 0, obj])
            np.testing.assert_allclose(2 * np.pi / k, period, rtol=1e-5)
            angle = np.degrees(np.arctan2(table[composite._KY0, 0, obj],
                                          table[composite._KX0, 0, obj])) % 180
            np.testing.assert_allclose(angle, degrees, atol=1e-3)
        ellipses = composite._ellipses(uniforms[None], 32)
        used = np.flatnonzero(ellipses[0, 0] > -1e5) + 1  # region ids of drawn ellipses
        decoy = used.max()
        same = [p for p in range(composite._NUM_PLANES)
                if p not in (composite._PHASE0, composite._PHASE1)]
        np.testing.assert_array_equal(table[same, 0, decoy], table[same, 0, obj])
    with pytest.raises(ValueError, match="unknown coat 'unicorn'"):
        composite._dress(rng.random(composite.NUM_UNIFORMS), "unicorn")
    # Object-free scenes stay random: no coat is forced on any region.
    assert composite.sample_scene(None, 32, np.random.default_rng(1)).uniforms.shape == (
        1, composite.NUM_UNIFORMS)
