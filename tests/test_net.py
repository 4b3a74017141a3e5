"""The transplant net: grow it on the embedded data, export it, import it elsewhere, reuse it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from launch import net as net_cli
from nettransplant import data
from nettransplant.configs import silhouettes
from nettransplant.core import modules
from nettransplant.data import benchmarks
from nettransplant.net import (
    NetSpecError,
    TaskTrainingSettings,
    TeacherParts,
    TransplantNet,
    TransplantSettings,
    export_module,
    export_net,
    load_net,
    load_teacher,
    operations,
    verify,
)
from nettransplant.training import checkpoint, teachers

REPO = Path(__file__).resolve().parents[1]
SETTINGS = TransplantSettings(num_draws=8, draws_per_step=4, closed_form_draws=8, num_steps=4,
                              batch_size=16, log_every=2)
TASK_SETTINGS = TaskTrainingSettings(num_steps=4, batch_size=16, log_every=2)


@pytest.fixture(scope="module")
def config():
    return silhouettes.get_config("quick")


@pytest.fixture(scope="module")
def bench(config):
    return benchmarks.make_benchmark(config)


def _teacher(config, bench, category: str, seed: int) -> TeacherParts:
    """A briefly trained teacher of ``category`` (enough for outputs that vary per image)."""
    m = config.model
    teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                   dropout_rate=m.dropout_rate, num_classes=m.num_classes)
    optimizer = optax.adam(1e-3)
    state = teachers.create_teacher_state(teacher, jax.random.key(seed), m.image_size, optimizer)
    cls, seg = bench.classification(category, "train"), bench.segmentation(category, "train")
    state, _ = teachers.train_teacher(
        teacher, state, cls_images=data.normalize_images(cls.images[:64]),
        cls_labels=cls.labels[:64], seg_images=data.normalize_images(seg.images[:64]),
        seg_masks=seg.masks[:64].astype(np.int32), optimizer=optimizer, num_steps=3,
        batch_size=16, seed=seed, progress=False)
    return TeacherParts.from_teacher(category, teacher, state.params, input_size=m.image_size,
                                     provenance={"test_seed": seed})


def _samples(bench, category: str, task: str, n: int):
    view = (bench.segmentation if task == "segmentation" else bench.classification)(
        category, "train")
    shots = data.few_shot(view, n, seed=0)
    return shots.images, (shots.masks if task == "segmentation" else shots.labels)


def _probe(bench) -> np.ndarray:
    """uint8 test images of several categories: every route is run on them."""
    return np.concatenate([bench.classification(c, "test").images[:6]
                           for c in ("cat", "dog", "horse")])


def _outputs(net: TransplantNet, images: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for route in net.routes():
        x = net.normalize(images, category=route.category)
        out[route.category, route.task_module] = np.asarray(
            net.apply(x, category=route.category, task=route.task_module))
    return out


def _assert_unchanged(before: dict, after_net: TransplantNet, images: np.ndarray) -> None:
    after = _outputs(after_net, images)
    for route, value in before.items():
        assert route in after, f"route {route} disappeared"
        np.testing.assert_array_equal(after[route], value, err_msg=f"route {route} changed")


@pytest.fixture(scope="module")
def grown(config, bench):
    """Two teachers → transplant horse (0 and 10 samples) → connect → add a task module.

    Returns every intermediate net with the outputs of its routes before the
    next operation, so tests can check that no operation changed an old route.
    """
    dog, cat, horse = (_teacher(config, bench, c, seed) for c, seed in
                       (("dog", 1), ("cat", 2), ("horse", 3)))
    probe = _probe(bench)
    beta_images = (bench.unlabelled(["dog"], 16), bench.unlabelled(["horse"], 16))
    stages = []

    net = TransplantNet().add_teacher(dog).add_teacher(cat)
    stages.append(("two teachers", net, _outputs(net, probe)))

    net, zero = operations.transplant(net, horse, onto="dog.classification", samples=None,
                                      beta_images=beta_images, settings=SETTINGS)
    stages.append(("transplant, 0 samples", net, _outputs(net, probe)))

    horse10 = dataclasses.replace(horse, name="horse10")
    net, ten = operations.transplant(net, horse10, onto="dog.segmentation",
                                     samples=_samples(bench, "horse", "segmentation", 10),
                                     beta_images=beta_images, settings=SETTINGS,
                                     test=_samples(bench, "horse", "segmentation", 8))
    stages.append(("transplant, 10 samples", net, _outputs(net, probe)))

    net, connected = operations.connect(net, "cat", "dog.classification",
                                        samples=_samples(bench, "cat", "classification", 10),
                                        beta=1.0, settings=SETTINGS)
    stages.append(("connect", net, _outputs(net, probe)))

    template = net.task_module("dog.classification").module
    net, added = operations.add_task(net, "shared.classification", template, settings=TASK_SETTINGS,
                                     data={"dog": _samples(bench, "dog", "classification", 12),
                                    "cat": _samples(bench, "cat", "classification", 12)})
    stages.append(("add task", net, _outputs(net, probe)))
    reports = {"zero": zero, "ten": ten, "connect": connected, "add_task": added}
    return {"stages": stages, "reports": reports, "probe": probe, "teachers": (dog, cat, horse)}


def test_every_operation_leaves_every_existing_route_bit_identical(grown):
    stages, probe = grown["stages"], grown["probe"]
    for (_, _, before), (next_name, next_net, _) in zip(stages, stages[1:]):
        assert set(before) < set(_outputs(next_net, probe)), f"{next_name} added no route"
        _assert_unchanged(before, next_net, probe)


def test_the_grown_net_has_the_routes_of_each_operation(grown):
    net = grown["stages"][-1][1]
    routes = {(r.category, r.task_module): r.adapter for r in net.routes()}
    assert routes == {
        ("cat", "cat.classification"): False, ("cat", "cat.segmentation"): False,
        ("dog", "dog.classification"): False, ("dog", "dog.segmentation"): False,
        # transplant: the adapter onto g_S, and the teacher's other task module joins directly
        ("horse", "dog.classification"): True, ("horse", "horse.segmentation"): False,
        ("horse10", "dog.segmentation"): True, ("horse10", "horse10.classification"): False,
        ("cat", "dog.classification"): True,  # connect
        ("cat", "shared.classification"): False, ("dog", "shared.classification"): False,
    }
    reports = grown["reports"]
    assert reports["zero"]["samples"] == 0 and reports["ten"]["samples"] == 10
    assert reports["zero"]["method"] == reports["ten"]["method"] == "back-distill"
    assert 0 <= reports["ten"]["metrics"]["pixel accuracy %"] <= 100
    for key in ("alpha", "beta", "lambda"):
        assert np.isfinite(reports["ten"][key]), key
    edge = net.edge("horse10", "dog.segmentation")
    assert edge.provenance["samples"] == 10 and edge.beta == pytest.approx(reports["ten"]["beta"])
    assert reports["add_task"]["categories"] == ["cat", "dog"]


def test_the_zero_sample_transplant_of_a_teachers_own_task_module_reproduces_it(config, bench,
                                                                                  grown):
    """With g_S = g_T and the same category module, back-distillation's closed form is the
    identity adapter: the new route reproduces the teacher's own outputs."""
    dog = grown["teachers"][0]
    net = TransplantNet().add_teacher(dog, tasks=["classification"])
    twin = dataclasses.replace(dog, name="dog_twin")
    net, report = operations.transplant(net, twin, onto="dog.classification", beta=1.0,
                                        settings=dataclasses.replace(SETTINGS, adapter=(1, 1)))
    probe = grown["probe"]
    x = net.normalize(probe, category="dog")
    own = np.asarray(net.apply(x, category="dog", task="dog.classification"))
    moved = np.asarray(net.apply(x, category="dog_twin", task="dog.classification"))
    np.testing.assert_allclose(moved, own, rtol=1e-3, atol=1e-3 * np.abs(own).max())
    assert report["warm_start_residual"] < 1e-4


_PREDICT_IN_FRESH_PROCESS = """
import sys, numpy as np
from nettransplant.net import load_net
net = load_net(sys.argv[1])
images = np.load(sys.argv[2])["images"]
out = {}
for r in net.routes():
    x = net.normalize(images, category=r.category)
    out[f"{r.category}|{r.task_module}|apply"] = np.asarray(
        net.apply(x, category=r.category, task=r.task_module))
    out[f"{r.category}|{r.task_module}|predict"] = net.predict(
        images, category=r.category, task=r.task_module)
np.savez(sys.argv[3], **out)
"""


def test_an_exported_net_predicts_bit_identically_in_a_fresh_process(grown, tmp_path):
    net, probe = grown["stages"][-1][1], grown["probe"]
    export_net(net, tmp_path / "net")
    np.savez(tmp_path / "probe.npz", images=probe)
    subprocess.run([sys.executable, "-c", _PREDICT_IN_FRESH_PROCESS, str(tmp_path / "net"),
                    str(tmp_path / "probe.npz"), str(tmp_path / "out.npz")],
                   check=True, cwd=REPO, timeout=600)
    fresh = np.load(tmp_path / "out.npz")
    assert len(fresh.files) == 2 * len(net.routes())
    for r in net.routes():
        key = f"{r.category}|{r.task_module}"
        x = net.normalize(probe, category=r.category)
        np.testing.assert_array_equal(
            fresh[f"{key}|apply"], np.asarray(net.apply(x, category=r.category,
                                                         task=r.task_module)), err_msg=key)
        np.testing.assert_array_equal(
            fresh[f"{key}|predict"], net.predict(probe, category=r.category,
                                                 task=r.task_module), err_msg=key)


def test_growing_a_loaded_net_changes_no_existing_route(grown, bench, tmp_path):
    net, probe = grown["stages"][-1][1], grown["probe"]
    export_net(net, tmp_path / "net")
    loaded = load_net(tmp_path / "net")
    assert [dataclasses.astuple(r) for r in loaded.routes()] == \
        [dataclasses.astuple(r) for r in net.routes()]
    before = _outputs(loaded, probe)
    _assert_unchanged(before, net, probe)  # import itself changes nothing
    bigger, _ = operations.connect(loaded, "horse", "dog.segmentation",
                                   reference="horse.segmentation", beta=1.0, settings=SETTINGS)
    _assert_unchanged(before, bigger, probe)
    # ... and a re-export of the grown net still holds the old routes bit for bit
    export_net(bigger, tmp_path / "bigger")
    _assert_unchanged(before, load_net(tmp_path / "bigger"), probe)


def test_a_single_module_exports_and_loads_as_a_one_module_net(grown, tmp_path):
    net = grown["stages"][-1][1]
    export_module(net, tmp_path / "g", task_module="shared.classification")
    single = load_net(tmp_path / "g")
    assert list(single.task_modules) == ["shared.classification"] and not single.routes()
    for a, b in zip(jax.tree.leaves(single.task_params("shared.classification")),
                    jax.tree.leaves(net.task_params("shared.classification")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="exactly one"):
        export_module(net, tmp_path / "both", category="cat", task_module="cat.segmentation")


def _edit_spec(path: Path, edit) -> None:
    """Edit the spec and store a matching content hash (a crafted net, not a damaged one)."""
    record_file = path / checkpoint.METADATA_FILE
    record = json.loads(record_file.read_text())
    edit(record["metadata"]["spec"])
    record["metadata"]["net_sha256"] = verify.content_digest(record["metadata"],
                                                             record["params_sha256"])
    record_file.write_text(json.dumps(record))


def test_loading_refuses_a_spec_that_does_not_fit_the_tensors_naming_module_and_key(
        grown, tmp_path):
    net = grown["stages"][-1][1]
    export_net(net, tmp_path / "net")

    def widen(spec):  # the stored adapter kernels are 1×1: claim 3×3
        for edge in spec["edges"]:
            if (edge["category"], edge["task_module"]) == ("horse10", "dog.segmentation"):
                edge["adapter"]["fields"]["kernel_size"] = 3

    _edit_spec(tmp_path / "net", widen)
    with pytest.raises(NetSpecError, match=r"adapter horse10 → dog\.segmentation: .*kernel"):
        load_net(tmp_path / "net")


def test_loading_refuses_an_unknown_module_kind_and_an_edge_to_nowhere(grown, tmp_path):
    net = grown["stages"][-1][1]
    for name, edit, message in (
            ("kind", lambda s: s["task_modules"]["cat.segmentation"].update(kind="Unknown"),
             r"task module 'cat\.segmentation'.*Unknown"),
            ("edge", lambda s: s["edges"].append({"category": "cat", "task_module": "nowhere"}),
             r"edge cat → nowhere")):
        export_net(net, tmp_path / name)
        _edit_spec(tmp_path / name, edit)
        with pytest.raises(NetSpecError, match=message):
            load_net(tmp_path / name)


def test_bad_routes_and_images_get_errors_naming_them(grown):
    net, probe = grown["stages"][-1][1], grown["probe"]
    with pytest.raises(KeyError, match="no category module 'zebra'"):
        net.predict(probe, category="zebra", task="dog.classification")
    with pytest.raises(KeyError, match="no task module 'zebra.segmentation'"):
        net.predict(probe, category="cat", task="zebra.segmentation")
    with pytest.raises(KeyError, match="'dog' is not connected to task module 'horse.segm"):
        net.predict(probe, category="dog", task="horse.segmentation")
    with pytest.raises(ValueError, match="trained on 32×32"):
        net.predict(np.zeros((2, 28, 28, 3), np.uint8), category="cat", task="cat.segmentation")
    with pytest.raises(ValueError, match="RGB"):
        net.predict(np.zeros((2, 32, 32), np.uint8), category="cat", task="cat.segmentation")
    with pytest.raises(ValueError, match="already has a category module 'cat'"):
        net.add_teacher(grown["teachers"][1])


def _save_teacher(path: Path, parts: TeacherParts, config) -> None:
    """A teacher checkpoint in the main job's format (W/teachers/<category>)."""
    params = {"category_module": parts.category_module.params,
              **{f"{task}_module": ref.params for task, ref in parts.task_modules.items()}}
    checkpoint.save_checkpoint(path, params, {"kind": "category", "category": parts.name,
                                              "config": {"model": config.model.to_dict()}})


def test_the_command_line_builds_inspects_grows_and_predicts(grown, config, bench, tmp_path,
                                                             capsys):
    dog, cat, _ = grown["teachers"]
    for parts in (dog, cat):
        _save_teacher(tmp_path / "teachers" / parts.name, parts, config)
    assert load_teacher(tmp_path / "teachers" / "dog").name == "dog"

    def cli(*args) -> str:
        assert net_cli.main([str(a) for a in args]) == 0
        return capsys.readouterr().out

    cli("build", "--teacher", tmp_path / "teachers/dog", "--out", tmp_path / "net")
    cli("samples", "--category", "cat", "--task", "segmentation", "--num", "6",
        "--out", tmp_path / "cat.npz")
    cli("transplant", "--net", tmp_path / "net", "--teacher", tmp_path / "teachers/cat",
        "--onto", "dog.segmentation", "--samples", tmp_path / "cat.npz", "--beta", "1",
        "--steps", "2", "--out", tmp_path / "net2")
    info = json.loads(cli("info", "--net", tmp_path / "net2", "--json"))
    routes = {(r["category"], r["task_module"]): r for r in info["routes"]}
    assert routes["cat", "dog.segmentation"]["adapter"]
    assert routes["cat", "dog.segmentation"]["samples"] == 6
    assert ("cat", "cat.classification") in routes
    assert "routes" in cli("info", "--net", tmp_path / "net2").replace("route", "routes")

    images = bench.segmentation("cat", "test").images[:5]
    np.savez(tmp_path / "imgs.npz", images=images)
    cli("predict", "--net", tmp_path / "net2", "--category", "cat", "--task", "dog.segmentation",
        "--images", tmp_path / "imgs.npz", "--out", tmp_path / "preds.npz",
        "--overlays", tmp_path / "overlays")
    masks = np.load(tmp_path / "preds.npz")["masks"]
    assert masks.shape == (5, 32, 32)
    np.testing.assert_array_equal(
        masks, load_net(tmp_path / "net2").predict(images, category="cat",
                                                   task="dog.segmentation"))
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 5

    # A folder of PNGs predicts the same as the .npz it was written from.
    from PIL import Image
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i}.png")
    cli("predict", "--net", tmp_path / "net2", "--category", "cat", "--task", "dog.segmentation",
        "--images", tmp_path / "pngs", "--out", tmp_path / "preds_png.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "preds_png.npz")["masks"], masks)


@pytest.mark.parametrize("args, message", [
    (["--category", "zebra", "--task", "dog.segmentation"], "no category module 'zebra'"),
    (["--category", "cat", "--task", "nope"], "no task module 'nope'"),
    (["--category", "dog", "--task", "cat.segmentation"], "'dog' is not connected"),
    (["--category", "cat", "--task", "cat.segmentation", "--images", "{small}"], "trained on"),
    (["--category", "cat", "--task", "cat.segmentation", "--images", "{text}"],
     "not a readable image"),
    (["--category", "cat", "--task", "cat.segmentation", "--images", "{missing}"],
     "no such file"),
])
def test_bad_command_line_input_is_one_line_naming_it(grown, tmp_path, capsys, args, message):
    export_net(TransplantNet().add_teacher(grown["teachers"][1]).add_teacher(
        grown["teachers"][0]), tmp_path / "net")
    np.savez(tmp_path / "ok.npz", images=grown["probe"])
    np.savez(tmp_path / "small.npz", images=np.zeros((2, 28, 28, 3), np.uint8))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.png").write_text("not an image")
    paths = {"small": tmp_path / "small.npz", "text": tmp_path / "text",
             "missing": tmp_path / "missing.npz"}
    args = [a.format(**paths) for a in args]
    if "--images" not in args:
        args += ["--images", str(tmp_path / "ok.npz")]
    code = net_cli.main(["predict", "--net", str(tmp_path / "net"), *args,
                         "--out", str(tmp_path / "p.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "p.npz").exists()
