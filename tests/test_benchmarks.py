"""Benchmarks: the views the main job reads, the paper-scale path end to end, and the
step benchmark's JAX vs PyTorch section.

The VOC + SBD run uses a fabricated ``VOCdevkit`` (read by the real TFDS
builder) and an in-memory stand-in for TFDS ``voc/2012`` (no machine here can
download it; the real reader is tested under ``tfds.testing.mock_data`` in
``test_data_paper_scale.py``).
"""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from nettransplant import data, experiments
from nettransplant.benchmarks import step_benchmark, torch_comparison
from nettransplant.configs import silhouettes, voc_vgg16
from nettransplant.data import benchmarks, paper_scale

VOC = paper_scale.VOC_CATEGORIES
# Objects per fabricated image, cycled: every mammal and dissimilar category used
# below appears alone and beside another category.
_OBJECTS = (("cat",), ("dog",), ("aeroplane",), ("bird",), ("person",), ("cat", "person"),
            ("dog", "bird"), ("cow",), ("boat",), ("bicycle",), ("horse",), ("sheep",))


def _fabricate_voc_sbd(root, num_train=48, num_val=24):
    """A VOCdevkit whose images hold the objects of :data:`_OBJECTS` as rectangles."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass",
                   voc / "ImageSets" / "Segmentation"):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:04d}" for i in range(num_train + num_val)]
    for i, name in enumerate(names):
        image = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
        class_map = np.zeros((40, 48), np.uint8)
        for k, category in enumerate(_OBJECTS[i % len(_OBJECTS)]):
            top, left = 4 + 16 * k, 4 + rng.integers(0, 20)
            class_map[top:top + 14, left:left + 20] = VOC.index(category) + 1
            image[top:top + 14, left:left + 20] = 200 - 40 * k  # a visible object
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        png = Image.fromarray(class_map, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0] * 128)
        png.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:num_train]))
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[num_train:]))


class _FakeVocClassification:
    """``tfds.data_source("voc/2012", split)``: examples with ``image`` and ``labels``."""

    SIZES = {"train": 60, "validation": 36}

    def __init__(self, split):
        rng = np.random.default_rng(len(split))
        self.examples = []
        for i in range(self.SIZES[split]):
            labels = [VOC.index(c) for c in _OBJECTS[i % len(_OBJECTS)]]
            image = rng.integers(0, 80, (36, 44, 3), dtype=np.uint8)
            image[8:28, 10:34] = 40 * (labels[0] % 5) + 60
            self.examples.append({"image": image, "labels": np.array(labels),
                                  "labels_no_difficult": np.array(labels)})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


@pytest.fixture
def fake_voc(tmp_path, monkeypatch):
    _fabricate_voc_sbd(tmp_path / "manual")

    def data_source(name, split, data_dir=None):
        assert name == "voc/2012", name
        return _FakeVocClassification(split)

    monkeypatch.setattr(paper_scale.tfds, "data_source", data_source)
    return tmp_path


def _tiny_voc_config(root):
    """nettransplant/configs/voc_vgg16.py shrunk to the quick config's sizes, on the fabricated
    data."""
    config = voc_vgg16.get_config()
    quick = silhouettes.get_config("quick")
    config.voc.manual_dir = str(root / "manual")
    config.voc.tfds_data_dir = str(root / "tfds")
    config.model = quick.model
    for field in ("num_steps", "checkpoint_every"):
        config.teacher[field] = quick.teacher[field]
    config.teacher.generic_images = 12
    config.transplant = quick.transplant
    config.transplant.beta_images = 4
    config.categories, config.generic_category = ("cat", "dog"), "dog"
    config.target_categories = ("cat",)
    config.sample_counts = (0, 4)
    return config


def test_voc_views_are_disjoint_balanced_and_hold_their_categories(fake_voc):
    bench = benchmarks.make_benchmark(_tiny_voc_config(fake_voc))
    cls = bench.classification("cat", "train")
    assert set(np.unique(cls.labels)) == {0, 1} and np.sum(cls.labels) * 2 == len(cls)
    assert np.all(cls.categories[cls.labels == 1] == VOC.index("cat"))
    seg = bench.segmentation("cat", "test")  # VOC's validation split
    assert seg.images.shape[1:] == (32, 32, 3) and set(np.unique(seg.masks)) == {0, 1}
    train_rows = set(bench.segmentation("cat", "train").index.tolist())
    assert len(seg) and len(train_rows)
    # Table 4's generic module for the held-out cat: the other mammals + VOC's
    # dissimilar categories, and no negative holds a cat.
    assert bench.leave_one_out_categories("cat") == (
        "cow", "dog", "horse", "sheep", "aeroplane", "bicycle", "bird", "boat")
    generic_cls, generic_seg = bench.generic_sets("cat", "train")
    assert np.sum(generic_cls.labels) <= 12
    source = _FakeVocClassification("train")
    for row, label in zip(generic_cls.index, generic_cls.labels):
        held = set(source[int(row)]["labels"].tolist())
        if label == 0:
            assert VOC.index("cat") not in held and not held & {VOC.index(c) for c in (
                "cow", "dog", "horse", "sheep", "aeroplane", "bicycle", "bird", "boat")}
    assert np.isin(generic_seg.categories, [VOC.index(c) for c in
                                            bench.leave_one_out_categories("cat")]).all()
    assert bench.unlabelled(["cat"], 3).shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="asked for 999"):
        bench.unlabelled(["cat"], 999)
    with pytest.raises(ValueError, match="split must be one of"):
        bench.classification("cat", "validation")


def test_the_paper_scale_config_runs_end_to_end_with_the_same_code(fake_voc):
    config = _tiny_voc_config(fake_voc)
    workdir = fake_voc / "run"
    results = experiments.run(config, workdir, progress=False)
    stored = json.loads((workdir / "results.json").read_text())
    assert stored["config"]["data"] == "voc_sbd" and "backbone" not in stored
    assert set(stored["teachers"]) == {"cat", "dog"}
    assert set(stored["generic_modules"]) == {"cat"}
    for experiment in ("exp1", "exp2", "exp3", "table4"):
        assert experiment in results, experiment
    assert set(results["exp3"]["back-distill"]) == {"0", "4"}
    assert set(results["table4"]["segmentation"]["direct-learn"]["4"]) == {"cat", "avg"}
    for name in ("results.md", "learning_curves.png", "fig5_pca.png"):
        assert (workdir / name).is_file(), name
    assert (workdir / "results.md").read_text().startswith(
        "# Network transplanting on VOC 2012 + SBD")
    # The one-conv zero-sample adapter inside a teacher reproduces it (Exp. 1).
    teachers = np.mean([results["teachers"][c]["cls_error"] for c in config.categories])
    assert results["exp1"]["1conv"]["back-distill"]["0"]["avg"] == pytest.approx(teachers,
                                                                                 abs=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("voc.manual_dir", "", "config.voc.manual_dir"),
    ("pretrain.num_steps", 100, "config.pretrain.num_steps"),
    ("teacher.renderings", 4, "config.teacher.renderings"),
    ("pretrain.renderings", 4, "config.pretrain.renderings=4: 'voc_sbd' has no renderings"),
    ("generic_category", "zebra", "config.generic_category.*'voc_sbd' has"),
])
def test_bad_paper_scale_configs_fail_naming_the_field(tmp_path, field, value, message):
    config = voc_vgg16.get_config()
    config.voc.manual_dir = str(tmp_path)
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=message):
        experiments.validate_config(config)


def test_torchvision_weights_need_the_full_width_model(tmp_path):
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    config = silhouettes.get_config()
    config.pretrain.weights = str(weights)
    with pytest.raises(ValueError, match="config.pretrain.num_steps > 0"):
        experiments.validate_config(config)
    config.pretrain.num_steps = 0
    with pytest.raises(ValueError, match="config.model.width = 1.0"):
        experiments.validate_config(config)
    config = voc_vgg16.get_config()
    config.voc.manual_dir = str(tmp_path)
    config.pretrain.weights = str(weights)
    experiments.validate_config(config)


def test_silhouette_segmentation_renderings_are_picked_from_the_classification_ones():
    config = silhouettes.get_config("quick")
    bench = benchmarks.make_benchmark(config)
    cls_view = bench.classification("cat", "train")
    seg_view = bench.segmentation("cat", "train")
    picked = bench.rendered_rows(bench.rendered(cls_view), cls_view, seg_view)
    direct = bench.rendered(seg_view)
    assert len(direct) == config.teacher.renderings * len(seg_view)
    for field in ("images", "labels", "masks", "categories", "index"):
        np.testing.assert_array_equal(getattr(picked, field), getattr(direct, field), field)
    unseen = bench.segmentation("cat", "test")  # other silhouettes
    with pytest.raises(ValueError, match="not in the source"):
        bench.rendered_rows(bench.rendered(cls_view), cls_view, unseen)
    cls, seg = bench.teacher_sets("cat")
    np.testing.assert_array_equal(cls.images, bench.rendered(cls_view).images)
    np.testing.assert_array_equal(seg.masks, direct.masks)


def test_silhouette_generic_sets_are_positives_then_as_many_object_free_scenes():
    config = silhouettes.get_config("quick")
    bench = benchmarks.make_benchmark(config)
    for split, positives in (("train", config.teacher.generic_images
                              * config.teacher.renderings), ("test", None)):
        cls, seg = bench.generic_sets("cat", split)
        n = len(seg)
        assert positives is None or n == positives
        np.testing.assert_array_equal(cls.labels, np.r_[np.ones(n), np.zeros(n)])
        np.testing.assert_array_equal(cls.images[:n], seg.images)
        assert not np.isin(seg.categories, [benchmarks.CATEGORIES.index("cat")]).any()


def test_table4_target_task_is_the_category_against_fresh_object_free_scenes():
    config = silhouettes.get_config("quick")
    bench = benchmarks.make_benchmark(config)
    cat = benchmarks.CATEGORIES.index("cat")
    for split, seed in (("train", config.seed + 303), ("test", config.seed + 404)):
        view = bench.target_classification("cat", split)
        cats = bench.splits[split]
        n = int(np.sum(cats.categories == cat))
        np.testing.assert_array_equal(view.labels, np.r_[np.ones(n), np.zeros(n)])
        np.testing.assert_array_equal(
            np.sort(view.images[:n].reshape(n, -1), axis=0),
            np.sort(cats.images[cats.categories == cat].reshape(n, -1), axis=0))
        np.testing.assert_array_equal(view.images[n:], data.background_scenes(n, 32, seed))
        # The generic modules' own scenes are other draws.
        generic_cls, _ = bench.generic_sets("cat", split)
        assert not np.array_equal(view.images[n:n + 5], generic_cls.images[-5:])
    few = data.few_shot(bench.target_classification("cat", "train"), 10, seed=0)
    assert few.labels.tolist().count(1) == 5


def _tiny_benchmark_config():
    config = silhouettes.get_config()
    config.model.width = 0.0625
    config.transplant.score_size = 3
    config.transplant.batch_size = 4
    config.transplant.draws_per_step = 2
    return config


@pytest.mark.torch
def test_the_pytorch_section_times_both_frameworks_and_writes_its_columns(tmp_path):
    rows = ("back-distill (0 samples)",)  # one row: each costs a compile or two
    section = torch_comparison.torch_section(_tiny_benchmark_config(), "exp3", steps=1, rounds=1,
                                           num_draws=2, rows=rows)
    path = tmp_path / "bench.json"
    step_benchmark.write_json({"torch": section}, str(path))
    stored = json.loads(path.read_text())["torch"]
    assert stored["adapter"]["name"] == "exp3" and stored["torch_num_threads"] >= 1
    assert list(stored["methods"]) == list(rows)
    for row in rows:
        r = stored["methods"][row]
        for key in ("jax_step_s", "torch_step_s", "jax_over_torch"):
            assert r[key] > 0, (row, key)
        assert r["jax_naive_step_s"] > 0 and r["jax_naive_over_torch"] > 0
    table = torch_comparison.format_torch_table(section).splitlines()
    assert "jax/torch" in table[1] and len(table) == 3 + len(rows)


def test_without_pytorch_the_pytorch_section_is_one_note(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    section = torch_comparison.torch_section(_tiny_benchmark_config(), "exp3", steps=1, rounds=1,
                                           num_draws=2)
    assert list(section) == ["skipped"] and "PyTorch is not installed" in section["skipped"]
    assert torch_comparison.format_torch_table(section) == section["skipped"]


def test_the_threads_section_times_both_ways_and_checks_the_parameters_are_equal(tmp_path):
    section = step_benchmark.threads_section(_tiny_benchmark_config(), "exp3", workers=2,
                                             fits=2, num_steps=2, rounds=1, num_draws=2)
    path = tmp_path / "bench.json"
    step_benchmark.write_json({"threads": section}, str(path))
    stored = json.loads(path.read_text())["threads"]
    assert stored["workers"] == 2 and list(stored["methods"]) == ["direct-learn", "back-distill"]
    for r in stored["methods"].values():
        assert r["serial_s"] > 0 and r["threaded_s"] > 0 and r["speedup"] > 0
        assert r["same_parameters"] is True  # each fit owns its state and batch order
    table = step_benchmark.format_threads_table(section).splitlines()
    assert "speedup" in table[1] and len(table) == 5


def test_the_runs_section_times_a_problem_both_ways_with_the_headline_keys(tmp_path):
    config = _tiny_benchmark_config()
    config.sample_counts = (0, 2, 6)  # fewer samples than a batch of 4, and more
    section = step_benchmark.runs_section(config, "exp3", runs_per_count=1, num_steps=2,
                                          rounds=1, num_draws=2)
    path = tmp_path / "bench.json"
    step_benchmark.write_json({"runs": section}, str(path))
    stored = json.loads(path.read_text())["runs"]
    assert stored["transplant_runs"] == 2 and stored["counts"] == [2, 6]
    for key in ("transplant_problem_batched_s", "transplant_problem_one_at_a_time_s",
                "transplant_compile_batched_s", "transplant_compile_one_at_a_time_s"):
        assert stored[key] > 0, key
    assert list(stored["methods"]) == ["direct-learn", "back-distill"]
    table = step_benchmark.format_runs_table(section).splitlines()
    assert "batched" in table[1] and len(table) == 5
