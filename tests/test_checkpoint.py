"""Checkpoints round-trip parameters and metadata, and writes are atomic."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nettransplant.training import checkpoint, resumable
from nettransplant.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "category_module": {"conv1_1": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 4)),
                                                              jnp.float32),
                                        "bias": np.zeros(4, np.float32)}},
        "classification_module": {"fc8": {"kernel": jnp.full((1, 1, 4, 2), seed, jnp.float32),
                                          "bias": jnp.arange(2, dtype=jnp.int32)}},
    }


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_returns_params_and_metadata(tmp_path):
    params = _params(1)
    metadata = {"architecture": "vgg16", "num_outputs": 2, "verified": [{"max": 1e-6}],
                "seed": None}
    written = save_checkpoint(tmp_path / "ckpt", params, metadata)
    assert written == (tmp_path / "ckpt").absolute()
    restored, restored_metadata = load_checkpoint(tmp_path / "ckpt")
    _assert_trees_equal(restored, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert restored_metadata == metadata
    assert checkpoint.load_metadata(tmp_path / "ckpt") == metadata


def test_relative_paths_and_missing_parents_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint("runs/a/ckpt", _params(0), {})
    restored, _ = load_checkpoint("runs/a/ckpt")
    _assert_trees_equal(restored, _params(0))


def test_target_restores_structures_with_empty_nodes(tmp_path):
    opt_state = optax.adam(1e-3).init(_params(2))
    save_checkpoint(tmp_path / "opt", opt_state, {"step": 3})
    restored, metadata = load_checkpoint(tmp_path / "opt", target=opt_state)
    _assert_trees_equal(restored, opt_state)
    assert metadata == {"step": 3}


def test_target_of_the_wrong_shape_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(2)}, {})
    with pytest.raises(CheckpointError, match=r"does not match .*w is \(2,\) float32, "
                                              r"expected \(3,\) float32"):
        load_checkpoint(tmp_path / "ckpt", target={"w": jnp.zeros(3)})
    with pytest.raises(CheckpointError, match="missing v .*unexpected w"):
        load_checkpoint(tmp_path / "ckpt", target={"v": jnp.zeros(2)})


def test_existing_checkpoint_is_kept_unless_overwrite(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _params(1), {"version": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "ckpt", _params(2), {"version": 2})
    save_checkpoint(tmp_path / "ckpt", _params(2), {"version": 2}, overwrite=True)
    restored, metadata = load_checkpoint(tmp_path / "ckpt")
    _assert_trees_equal(restored, _params(2))
    assert metadata == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a nettransplant checkpoint"):
        save_checkpoint(tmp_path / "data", _params(0), {}, overwrite=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep"


def test_failure_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", _params(1), {"version": 1})

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", _params(2), {"version": 2}, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "fresh", _params(2), {"version": 2})
    monkeypatch.undo()

    restored, metadata = load_checkpoint(tmp_path / "ckpt")
    _assert_trees_equal(restored, _params(1))
    assert metadata == {"version": 1}
    # No half-written checkpoint and no temporary directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failure_while_swapping_in_restores_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", _params(1), {"version": 1})
    real_rename = checkpoint.os.rename
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # the two-rename path

    def rename(src, dst):
        if ".tmp-" in str(src):  # the staged new checkpoint moving into place
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path / "ckpt", _params(2), {"version": 2}, overwrite=True)
    monkeypatch.undo()
    restored, metadata = load_checkpoint(tmp_path / "ckpt")
    _assert_trees_equal(restored, _params(1))
    assert metadata == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="'array'"):
        save_checkpoint(tmp_path / "ckpt", _params(0), {"ok": 1, "array": np.zeros(2)})
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint(tmp_path / "ckpt", _params(0), [("a", 1)])  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt").exists()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "file")


def test_corrupt_metadata_and_params_are_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _params(0), {"a": 1})
    meta = tmp_path / "ckpt" / checkpoint.METADATA_FILE
    record = json.loads(meta.read_text())

    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*checkpoint.json"):
        load_checkpoint(tmp_path / "ckpt")

    meta.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path / "ckpt")

    meta.write_text(json.dumps(record))
    for path in (tmp_path / "ckpt" / checkpoint.PARAMS_DIR).iterdir():
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*params"):
        load_checkpoint(tmp_path / "ckpt")


def _largest_param_file(directory):
    files = [p for p in (directory / checkpoint.PARAMS_DIR).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_flipped_bytes_in_a_param_file_are_a_named_error(tmp_path):
    big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)}
    save_checkpoint(tmp_path / "ckpt", big, {"a": 1})
    victim = _largest_param_file(tmp_path / "ckpt")
    raw = bytearray(victim.read_bytes())
    middle = len(raw) // 2
    raw[middle: middle + 64] = bytes(b ^ 0xFF for b in raw[middle: middle + 64])
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as error:
        load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(error.value)


def test_the_content_hash_is_recorded_and_independent_of_container_types(tmp_path):
    params = _params(3)
    save_checkpoint(tmp_path / "ckpt", params, {})
    record = json.loads((tmp_path / "ckpt" / checkpoint.METADATA_FILE).read_text())
    assert record["params_sha256"] == checkpoint.tree_digest(params)
    restored, _ = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.tree_digest(restored) == record["params_sha256"]
    changed = jax.tree.map(lambda a: a, params)
    changed["classification_module"]["fc8"]["kernel"] = jnp.zeros((1, 1, 4, 2))
    assert checkpoint.tree_digest(changed) != record["params_sha256"]


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _params(1), {"version": 1})
    # What a kill between "move the old one aside" and "move the new one in" leaves.
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-1234abcd")
    (tmp_path / ".ckpt.tmp-1234abcd").mkdir()
    removed = checkpoint.clean_stale(tmp_path / "ckpt")
    assert [p.name for p in removed] == [".ckpt.tmp-1234abcd"]
    restored, metadata = load_checkpoint(tmp_path / "ckpt")
    _assert_trees_equal(restored, _params(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replacing_never_leaves_the_directory_missing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", _params(1), {"version": 1})
    seen = []
    real_rmtree = checkpoint.shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        seen.append(checkpoint.is_checkpoint(tmp_path / "ckpt"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", watching_rmtree)
    save_checkpoint(tmp_path / "ckpt", _params(2), {"version": 2}, overwrite=True)
    assert seen and all(seen)
    _assert_trees_equal(load_checkpoint(tmp_path / "ckpt")[0], _params(2))


def test_directories_are_exchanged_atomically_on_linux(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    assert checkpoint._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_a_resumable_state_names_the_configuration_that_saved_it(tmp_path):
    saved = resumable.TrainingCheckpoints(tmp_path / "t.partial", "abc")
    assert saved.stored_fingerprint() is None
    state = {"step": jnp.asarray(3), "params": {"w": jnp.ones(3)}}
    saved.save(3, state, [{"loss": 1.0}])
    saved.close()
    assert resumable.TrainingCheckpoints(tmp_path / "t.partial", "other").stored_fingerprint() \
        == "abc"
    restored, history = resumable.TrainingCheckpoints(tmp_path / "t.partial", "abc").restore(
        state)
    assert history == [{"loss": 1.0}]
    with pytest.raises(checkpoint.CheckpointError, match="another configuration"):
        resumable.TrainingCheckpoints(tmp_path / "t.partial", "other").restore(state)
