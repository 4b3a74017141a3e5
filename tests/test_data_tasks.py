"""Task views of a split: category vs random images, segmentation, few-shot and unlabelled sets."""

import numpy as np
import pytest

from nettransplant import data

PER_CATEGORY = 30


@pytest.fixture(scope="module")
def split():
    """A small fabricated split: PER_CATEGORY images of each category, pixel value = row."""
    n = PER_CATEGORY * len(data.CATEGORIES)
    categories = np.repeat(np.arange(len(data.CATEGORIES)), PER_CATEGORY)
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None],
                             (n, 4, 4, 3)).copy()
    masks = np.zeros((n, 4, 4), np.uint8)
    masks[:, 1:3, 1:3] = 1
    return data.ImageSet(images, categories.copy(), masks, categories,
                         np.arange(1000, 1000 + n))


def test_binary_view_is_category_vs_as_many_random_images_of_the_others(split):
    view = data.binary_classification(split, "cat", seed=1)
    cat = data.CATEGORIES.index("cat")
    assert len(view) == 2 * PER_CATEGORY and view.labels.sum() == PER_CATEGORY
    assert np.all(view.categories[view.labels == 1] == cat)
    assert np.all(view.categories[view.labels == 0] != cat)
    assert len(set(view.index.tolist())) == len(view)
    again = data.binary_classification(split, ["cat"], seed=1)
    np.testing.assert_array_equal(view.index, again.index)
    other = data.binary_classification(split, ["cat"], seed=2)
    assert set(other.index[other.labels == 0]) != set(view.index[view.labels == 0])


def test_generic_view_takes_several_positive_categories_and_chosen_negatives(split):
    view = data.binary_classification(split, ["cow", "horse", "bear"],
                                      negatives=["zebra", "giraffe", "bird"], seed=0)
    assert len(view) == 6 * PER_CATEGORY and view.labels.mean() == 0.5
    negatives = {data.CATEGORIES[c] for c in view.categories[view.labels == 0]}
    assert negatives <= {"zebra", "giraffe", "bird"}
    with pytest.raises(ValueError, match="both positive and negative"):
        data.binary_classification(split, ["cow"], negatives=["cow"])
    with pytest.raises(ValueError, match="unknown categories.*'lion'"):
        data.binary_classification(split, ["lion"])
    with pytest.raises(ValueError, match="negative images"):
        data.binary_classification(split, list(data.CATEGORIES[:9]))


def test_leave_one_out_positive_set_is_the_union_of_the_training_categories(split):
    names = data.leave_one_out_categories("dog")
    assert "dog" not in names and len(names) == 9
    assert set(names) == (set(data.MAMMALS) - {"dog"}) | set(data.DISSIMILAR)
    positives = data.positive_set(split, names, seed=0)
    assert len(positives) == 9 * PER_CATEGORY and np.all(positives.labels == 1)
    assert data.CATEGORIES.index("dog") not in positives.categories
    small = data.positive_set(split, names, num_images=20, seed=0)
    np.testing.assert_array_equal(small.index, positives.index[:20])
    with pytest.raises(ValueError, match="mammals"):
        data.leave_one_out_categories("zebra")


@pytest.mark.parametrize("seed", [0, 7])
def test_few_shot_sets_are_exact_balanced_nested_and_seeded(split, seed):
    view = data.binary_classification(split, ["sheep"], seed=0)
    previous = set()
    for n in data.SAMPLE_COUNTS[:-1] + (2 * PER_CATEGORY,):
        subset = data.few_shot(view, n, seed=seed)
        assert len(subset) == n
        assert subset.labels.sum() == n // 2  # balanced
        assert subset.images.shape == (n, 4, 4, 3)
        rows = set(subset.index.tolist())
        assert len(rows) == n and previous <= rows  # nested
        previous = rows
    a = data.few_shot(view, 20, seed=seed)
    np.testing.assert_array_equal(a.index, data.few_shot(view, 20, seed=seed).index)
    assert set(a.index) != set(data.few_shot(view, 20, seed=seed + 1).index)
    with pytest.raises(ValueError, match="num_samples"):
        data.few_shot(view, 10**6)
    lopsided = view.take(np.concatenate([np.flatnonzero(view.labels == 1)[:5],
                                         np.flatnonzero(view.labels == 0)]))
    with pytest.raises(ValueError, match="need 10 positives and 10 negatives"):
        data.few_shot(lopsided, 20)


def test_segmentation_view_and_its_few_shot_sets(split):
    view = data.segmentation(split, "horse", seed=0)
    assert len(view) == PER_CATEGORY and np.all(view.labels == 1)
    assert np.all(view.categories == data.CATEGORIES.index("horse"))
    assert view.masks.shape == (PER_CATEGORY, 4, 4)
    ten, twenty = data.few_shot(view, 10, seed=1), data.few_shot(view, 20, seed=1)
    assert set(ten.index) <= set(twenty.index) and len(twenty) == 20
    empty = data.few_shot(view, 0)
    assert empty.images.shape == (0, 4, 4, 3) and empty.masks.shape == (0, 4, 4)


def test_unlabelled_images_come_from_the_given_categories_and_nest(split):
    images = data.unlabelled_images(split, ["dog", "cat"], 12, seed=0)
    assert images.shape == (12, 4, 4, 3) and images.dtype == np.uint8
    rows = images[:, 0, 0, 0].astype(int)  # pixel value = row
    allowed = {data.CATEGORIES.index("dog"), data.CATEGORIES.index("cat")}
    assert {int(split.categories[r]) for r in rows} <= allowed
    np.testing.assert_array_equal(data.unlabelled_images(split, ["dog", "cat"], 5, seed=0),
                                  images[:5])
    with pytest.raises(ValueError, match="asked for 100"):
        data.unlabelled_images(split, ["dog"], 100)


def test_normalize_images_is_imagenet_mean_std_on_unit_rgb():
    images = np.array([[[[0, 128, 255]]]], np.uint8)
    out = data.normalize_images(images)
    expected = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225])
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        data.normalize_images(np.zeros((2, 4, 4), np.uint8))
