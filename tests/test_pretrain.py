"""The shipped backbone: written and read back exactly, checked, never unpickled, and used by
the teacher zoo only when it was trained with the configuration asked for."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest

from nettransplant.configs import silhouettes
from nettransplant.data import benchmarks
from nettransplant.experiments import pretrain
from nettransplant.experiments.zoo import TeacherZoo
from nettransplant.runtime.files import file_sha256
from nettransplant.training import teachers


def tree(seed: int = 0, shape=(3, 3, 2, 4)):
    rng = np.random.default_rng(seed)
    return {"conv1_1": {"kernel": rng.standard_normal(shape).astype(np.float32),
                        "bias": rng.standard_normal(shape[-1:]).astype(np.float32)},
            "fc8": {"kernel": rng.standard_normal((4, 10)).astype(np.float32)}}


def test_a_shipped_backbone_reads_back_bit_identical_with_its_record(tmp_path):
    params = tree()
    record = pretrain.save_backbone(params, {"fingerprint": "abc", "metrics": {"x": 1.0}},
                                    tmp_path)
    assert record["num_params"] == 3 * 3 * 2 * 4 + 4 + 40
    assert record["params_sha256"] == file_sha256(tmp_path / f"{pretrain.NAME}.npz")
    loaded, again = pretrain.load_backbone(tree(1), tmp_path)
    assert again == record == pretrain.read_record(tmp_path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert not list(tmp_path.glob("*.tmp*"))  # written in one rename each


def test_no_record_is_none_and_a_record_without_fingerprint_is_refused(tmp_path):
    assert pretrain.read_record(tmp_path) is None
    with pytest.raises(pretrain.ShippedBackboneError, match="no shipped backbone"):
        pretrain.load_backbone(tree(), tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        pretrain.save_backbone(tree(), {}, tmp_path)
    (tmp_path / f"{pretrain.NAME}.json").write_text("[1, 2]")
    with pytest.raises(pretrain.ShippedBackboneError, match="not a backbone record"):
        pretrain.read_record(tmp_path)
    (tmp_path / f"{pretrain.NAME}.json").write_text("{broken")
    with pytest.raises(pretrain.ShippedBackboneError, match="unreadable"):
        pretrain.read_record(tmp_path)


def test_a_changed_byte_fails_the_sha256_check(tmp_path):
    pretrain.save_backbone(tree(), {"fingerprint": "abc"}, tmp_path)
    weights = tmp_path / f"{pretrain.NAME}.npz"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(pretrain.ShippedBackboneError, match=r"SHA-256 .* does not match"):
        pretrain.load_backbone(tree(), tmp_path)


@pytest.mark.parametrize("template, message", [
    (tree(shape=(3, 3, 2, 8)), r"parameter 'conv1_1/bias' has shape \(4,\), the model \(8,\)"),
    ({**tree(), "fc9": {"kernel": np.zeros(2)}}, r"parameter 'fc9/kernel' is missing"),
    ({"conv1_1": tree()["conv1_1"]}, r"parameter 'fc8/kernel' is not in the model"),
])
def test_parameters_of_another_model_are_named(tmp_path, template, message):
    pretrain.save_backbone(tree(), {"fingerprint": "abc"}, tmp_path)
    with pytest.raises(pretrain.ShippedBackboneError, match=message):
        pretrain.load_backbone(template, tmp_path)


def test_a_weights_file_holding_pickled_objects_is_refused_even_with_a_matching_hash(tmp_path):
    """A weights file never executes code: object arrays need pickle, which is off."""
    buffer = io.BytesIO()
    np.savez(buffer, **{"conv1_1/kernel": np.array([{"evil": 1}], dtype=object)})
    weights = tmp_path / f"{pretrain.NAME}.npz"
    weights.write_bytes(buffer.getvalue())
    (tmp_path / f"{pretrain.NAME}.json").write_text(json.dumps(
        {"fingerprint": "abc", "params_sha256": file_sha256(weights)}))
    with pytest.raises(pretrain.ShippedBackboneError, match="unreadable"):
        pretrain.load_backbone(tree(), tmp_path)


@pytest.fixture(scope="module")
def quick_zoo_parts(tmp_path_factory):
    config = silhouettes.get_config("quick")
    bench = benchmarks.make_benchmark(config)
    return config, bench


def test_the_zoo_uses_a_matching_shipped_backbone_and_trains_a_mismatched_one(
        quick_zoo_parts, tmp_path, monkeypatch, capsys):
    config, bench = quick_zoo_parts
    shipped = tmp_path / "shipped"
    zoo = TeacherZoo(config, tmp_path / "w1", bench, False, log_metrics=False)
    trained = zoo.backbone()  # trains (quick: 10 steps): nothing shipped here
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", shipped)
    pretrain.save_backbone(trained, {"fingerprint": zoo.backbone_fingerprint(),
                                     "metrics": {"accuracy_10way": 1.0}, "history": [],
                                     "pretrain": {"num_steps": 10}}, shipped)

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone was trained although a matching one is shipped")

    with monkeypatch.context() as m:
        m.setattr(teachers, "train_teacher", forbidden)
        zoo2 = TeacherZoo(config, tmp_path / "w2", bench, False, log_metrics=False)
        loaded = zoo2.backbone()
    assert "the shipped one" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert zoo2.metrics["backbone"] == {"accuracy_10way": 1.0}

    # Another configuration (here: one more pre-training step) trains its own.
    other = silhouettes.get_config("quick")
    other.pretrain.num_steps = 11
    zoo3 = TeacherZoo(other, tmp_path / "w3", bench, False, log_metrics=False)
    assert zoo3.backbone_fingerprint() != zoo.backbone_fingerprint()
    zoo3.backbone()
    assert "trained with another configuration" in capsys.readouterr().err
    assert zoo3.trained == ["backbone"]

    # shipped=False trains even when the shipped one matches.
    off = silhouettes.get_config("quick")
    off.pretrain.shipped = False
    zoo4 = TeacherZoo(off, tmp_path / "w4", bench, False, log_metrics=False)
    assert zoo4.backbone_fingerprint() == zoo.backbone_fingerprint()
    zoo4.backbone()
    assert zoo4.trained == ["backbone"]
