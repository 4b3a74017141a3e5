"""Paper-scale loaders: TFDS voc/2012 and oxford_iiit_pet under mock data, VOC + SBD folders."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy.io import savemat

from nettransplant.data import paper_scale as P


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_vgg_geometry_resizes_the_shorter_side_and_centre_crops():
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    mask = np.zeros((375, 500), np.uint8)
    mask[:, 250:] = 1
    out, out_mask = P.vgg_geometry(image, mask)
    assert out.shape == (224, 224, 3) and out_mask.shape == (224, 224)
    assert set(np.unique(out_mask)) == {0, 1}  # nearest-neighbour keeps labels
    assert out_mask[:, :100].max() == 0 and out_mask[:, 124:].min() == 1
    with pytest.raises(ValueError, match="differ in size"):
        P.vgg_geometry(image, mask[:10])


def test_voc_classification_is_balanced_category_vs_random_images(mock_tfds):
    view = P.voc_classification("cat", "train", size=64)
    assert view.images.shape[1:] == (64, 64, 3) and view.images.dtype == np.uint8
    assert view.labels.sum() * 2 == len(view)
    with pytest.raises(ValueError, match="no category 'lion'"):
        P.voc_classification("lion")


def test_pet_segmentation_gives_binary_masks_of_the_species(mock_tfds):
    view = P.pet_segmentation("dog", "train", size=48)
    assert view.images.shape[1:] == (48, 48, 3)
    assert view.masks.shape == (len(view), 48, 48)
    assert set(np.unique(view.masks)) <= {0, 1}


def _fabricate_vocdevkit(root):
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass",
                   voc / "ImageSets" / "Segmentation", sbd / "cls"):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = {"a1": 8, "a2": 12, "a3": 8, "b1": 12, "b2": 8}  # 8 = cat, 12 = dog (1-based)
    for name, cls in classes.items():
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{name}.jpg")
        class_map = np.zeros((40, 50), np.uint8)
        class_map[5:20, 5:30] = cls
        class_map[20, :] = P.VOC_IGNORE
        if name.startswith("a"):
            png = Image.fromarray(class_map, mode="P")
            png.putpalette([0, 0, 0] * 256)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        else:
            savemat(sbd / "cls" / f"{name}.mat",
                    {"GTcls": {"Segmentation": class_map, "Boundaries": np.zeros(1)}})
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a1\na2\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a3\n")
    (sbd / "train.txt").write_text("b1\nb2\na3\n")  # a3 is VOC val: must not train


def test_voc_sbd_builder_reads_palette_pngs_and_sbd_mat_files(tmp_path):
    _fabricate_vocdevkit(tmp_path)
    cats = P.voc_sbd_segmentation("cat", "train", manual_dir=tmp_path,
                                  data_dir=tmp_path / "tfds", size=32)
    assert len(cats) == 2  # a1 from the PNG, b2 from SBD; a3 stays in validation
    assert cats.masks.shape == (2, 32, 32) and set(np.unique(cats.masks)) <= {0, 1}
    val = P.voc_sbd_segmentation("cat", "validation", manual_dir=tmp_path,
                                 data_dir=tmp_path / "tfds", size=32)
    assert len(val) == 1
    with pytest.raises(ValueError, match="contains sheep"):
        P.voc_sbd_segmentation("sheep", "train", manual_dir=tmp_path,
                               data_dir=tmp_path / "tfds", size=32)


def test_sbd_reader_names_a_malformed_file(tmp_path):
    path = tmp_path / "x.mat"
    savemat(path, {"other": np.zeros(2)})
    with pytest.raises(ValueError, match="x.mat"):
        P.read_sbd_class_map(path)
