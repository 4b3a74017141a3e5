"""Exported nets and ``nettransplant net`` against bad, tampered, huge and concurrent input.

Every test reuses one small net (width 1/16, 32² inputs, random parameters)
exported once per session, so each runs in about a second: content hashes,
sizes checked before allocation, one writer per output, image decoding and
limits, argument checks. Every refusal is one line, exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import net as net_cli
from nettransplant.core import modules
from nettransplant.core.adapter import Adapter
from nettransplant.net import (
    NetSpecError,
    TeacherParts,
    TransplantNet,
    export_net,
    load_net,
    operations,
    outputs,
    verify,
)
from nettransplant.net import images as net_images
from nettransplant.net import io as net_io
from nettransplant.training import checkpoint

WIDTH, SIDE = 0.0625, 32


def _random(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), tree)


def _teacher_parts(name: str, seed: int) -> tuple[TeacherParts, dict]:
    teacher = modules.make_teacher(width=WIDTH, input_size=SIDE)
    x = jax.ShapeDtypeStruct((1, SIDE, SIDE, 3), np.float32)
    params = _random(jax.eval_shape(teacher.init, jax.random.key(0), x)["params"], seed)
    return TeacherParts.from_teacher(name, teacher, params, input_size=SIDE), params


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """Two teachers' modules and an adapter edge cat → dog.segmentation, exported once."""
    dog, dog_params = _teacher_parts("dog", 1)
    cat, cat_params = _teacher_parts("cat", 2)
    net = TransplantNet().add_teacher(dog).add_teacher(cat)
    adapter = Adapter(channels=modules.category_channels(WIDTH), num_convs=1, kernel_size=1,
                      reorder_seed=3)
    adapter_params = _random(net_io._abstract_params(adapter, (1, 16, 16, adapter.channels)), 3)
    net = net.add_adapter("cat", "dog.segmentation", adapter, adapter_params, beta=0.5)
    root = tmp_path_factory.mktemp("small")
    export_net(net, root / "net")
    teacher_dir = root / "teachers" / "horse"
    model = {"width": WIDTH, "image_size": SIDE, "num_classes": 2, "dropout_rate": 0.5}
    checkpoint.save_checkpoint(teacher_dir, {"category_module": cat_params["category_module"],
                                             "classification_module":
                                                 cat_params["classification_module"],
                                             "segmentation_module":
                                                 cat_params["segmentation_module"]},
                               {"kind": "category", "category": "horse",
                                "config": {"model": model}})
    images = np.random.default_rng(0).integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    np.savez(root / "images.npz", images=images)
    return {"net": net, "dir": root / "net", "teacher": teacher_dir, "images": images,
            "npz": root / "images.npz", "root": root}


@pytest.fixture
def net_copy(small, tmp_path) -> Path:
    shutil.copytree(small["dir"], tmp_path / "net")
    return tmp_path / "net"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = net_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _edit(path: Path, edit, *, rehash: bool) -> None:
    """Edit a net's metadata; ``rehash``: store a matching content hash (a crafted net)."""
    record_file = path / checkpoint.METADATA_FILE
    record = json.loads(record_file.read_text())
    edit(record["metadata"])
    if rehash:
        record["metadata"]["net_sha256"] = verify.content_digest(record["metadata"],
                                                                 record["params_sha256"])
    record_file.write_text(json.dumps(record))


def _edge(metadata, category: str, task_module: str) -> dict:
    return next(e for e in metadata["spec"]["edges"]
                if (e["category"], e["task_module"]) == (category, task_module))


def _category(metadata, cid="cat") -> dict:
    return metadata["spec"]["category_modules"][cid]


def _task(metadata, tid="cat.classification") -> dict:
    return metadata["spec"]["task_modules"][tid]


# ----------------------------------------------------------------------------- 1. content hash


def test_an_exported_net_carries_a_content_hash_and_loads_bit_identically(small):
    metadata = checkpoint.load_metadata(small["dir"])
    assert metadata[verify.CONTENT_HASH_FIELD] == verify.content_digest(
        metadata, checkpoint.stored_digest(small["dir"]))
    loaded = load_net(small["dir"])
    for route in small["net"].routes():
        np.testing.assert_array_equal(
            loaded.predict(small["images"], category=route.category, task=route.task_module),
            small["net"].predict(small["images"], category=route.category,
                                 task=route.task_module))


TAMPERING = {
    "nan input mean": lambda m: _category(m)["input"].update(mean=[float("nan"), 0.4, 0.4]),
    "input std": lambda m: _category(m)["input"].update(std=[1.0, 1.0, 1.0]),
    "input size": lambda m: _category(m)["input"].update(size=64),
    "beta": lambda m: _edge(m, "cat", "dog.segmentation").update(beta=0.25),
    "reorder seed": lambda m: _edge(m, "cat", "dog.segmentation")["adapter"]["fields"].update(
        reorder_seed=4),
    "module kind": lambda m: _task(m, "cat.segmentation").update(kind="Unknown"),
    "dropped edge": lambda m: m["spec"]["edges"].pop(),
    "provenance": lambda m: _category(m)["provenance"].update(checkpoint="elsewhere"),
    "params hash": lambda m: m.update(spec_version=m["spec_version"]),  # see below
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_a_tampered_spec_is_one_line_naming_the_file(net_copy, capsys, name):
    if name == "params hash":  # the record's parameters' hash, not the spec
        record_file = net_copy / checkpoint.METADATA_FILE
        record = json.loads(record_file.read_text())
        record["params_sha256"] = "0" * 64
        record_file.write_text(json.dumps(record))
    else:
        _edit(net_copy, TAMPERING[name], rehash=False)
    with pytest.raises(verify.NetVerificationError, match="does not match net_sha256"):
        load_net(net_copy)
    code, _, err = cli(capsys, "info", "--net", net_copy, "--allow_unverified")
    assert_one_line_error(code, err, str(net_copy / "checkpoint.json"), "does not match")


def _flip_parameter_bytes(net: Path) -> None:
    files = [p for p in (net / checkpoint.PARAMS_DIR).rglob("*") if p.is_file()]
    data_file = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        data[offset] ^= 0xFF
    data_file.write_bytes(bytes(data))


def test_flipped_parameter_bytes_are_one_line_naming_the_net(net_copy, capsys, small):
    _flip_parameter_bytes(net_copy)
    with pytest.raises(checkpoint.CheckpointError, match=str(net_copy)):
        load_net(net_copy)
    code, _, err = cli(capsys, "predict", "--net", net_copy, "--category", "cat", "--task",
                       "cat.segmentation", "--images", small["npz"], "--out",
                       net_copy.parent / "p.npz")
    assert_one_line_error(code, err, str(net_copy))
    assert not (net_copy.parent / "p.npz").exists()


def test_a_net_without_a_hash_is_refused_unless_allowed_then_warned(net_copy, capsys):
    _edit(net_copy, lambda m: m.pop(verify.CONTENT_HASH_FIELD), rehash=False)
    with pytest.raises(verify.NetVerificationError, match="no content hash"):
        load_net(net_copy)
    code, _, err = cli(capsys, "info", "--net", net_copy)
    assert_one_line_error(code, err, str(net_copy / "checkpoint.json"), "--allow_unverified",
                          "nettransplant net export")

    with pytest.warns(net_io.UnverifiedNetWarning, match="UNVERIFIED"):
        load_net(net_copy, allow_unverified=True)
    code, out, err = cli(capsys, "info", "--net", net_copy, "--allow_unverified")
    assert code == 0 and "routes" in out.replace("route", "routes")
    assert err.startswith("WARNING:") and "UNVERIFIED" in err and len(err.splitlines()) == 1

    # re-exported, it is verified again, and its modules and parameters are the same
    fresh = net_copy.parent / "fresh"
    code, _, err = cli(capsys, "export", "--net", net_copy, "--allow_unverified", "--out", fresh)
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("error", net_io.UnverifiedNetWarning)
        again = load_net(fresh)
    with pytest.warns(net_io.UnverifiedNetWarning):
        old = load_net(net_copy, allow_unverified=True)
    assert net_io.net_spec(again) == net_io.net_spec(old)


def test_a_record_without_the_parameters_hash_is_refused(net_copy):
    record_file = net_copy / checkpoint.METADATA_FILE
    record = json.loads(record_file.read_text())
    del record["params_sha256"]
    record_file.write_text(json.dumps(record))
    with pytest.raises(verify.NetVerificationError, match="no content hash"):
        load_net(net_copy)


def test_export_writes_one_module_as_a_verified_net(small, tmp_path, capsys):
    code, out, err = cli(capsys, "export", "--net", small["dir"], "--task_module",
                         "dog.segmentation", "--out", tmp_path / "g")
    assert code == 0, err
    single = load_net(tmp_path / "g")
    assert list(single.task_modules) == ["dog.segmentation"] and not single.category_modules


# ----------------------------------------------------------------------------- 2. sizes, types


CRAFTED = {
    "huge num_convs": (lambda m: _edge(m, "cat", "dog.segmentation")["adapter"]["fields"].update(
        num_convs=10_000_000), "num_convs"),
    "num_convs over the stored": (
        lambda m: _edge(m, "cat", "dog.segmentation")["adapter"]["fields"].update(num_convs=3),
        "num_convs 3"),
    "adapter channels": (
        lambda m: _edge(m, "cat", "dog.segmentation")["adapter"]["fields"].update(channels=400),
        "channels 400"),
    "fields list": (lambda m: _task(m).update(fields=[1, 2]), "'fields' must be an object"),
    "width text": (lambda m: _category(m)["fields"].update(width="abc"), "'width'"),
    "width huge": (lambda m: _category(m)["fields"].update(width=1e9), "'width'"),
    "width not stored": (lambda m: _category(m)["fields"].update(width=1.0), "width 1.0"),
    "negative input size": (lambda m: _category(m)["input"].update(size=-3), "'input.size'"),
    "huge input size": (lambda m: _category(m)["input"].update(size=10**9), "'input.size'"),
    "task input size": (lambda m: _task(m)["fields"].update(input_size=4096), "input_size"),
    "num_outputs": (lambda m: _task(m)["fields"].update(num_outputs=1000), "num_outputs"),
    "bool field": (lambda m: _task(m)["fields"].update(num_outputs=True), "'num_outputs'"),
    "std zero": (lambda m: _category(m)["input"].update(std=[0, 1, 1]), "'input.std'"),
    "beta text": (lambda m: _edge(m, "cat", "dog.segmentation").update(beta="x"), "'beta'"),
    "beta negative": (lambda m: _edge(m, "cat", "dog.segmentation").update(beta=-1), "'beta'"),
    "edges object": (lambda m: m["spec"].update(edges={}), "'edges' must be a list"),
    "module id": (lambda m: m["spec"]["category_modules"].update({"../x": {}}), "'../x'"),
    "reorder seed": (
        lambda m: _edge(m, "cat", "dog.segmentation")["adapter"]["fields"].update(
            reorder_seed=-1), "'reorder_seed'"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_sizes_and_types_are_refused_before_any_module_is_built(net_copy, monkeypatch,
                                                                       name):
    """With a valid hash (a crafted net), bad fields still never reach a module."""
    edit, needle = CRAFTED[name]
    _edit(net_copy, edit, rehash=True)

    def built(*_, **__):
        raise AssertionError("a module was built from a bad spec")
    monkeypatch.setattr(net_io, "_structure_from_spec", built)
    monkeypatch.setattr(net_io, "expected_params", built)
    start = time.monotonic()
    with pytest.raises(NetSpecError) as caught:
        load_net(net_copy)
    message = str(caught.value)
    assert time.monotonic() - start < 5
    assert needle in message and str(net_copy / "checkpoint.json") in message, message
    assert "\n" not in message


def test_a_crafted_spec_is_one_line_on_the_command_line(net_copy, capsys):
    _edit(net_copy, CRAFTED["huge num_convs"][0], rehash=True)
    code, _, err = cli(capsys, "info", "--net", net_copy)
    assert_one_line_error(code, err, "num_convs", str(net_copy))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["config"]["model"].update(width="abc"), "'width'"),
    (lambda m: m["config"]["model"].update(image_size=-1), "'image_size'"),
    (lambda m: m["config"]["model"].update(width=0.125), "do not fit"),
    (lambda m: m.update(modules=[1, 2]), "'modules'"),
])
def test_a_teacher_checkpoints_fields_and_sizes_are_checked_before_its_params_are_read(
        small, tmp_path, capsys, monkeypatch, edit, needle):
    shutil.copytree(small["teacher"], tmp_path / "horse")
    _edit(tmp_path / "horse", edit, rehash=False)

    def never(*_, **__):
        raise AssertionError("parameters read before the metadata was checked")
    monkeypatch.setattr(checkpoint, "load_checkpoint", never)
    with pytest.raises(NetSpecError, match=needle):
        net_io.load_teacher(tmp_path / "horse")
    code, _, err = cli(capsys, "build", "--teacher", tmp_path / "horse", "--out",
                       tmp_path / "net")
    assert_one_line_error(code, err, str(tmp_path / "horse"))
    assert not (tmp_path / "net").exists()


# ----------------------------------------------------------------------------- 3. one writer


def test_a_second_writer_of_the_same_net_is_refused_in_one_line(small, tmp_path, capsys):
    lock = outputs.acquire(tmp_path / "out")
    try:
        with pytest.raises(outputs.OutputBusyError, match="being written by process"):
            export_net(small["net"], tmp_path / "out")
        code, _, err = cli(capsys, "build", "--teacher", small["teacher"], "--out",
                           tmp_path / "out")
        assert_one_line_error(code, err, "being written")
        assert not (tmp_path / "out").exists()
    finally:
        outputs.release(lock)
    export_net(small["net"], tmp_path / "out")
    assert not outputs.lock_path(tmp_path / "out").exists()


def test_a_lock_held_by_another_running_process_is_respected(small, tmp_path, capsys):
    import socket
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = outputs.lock_path(tmp_path / "out")
        lock.mkdir()
        (lock / "owner").write_text(f"{socket.gethostname()} {holder.pid}\n")
        code, _, err = cli(capsys, "export", "--net", small["dir"], "--out", tmp_path / "out")
        assert_one_line_error(code, err, f"process {holder.pid}", str(lock))
        assert lock.exists() and not (tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()


def test_only_one_of_many_simultaneous_writers_gets_the_lock(tmp_path):
    barrier, results = threading.Barrier(8), []

    def take():
        barrier.wait()
        try:
            results.append(outputs.acquire(tmp_path / "net"))
        except outputs.OutputBusyError:
            results.append(None)
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writers_lock_and_staging_folders_are_cleaned_on_the_next_write(small,
                                                                                tmp_path):
    target = tmp_path / "net"
    lock = outputs.lock_path(target)
    lock.mkdir()
    import socket
    (lock / "owner").write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    stale = [tmp_path / ".net.tmp-deadbeef", tmp_path / ".net.tmp-0badf00d"]
    for folder in stale:
        (folder / "params").mkdir(parents=True)
    export_net(small["net"], target)
    assert load_net(target).routes() == small["net"].routes()
    assert not lock.exists() and not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_a_net_a_crash_left_aside_mid_replace_is_moved_back_not_cleaned(small, tmp_path):
    export_net(small["net"], tmp_path / "net")
    (tmp_path / "net").rename(tmp_path / ".net.old-12345678")  # killed between two renames
    (tmp_path / ".net.tmp-87654321").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_net(small["net"], tmp_path / "net")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]
    assert load_net(tmp_path / "net").routes() == small["net"].routes()


def test_transplant_checks_out_before_any_training(small, tmp_path, capsys, monkeypatch):
    def never(*_, **__):
        raise AssertionError("work started before --out was checked")
    monkeypatch.setattr(operations, "transplant", never)
    monkeypatch.setattr("nettransplant.net.commands.load_teacher", never)
    monkeypatch.setattr("nettransplant.net.commands.load_net", never)
    args = ["transplant", "--net", small["dir"], "--teacher", small["teacher"], "--onto",
            "dog.segmentation", "--beta", "1", "--steps", "1"]
    code, _, err = cli(capsys, *args, "--out", small["dir"])
    assert_one_line_error(code, err, "--overwrite", "already exists")
    assert "overwrite=True" not in err
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, *args, "--out", tmp_path / "file", "--overwrite")
    assert_one_line_error(code, err, "is not a transplant net")
    code, _, err = cli(capsys, *args, "--out", tmp_path / "file" / "net")
    assert_one_line_error(code, err, "--out", "is a file")
    monkeypatch.setattr(os, "access", lambda *_: False)
    code, _, err = cli(capsys, *args, "--out", tmp_path / "new")
    assert_one_line_error(code, err, "--out", "permission denied")
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_is_one_line_and_leaves_no_lock_or_staging(small, tmp_path, capsys,
                                                               monkeypatch):
    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p.npz"))
    monkeypatch.setattr(np, "savez", full)
    code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat", "--task",
                       "cat.segmentation", "--images", small["npz"], "--out", tmp_path / "p.npz")
    assert_one_line_error(code, err, "disk is full", "p.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    code, _, err = cli(capsys, "export", "--net", small["dir"], "--out", tmp_path / "n")
    assert_one_line_error(code, err, "disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. images


def write_png(path: Path, array: np.ndarray, bit_depth: int, color_type: int,
              palette: np.ndarray | None = None, size: tuple[int, int] | None = None) -> None:
    """A PNG of any bit depth and colour type (``size``: a header that lies about it)."""
    a = np.asarray(array)
    height, width = a.shape[:2]
    rows = a.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    w, h = size or (width, height)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth,
                                                            color_type, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _formats(rgb: np.ndarray):
    """``{name: (writer args, expected uint8 RGB)}`` of one image in every PNG format."""
    gray8 = rgb[..., 0]
    gray16 = gray8.astype(np.uint16) * 256 + 100  # high byte: the 8-bit value
    rgb16 = rgb.astype(np.uint16) * 256 + 100
    alpha = np.full(gray8.shape, 77, np.uint8)
    palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    expect_gray = np.repeat(gray8[..., None], 3, axis=-1)
    return {
        "gray8": ((gray8, 8, 0), expect_gray),
        "gray16": ((gray16, 16, 0), expect_gray),
        "gray_alpha8": ((np.stack([gray8, alpha], -1), 8, 4), expect_gray),
        "gray_alpha16": ((np.stack([gray16, gray16], -1), 16, 4), expect_gray),
        "rgb8": ((rgb, 8, 2), rgb),
        "rgb16": ((rgb16, 16, 2), rgb),
        "rgba8": ((np.concatenate([rgb, alpha[..., None]], -1), 8, 6), rgb),
        "rgba16": ((np.concatenate([rgb16, rgb16[..., :1]], -1), 16, 6), rgb),
        "palette": ((gray8, 8, 3, palette), palette[gray8]),
    }


@pytest.mark.parametrize("name", sorted(_formats(np.zeros((2, 2, 3), np.uint8))))
def test_every_png_format_decodes_to_the_rgb_uint8_the_net_expects(small, tmp_path, name):
    rgb = small["images"][0]
    args, expected = _formats(rgb)[name]
    folder = tmp_path / "pngs"
    folder.mkdir()
    write_png(folder / "a.png", *args)
    write_png(folder / "b.png", *args)
    images = net_images.read_images(folder)
    assert images.dtype == np.uint8 and images.shape == (2, SIDE, SIDE, 3)
    np.testing.assert_array_equal(images[0], expected)
    np.testing.assert_array_equal(net_images.read_images(folder / "a.png")[0], expected)


@pytest.mark.parametrize("name", ["gray", "gray_channel", "gray16", "rgba", "rgb16"])
def test_npz_images_of_every_layout_decode_alike(small, tmp_path, name):
    rgb = small["images"]
    stored = {"gray": rgb[..., 0], "gray_channel": rgb[..., :1],
              "gray16": rgb[..., 0].astype(np.uint16) * 257,
              "rgba": np.concatenate([rgb, rgb[..., :1]], -1),
              "rgb16": rgb.astype(np.uint16) * 256 + 255}[name]
    expected = np.repeat(rgb[..., :1], 3, -1) if name.startswith("gray") else rgb
    np.savez(tmp_path / "x.npz", images=stored)
    np.testing.assert_array_equal(net_images.read_images(tmp_path / "x.npz"), expected)


def test_a_16_bit_png_folder_predicts_like_its_8_bit_npz(small, tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(small["images"]):
        write_png(folder / f"{i}.png", image.astype(np.uint16) * 257, 16, 2)
    for name, images in (("png", folder), ("npz", small["npz"])):
        code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat",
                           "--task", "cat.segmentation", "--images", images,
                           "--out", tmp_path / f"{name}.npz")
        assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "png.npz")["masks"],
                                  np.load(tmp_path / "npz.npz")["masks"])


def test_a_decompression_bomb_is_refused_from_its_header_within_seconds(small, tmp_path,
                                                                       capsys):
    folder = tmp_path / "bomb"
    folder.mkdir()
    write_png(folder / "bomb.png", np.zeros((1, 1), np.uint8), 8, 0, size=(100_000, 100_000))
    start = time.monotonic()
    code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat", "--task",
                       "cat.segmentation", "--images", folder, "--out", tmp_path / "p.npz")
    assert time.monotonic() - start < 10
    assert_one_line_error(code, err, "bomb.png", f"{net_images.MAX_IMAGE_PIXELS:,}")
    assert not (tmp_path / "p.npz").exists()


def _npz_with_header(path: Path, shape: tuple, payload: bytes) -> None:
    """An .npz whose ``images`` header declares ``shape`` uint8 but holds ``payload``."""
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + payload)


@pytest.mark.parametrize("shape, needle", [
    ((10**6, 4096, 4096, 3), "over the limit"),
    ((1, 10**5, 10**5, 3), "pixels"),
    ((5, SIDE, SIDE, 3), "truncated"),
])
def test_an_npz_header_claiming_an_absurd_size_is_refused_before_allocation(
        small, tmp_path, capsys, shape, needle):
    _npz_with_header(tmp_path / "lie.npz", shape, b"\0" * 100)
    start = time.monotonic()
    code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat", "--task",
                       "cat.segmentation", "--images", tmp_path / "lie.npz",
                       "--out", tmp_path / "p.npz")
    assert time.monotonic() - start < 10
    assert_one_line_error(code, err, "lie.npz", needle)


@pytest.mark.parametrize("case", ["empty npz", "empty folder", "plain npy", "not a zip"])
def test_no_images_or_unreadable_input_is_one_line(small, tmp_path, capsys, case):
    path = tmp_path / "in"
    if case == "empty npz":
        path = path.with_suffix(".npz")
        np.savez(path, images=np.zeros((0, SIDE, SIDE, 3), np.uint8))
    elif case == "empty folder":
        path.mkdir()
    elif case == "plain npy":
        path = path.with_suffix(".npz")
        with open(path, "wb") as f:
            np.save(f, small["images"])
    else:
        path.write_text("hello")
    code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat", "--task",
                       "cat.segmentation", "--images", path, "--out", tmp_path / "p.npz")
    assert_one_line_error(code, err, str(path))


def test_overlays_on_a_classification_module_are_refused_before_writing(small, tmp_path,
                                                                        capsys):
    code, _, err = cli(capsys, "predict", "--net", small["dir"], "--category", "cat", "--task",
                       "cat.classification", "--images", small["npz"], "--out",
                       tmp_path / "p.npz", "--overlays", tmp_path / "overlays")
    assert_one_line_error(code, err, "--overlays", "classification")
    assert sorted(tmp_path.iterdir()) == []


def test_a_reused_overlays_folder_keeps_no_stale_panels(small, tmp_path, capsys):
    args = ["predict", "--net", small["dir"], "--category", "cat", "--task", "dog.segmentation",
            "--out", tmp_path / "p.npz", "--overlays", tmp_path / "overlays"]
    assert cli(capsys, *args, "--images", small["npz"])[0] == 0
    assert len(list((tmp_path / "overlays").iterdir())) == 4
    np.savez(tmp_path / "two.npz", images=small["images"][:2])
    assert cli(capsys, *args, "--images", tmp_path / "two.npz")[0] == 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["00000.png",
                                                                         "00001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays", "p.npz", "two.npz"]
    (tmp_path / "overlays" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *args, "--images", small["npz"])
    assert_one_line_error(code, err, "--overlays", "not a folder of overlay panels")
    assert (tmp_path / "overlays" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 5. arguments


@pytest.mark.parametrize("args, needle", [
    (["transplant", "--beta", "0"], "--beta"),
    (["transplant", "--beta", "-1"], "--beta"),
    (["transplant", "--beta", "nan"], "--beta"),
    (["transplant", "--beta", "inf"], "--beta"),
    (["transplant", "--beta", "abc"], "--beta"),
    (["transplant", "--beta", "1", "--steps", "0"], "--steps"),
    (["transplant", "--beta", "1", "--seed", "-1"], "--seed"),
    (["connect", "--beta", "0"], "--beta"),
    (["samples", "--num", "0"], "--num"),
    (["samples", "--num", "x"], "--num"),
])
def test_bad_numbers_are_one_line_before_anything_runs(tmp_path, capsys, args, needle):
    common = {"transplant": ["--net", "n", "--teacher", "t", "--onto", "o", "--out", "x"],
              "connect": ["--net", "n", "--category", "c", "--task_module", "t", "--out", "x"],
              "samples": ["--category", "cat", "--task", "segmentation", "--out", "x.npz"]}
    with pytest.raises(SystemExit) as exit_:
        net_cli.main([*args, *common[args[0]]])
    err = capsys.readouterr().err
    assert_one_line_error(exit_.value.code, err, needle)


@pytest.mark.parametrize("task_module, field, bad", [
    ("cat.classification", "labels", np.array([0, 1, 2, 1])),
    ("cat.classification", "labels", np.array([0, -1, 0, 1])),
    ("cat.classification", "labels", np.array([0.0, 1.0, 0.5, 1.0])),
    ("cat.segmentation", "masks", np.full((4, SIDE, SIDE), 7)),
])
def test_labels_outside_the_task_modules_classes_are_refused_before_training(
        small, tmp_path, capsys, monkeypatch, task_module, field, bad):
    def never(*_, **__):
        raise AssertionError("training started")
    monkeypatch.setattr(operations, "connect", never)
    np.savez(tmp_path / "s.npz", images=small["images"], **{field: bad})
    code, _, err = cli(capsys, "connect", "--net", small["dir"], "--category", "dog",
                       "--task_module", task_module, "--samples", tmp_path / "s.npz",
                       "--beta", "1", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "s.npz", f"'{field}'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["add-task", "--name", "dog.classification", "--task", "classification",
      "--data", "cat={npz}"], "already has"),
    (["add-task", "--name", "../bad", "--task", "classification", "--data", "cat={npz}"],
     "not valid"),
    (["add-task", "--name", "new", "--task", "classification", "--data", "cat"],
     "CATEGORY=FILE.npz"),
    (["connect", "--category", "cat", "--task_module", "dog.segmentation", "--beta", "1"],
     "already connected"),
    (["transplant", "--teacher", "{teacher}", "--onto", "dog.classification"], "--beta"),
])
def test_names_and_routes_are_checked_before_training(small, tmp_path, capsys, monkeypatch,
                                                      args, needle):
    def never(*_, **__):
        raise AssertionError("training started")
    for operation in ("add_task", "connect", "transplant"):
        monkeypatch.setattr(operations, operation, never)
    args = [a.format(npz=small["npz"], teacher=small["teacher"]) for a in args]
    code, _, err = cli(capsys, *args, "--net", small["dir"], "--out", tmp_path / "out")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()
