"""Paper-scale loaders: TFDS voc/2012 and oxford_iiit_pet under mock data, VOC + SBD folders."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy.io import savemat

from nettransplant.data import paper_scale as P

NUM_MOCK_EXAMPLES = 12


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_vgg_geometry_matches_torchvision_resize_256_and_centre_crop_224():
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    mask = np.zeros((375, 500), np.uint8)
    mask[:, 250:] = 1
    out, out_mask = P.vgg_geometry(image, mask)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out_mask.shape == (224, 224)
    # Resize(256): 375×500 → 256×int(256·500/375) = 256×341; CenterCrop(224):
    # top = round(32 / 2) = 16, left = int(round(117 / 2)) = 58 (Python rounds half to even).
    expected = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected[16:240, 58:282])
    assert set(np.unique(out_mask)) == {0, 1}  # nearest-neighbour keeps labels
    column = np.flatnonzero(out_mask[0])[0]  # the mask edge moves with the image
    assert column == round(250 * 341 / 500) - 58
    with pytest.raises(ValueError, match="differ in size"):
        P.vgg_geometry(image, mask[:10])
    with pytest.raises(ValueError, match="must be >= size"):
        P.vgg_geometry(image, resize=200)


def test_vgg_geometry_can_resize_without_cropping_and_handles_portrait_images():
    image = np.zeros((500, 300, 3), np.uint8)
    image[:250] = 255
    out, _ = P.vgg_geometry(image, crop=False)
    assert out.shape == (224, 224, 3)
    assert out[:100].min() == 255 and out[130:].max() == 0  # no crop: top half stays half
    out, _ = P.vgg_geometry(image, size=32)  # 32 / 224 · 256 = 37 shorter side
    assert out.shape == (32, 32, 3)


def test_voc_classification_is_balanced_category_vs_random_images(mock_tfds):
    view = P.voc_classification("cat", "train", size=64, seed=0)
    assert view.images.shape[1:] == (64, 64, 3) and view.images.dtype == np.uint8
    assert view.masks is None
    assert len(view) > 0 and view.labels.sum() * 2 == len(view)
    cat = P.VOC_CATEGORIES.index("cat")
    assert np.all(view.categories[view.labels == 1] == cat)
    assert np.all(view.categories[view.labels == 0] == P.NOT_THE_CATEGORY)
    source = tfds.data_source("voc/2012", split="train")
    for row, label in zip(view.index, view.labels, strict=True):
        assert (cat in np.asarray(source[int(row)]["labels"]).tolist()) == bool(label)
    with pytest.raises(ValueError, match="no category 'lion'"):
        P.voc_classification("lion")


def test_voc_classification_of_several_categories_keeps_excluded_ones_out_of_negatives():
    wanted = [P.VOC_CATEGORIES.index(c) for c in ("cow", "dog")]
    person = P.VOC_CATEGORIES.index("person")
    with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
        view = P.voc_classification(["cow", "dog"], "train", size=32, exclude=["person"])
        source = tfds.data_source("voc/2012", split="train")
        assert len(view) > 0 and view.labels.sum() * 2 == len(view)
        for row, label, category in zip(view.index, view.labels, view.categories, strict=True):
            held = set(np.asarray(source[int(row)]["labels"]).tolist())
            if label:  # any wanted category; ``categories`` names the first one listed
                assert category == next(k for k in wanted if k in held)
            else:
                assert not held & {*wanted, person} and category == P.NOT_THE_CATEGORY


def test_pet_segmentation_gives_binary_masks_of_the_species(mock_tfds):
    view = P.pet_segmentation("dog", "train", size=48)
    assert view.images.shape[1:] == (48, 48, 3)
    assert view.masks.shape == (len(view), 48, 48)
    assert set(np.unique(view.masks)) <= {0, 1}
    assert np.all(view.labels == 1) and np.all(view.categories == P.PET_SPECIES.index("dog"))
    source = tfds.data_source("oxford_iiit_pet", split="train")
    assert all(int(source[int(i)]["species"]) == 1 for i in view.index)
    capped = P.pet_segmentation("dog", "train", size=48, max_images=1)
    assert len(capped) == 1


def test_trimap_border_can_be_object_background_or_ignored():
    trimap = np.array([[1, 2, 3]], np.uint8)
    assert P.trimap_to_mask(trimap).tolist() == [[1, 0, 1]]
    assert P.trimap_to_mask(trimap, "background").tolist() == [[1, 0, 0]]
    assert P.trimap_to_mask(trimap, "ignore").tolist() == [[1, 0, 255]]
    with pytest.raises(ValueError, match="border"):
        P.trimap_to_mask(trimap, "outline")


CAT, DOG = 8, 12  # 1-based VOC class indices


def _fabricate_vocdevkit(root, *, sbd_lists=True):
    """Five 40×50 images: a1-a3 with VOC palette PNGs, b1-b2 with SBD .mat files only."""
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass",
                   voc / "ImageSets" / "Segmentation", sbd / "cls"):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = {"a1": CAT, "a2": DOG, "a3": CAT, "b1": DOG, "b2": CAT}
    for name, cls in classes.items():
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{name}.jpg")
        class_map = np.zeros((40, 50), np.uint8)
        class_map[5:20, 5:30] = cls
        if name.startswith("a"):
            class_map[20, :] = P.VOC_IGNORE  # VOC marks object boundaries as void
            png = Image.fromarray(class_map, mode="P")
            png.putpalette([0, 0, 0, 128, 0, 0] * 128)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        else:
            savemat(sbd / "cls" / f"{name}.mat",
                    {"GTcls": {"Segmentation": class_map, "Boundaries": np.zeros(1)}})
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a1\na2\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a3\n")
    if sbd_lists:
        (sbd / "train.txt").write_text("b1\nb2\na3\n")  # a3 is VOC val: must not train
    return voc, sbd


def test_voc_sbd_builder_reads_palette_pngs_and_sbd_mat_files(tmp_path):
    _fabricate_vocdevkit(tmp_path)
    kwargs = {"manual_dir": tmp_path, "data_dir": tmp_path / "tfds", "size": 32}
    cats = P.voc_sbd_segmentation("cat", "train", **kwargs)
    assert len(cats) == 2  # a1 from its PNG, b2 from SBD; a3 stays in validation
    assert cats.images.shape == (2, 32, 32, 3) and cats.images.dtype == np.uint8
    assert cats.masks.shape == (2, 32, 32) and set(np.unique(cats.masks)) == {0, 1}
    assert np.all(cats.categories == P.VOC_CATEGORIES.index("cat"))
    dogs = P.voc_sbd_segmentation("dog", "train", **kwargs)
    assert len(dogs) == 2  # a2 and b1
    val = P.voc_sbd_segmentation("cat", "validation", **kwargs)
    assert len(val) == 1
    kept = P.voc_sbd_segmentation("cat", "validation", boundary="ignore",
                                  **{**kwargs, "size": 64})
    assert set(np.unique(kept.masks)) == {0, 1, P.VOC_IGNORE}
    with pytest.raises(ValueError, match="contains sheep"):
        P.voc_sbd_segmentation("sheep", "train", **kwargs)

    builder = P.VocSbdSegmentation(data_dir=str(tmp_path / "tfds"))
    source = builder.as_data_source(split="train")
    names = sorted(source[i]["name"].decode() for i in range(len(source)))
    assert names == ["a1", "a2", "b1", "b2"]
    example = next(source[i] for i in range(len(source)) if source[i]["name"] == b"a1")
    assert example["image"].shape == (40, 50, 3)
    class_map = example["class_map"][..., 0]
    assert class_map[10, 10] == CAT and class_map[20, 0] == P.VOC_IGNORE
    assert np.asarray(example["labels"]).tolist() == [CAT - 1]


def test_voc_sbd_segmentation_of_several_categories_masks_them_all(tmp_path):
    _fabricate_vocdevkit(tmp_path)
    both = P.voc_sbd_segmentation(["dog", "cat"], "train", manual_dir=tmp_path,
                                  data_dir=tmp_path / "tfds", size=32)
    assert len(both) == 4  # a1, a2, b1, b2
    np.testing.assert_array_equal(np.sort(both.categories), [CAT - 1] * 2 + [DOG - 1] * 2)
    alone = {c: P.voc_sbd_segmentation(c, "train", manual_dir=tmp_path,
                                       data_dir=tmp_path / "tfds", size=32)
             for c in ("cat", "dog")}
    for row, mask in zip(both.index, both.masks, strict=True):
        own = next(v for v in alone.values() if row in v.index)
        np.testing.assert_array_equal(mask, own.masks[list(own.index).index(row)])


def test_voc_sbd_builder_uses_every_sbd_file_when_the_lists_are_missing(tmp_path):
    _fabricate_vocdevkit(tmp_path, sbd_lists=False)
    cats = P.voc_sbd_segmentation("cat", "train", manual_dir=tmp_path,
                                  data_dir=tmp_path / "tfds", size=32)
    assert len(cats) == 2


def test_voc_sbd_builder_names_a_missing_image_or_folder(tmp_path):
    voc, _ = _fabricate_vocdevkit(tmp_path)
    (voc / "JPEGImages" / "b1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b1"):
        P.voc_sbd_segmentation("dog", "train", manual_dir=tmp_path,
                               data_dir=tmp_path / "tfds", size=32)
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        P.voc_sbd_segmentation("dog", "train", manual_dir=tmp_path / "nowhere",
                               data_dir=tmp_path / "tfds2", size=32)


def test_sbd_reader_names_a_malformed_file(tmp_path):
    path = tmp_path / "x.mat"
    savemat(path, {"other": np.zeros(2)})
    with pytest.raises(ValueError, match="x.mat"):
        P.read_sbd_class_map(path)
    savemat(path, {"GTcls": {"Segmentation": np.full((3, 3), 77, np.uint8)}})
    with pytest.raises(ValueError, match="x.mat.*classes"):
        P.read_sbd_class_map(path)
