"""Torchvision VGG-16 conversion reproduces PyTorch's logits; malformed state dicts are refused.

The PyTorch reference is built with torchvision's exact module layout (torchvision
itself is not needed) and random weights with non-zero biases.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

from launch import convert_torchvision
from nettransplant.core import modules
from nettransplant.interop import state_dicts, torch_check, vgg16
from nettransplant.training import checkpoint

try:  # the "torch" extra; without it these tests are skipped (conftest.py), not broken
    import torch
    from torch import nn
except ImportError:
    torch = nn = None

pytestmark = pytest.mark.torch

# torchvision.models.vgg16().state_dict().keys(), in order.
TORCHVISION_VGG16_KEYS = [
    f"{prefix}.{i}.{p}"
    for prefix, indices in (("features", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
                            ("classifier", (0, 3, 6)))
    for i in indices for p in ("weight", "bias")
]
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def torch_vgg16() -> nn.Module:
    """PyTorch VGG-16, He-normal weights and N(0, 0.1) biases, eval mode."""
    torch.manual_seed(0)
    model = torch_check.torch_vgg16()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def state_dict(torch_vgg16) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_vgg16.state_dict().items()}


@pytest.fixture(scope="module")
def converted(torch_vgg16):
    return vgg16.load_torchvision_vgg16(torch_vgg16.state_dict())


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("weights") / "vgg16.safetensors"
    save_file(state_dict, str(path))
    return path


def _zeros(*shape: int) -> np.ndarray:
    """A read-only all-zero array of ``shape`` that allocates no memory."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differences(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    max_abs = float(np.max(np.abs(actual - expected)))
    return max_abs, max_abs / float(np.max(np.abs(expected)))


# --------------------------------------------------------------------------- layout


def test_reference_network_has_torchvisions_module_layout(torch_vgg16):
    assert list(torch_vgg16.state_dict()) == TORCHVISION_VGG16_KEYS
    features = torch_vgg16.features
    assert len(features) == 31
    for i, m in enumerate(features):
        if i in (4, 9, 16, 23, 30):
            assert isinstance(m, nn.MaxPool2d) and m.kernel_size == 2 and m.stride == 2
        elif f"features.{i}.weight" in TORCHVISION_VGG16_KEYS:
            assert isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.padding == (1, 1)
        else:
            assert isinstance(m, nn.ReLU) and m.inplace
    assert isinstance(torch_vgg16.avgpool, nn.AdaptiveAvgPool2d)
    assert torch_vgg16.avgpool.output_size == (7, 7)
    assert [type(m) for m in torch_vgg16.classifier] == [
        nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    shapes = {k: tuple(v.shape) for k, v in torch_vgg16.state_dict().items()}
    assert shapes == vgg16.torchvision_vgg16_shapes()
    assert shapes["classifier.0.weight"] == (4096, 25088)


def test_feature_indices_of_plain_and_batch_norm_vgg16():
    assert [i for _, i in vgg16.vgg16_conv_names()] == [
        0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert vgg16.vgg_feature_indices((2, 2, 3, 3, 3), batch_norm=True) == (
        0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
    assert [n for n, _ in vgg16.vgg16_conv_names()][:3] == ["conv1_1", "conv1_2", "conv2_1"]


def test_fc6_kernel_follows_pytorchs_chw_flatten_order():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)  # (B, C, H, W)
    weight = rng.standard_normal((5, 3 * 4 * 4)).astype(np.float32)
    expected = torch.flatten(torch.from_numpy(features), 1).numpy() @ weight.T
    kernel = vgg16.fc6_kernel_from_torch(weight, channels=3, size=4)
    assert kernel.shape == (4, 4, 3, 5)
    actual = np.einsum("bhwc,hwco->bo", features.transpose(0, 2, 3, 1), kernel)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_converted_params_have_the_teachers_structure(converted):
    model, params = converted
    expected = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), expected["params"])
    cls = params["classification_module"]
    assert cls["fc6"]["kernel"].shape == (7, 7, 512, 4096)
    assert cls["fc7"]["kernel"].shape == (1, 1, 4096, 4096)
    assert cls["fc8"]["kernel"].shape == (1, 1, 4096, 1000)
    assert set(params["category_module"]) == {"conv1_1", "conv1_2"}


# --------------------------------------------------------------------------- equivalence


def test_logits_equal_torchvision_vgg16_at_224(converted, torch_vgg16):
    model, params = converted
    images = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_vgg16(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    actual = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
    assert actual.shape == expected.shape == (2, 1000)
    max_abs, max_rel = _differences(actual, expected)
    print(f"224²: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}")
    assert max_rel < RELATIVE_TOLERANCE
    # The images reach the logits (they are not just fc8's bias): the two differ.
    assert np.max(np.abs(expected[0] - expected[1])) > 100 * max_abs


def test_enlarged_input_gives_the_conv_ified_pytorch_score_map(converted, torch_vgg16):
    model, params = converted
    images = np.random.default_rng(2).standard_normal((1, 288, 288, 3)).astype(np.float32)
    fully_convolutional = torch_check.torch_vgg16_fully_convolutional(torch_vgg16)
    with torch.no_grad():
        nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        expected = fully_convolutional(nchw).numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
    assert actual.shape == expected.shape == (1, 3, 3, 1000)
    max_abs, max_rel = _differences(actual, expected)
    print(f"288² (S=3): max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}")
    assert max_rel < RELATIVE_TOLERANCE
    assert np.max(np.abs(expected[0, 0, 0] - expected[0, 2, 2])) > 100 * max_abs


# --------------------------------------------------------------------------- sources


def test_safetensors_file_is_read_without_torch(safetensors_file, converted, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    _, params = vgg16.load_torchvision_vgg16(safetensors_file)
    monkeypatch.undo()
    _assert_trees_equal(params, converted[1])


def test_pth_file_gives_the_same_params(tmp_path, torch_vgg16, converted):
    path = tmp_path / "vgg16-random.pth"
    torch.save(torch_vgg16.state_dict(), path)
    _, from_pth = vgg16.load_torchvision_vgg16(path)
    _assert_trees_equal(from_pth, converted[1])


def test_pth_file_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "vgg16.pth"
    path.write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        vgg16.load_torchvision_vgg16(path)


def test_data_parallel_module_prefix_is_stripped(state_dict, converted):
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    _, params = vgg16.load_torchvision_vgg16(prefixed)
    _assert_trees_equal(params, converted[1])


# --------------------------------------------------------------------------- malformed


def test_missing_unexpected_and_misshaped_keys_are_all_listed(state_dict):
    broken = dict(state_dict)
    del broken["features.0.bias"], broken["classifier.3.weight"]
    broken["classifier.7.weight"] = _zeros(3)
    broken["features.5.weight"] = _zeros(128, 64, 5, 5)
    broken["classifier.0.weight"] = _zeros(4096, 512)
    with pytest.raises(ValueError) as error:
        vgg16.load_torchvision_vgg16(broken)
    message = str(error.value)
    assert "not a torchvision vgg16 state dict" in message
    assert "missing keys (2): features.0.bias; classifier.3.weight" in message
    assert "unexpected keys (1): classifier.7.weight" in message
    assert "features.5.weight has shape (128, 64, 5, 5), expected (128, 64, 3, 3)" in message
    assert "classifier.0.weight has shape (4096, 512), expected (4096, 25088)" in message


@pytest.mark.parametrize("problem, match", [
    ("missing", r"missing keys \(1\): features.28.bias"),
    ("unexpected", r"unexpected keys \(1\): features.28.extra"),
    ("misshaped", r"features.0.weight has shape \(64, 1, 3, 3\), expected \(64, 3, 3, 3\)"),
    ("head bias", r"classifier.6.bias has shape \(10,\), expected \(1000,\)"),
    ("integer", r"non-floating keys \(1\): features.0.bias \(int64\)"),
])
def test_each_malformed_key_is_named(state_dict, problem, match):
    broken = dict(state_dict)
    if problem == "missing":
        del broken["features.28.bias"]
    elif problem == "unexpected":
        broken["features.28.extra"] = _zeros(1)
    elif problem == "misshaped":
        broken["features.0.weight"] = _zeros(64, 1, 3, 3)
    elif problem == "head bias":
        broken["classifier.6.bias"] = _zeros(10)
    else:
        broken["features.0.bias"] = np.zeros(64, np.int64)
    with pytest.raises(ValueError, match=match):
        vgg16.load_torchvision_vgg16(broken)


def _torchvision_vgg_shapes(convs_per_block, batch_norm: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's vgg11/13/16/19(_bn) state dicts."""
    shapes: dict[str, tuple[int, ...]] = {}
    indices = iter(vgg16.vgg_feature_indices(convs_per_block, batch_norm=batch_norm))
    c = 3
    for channels, n in zip((64, 128, 256, 512, 512), convs_per_block):
        for _ in range(n):
            i = next(indices)
            shapes[f"features.{i}.weight"] = (channels, c, 3, 3)
            shapes[f"features.{i}.bias"] = (channels,)
            if batch_norm:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"features.{i + 1}.{p}"] = (channels,)
                shapes[f"features.{i + 1}.num_batches_tracked"] = ()
            c = channels
    for i, (out, inp) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        shapes[f"classifier.{i}.weight"] = (out, inp)
        shapes[f"classifier.{i}.bias"] = (out,)
    return shapes


RESNET18_SHAPES = {
    "conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3), "layer4.1.conv2.weight": (512, 512, 3, 3),
    "fc.weight": (1000, 512), "fc.bias": (1000,),
}
ALEXNET_SHAPES = {
    "features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
    "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
    "features.10.weight": (256, 256, 3, 3), "classifier.1.weight": (4096, 9216),
    "classifier.4.weight": (4096, 4096), "classifier.6.weight": (1000, 4096),
}


@pytest.mark.parametrize("architecture, shapes", [
    ("vgg16_bn", _torchvision_vgg_shapes((2, 2, 3, 3, 3), batch_norm=True)),
    ("vgg11", _torchvision_vgg_shapes((1, 1, 2, 2, 2), batch_norm=False)),
    ("vgg13_bn", _torchvision_vgg_shapes((2, 2, 2, 2, 2), batch_norm=True)),
    ("vgg19", _torchvision_vgg_shapes((2, 2, 4, 4, 4), batch_norm=False)),
    ("resnet", RESNET18_SHAPES),
    ("alexnet", ALEXNET_SHAPES),
])
def test_other_architectures_are_refused_by_name(architecture, shapes):
    state = {k: _zeros(*s) for k, s in shapes.items()}
    assert vgg16.detect_architecture(shapes) == architecture
    with pytest.raises(ValueError, match=f"holds a torchvision {architecture} state dict; "
                                         "only vgg16 \\(without batch norm\\)"):
        vgg16.load_torchvision_vgg16(state)


def test_vgg16_bn_refusal_explains_the_batch_norm_layout():
    state = {k: _zeros(*s) for k, s in _torchvision_vgg_shapes((2, 2, 3, 3, 3), True).items()}
    with pytest.raises(ValueError, match="running statistics.*plain vgg16 weights"):
        vgg16.load_torchvision_vgg16(state)


def test_vgg16_layout_is_detected(state_dict):
    shapes = {k: v.shape for k, v in state_dict.items()}
    assert vgg16.detect_architecture(shapes) == "vgg16"
    assert vgg16.detect_architecture({"foo.weight": (3, 3)}) is None


def test_unrecognised_state_dict_lists_every_expected_key():
    with pytest.raises(ValueError, match=r"(?s)missing keys \(32\).*unexpected keys \(1\): foo"):
        vgg16.load_torchvision_vgg16({"foo": _zeros(2)})


def test_a_wrapped_checkpoint_is_unwrapped(state_dict, converted):
    _, params = vgg16.load_torchvision_vgg16({"state_dict": dict(state_dict),
                                              "epoch": _zeros(1)})
    _assert_trees_equal(params, converted[1])
    _, params = vgg16.load_torchvision_vgg16({"model": {"weights": dict(state_dict)}})
    _assert_trees_equal(params, converted[1])


def test_bad_files_are_clear_errors(tmp_path, state_dict):
    with pytest.raises(FileNotFoundError, match="no weights file at .*absent.pth"):
        vgg16.load_torchvision_vgg16(tmp_path / "absent.pth")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="cannot read .*corrupt.safetensors as a safetensors"):
        vgg16.load_torchvision_vgg16(bad)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read .*corrupt.pth as a PyTorch state dict"):
        vgg16.load_torchvision_vgg16(bad)
    with pytest.raises(TypeError, match="got int"):
        vgg16.load_torchvision_vgg16(3)  # type: ignore[arg-type]


class _RecordingSafeOpen:
    """``safetensors.safe_open`` that records which tensors' data were loaded."""

    loaded: list[str] = []
    safe_open = safetensors.safe_open  # the library's, before the fixture replaces it

    def __init__(self, *args, **kwargs):
        self._file = type(self).safe_open(*args, **kwargs)

    def __enter__(self):
        self._handle = self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name):
        return self._handle.get_slice(name)

    def get_tensor(self, name):
        type(self).loaded.append(name)
        return self._handle.get_tensor(name)


@pytest.fixture
def recording_safe_open(monkeypatch):
    monkeypatch.setattr(_RecordingSafeOpen, "loaded", [])
    monkeypatch.setattr(state_dicts.safetensors, "safe_open", _RecordingSafeOpen)
    return _RecordingSafeOpen


def _write_safetensors_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_safetensors_layout_is_refused_before_its_data_is_loaded(tmp_path,
                                                                    recording_safe_open):
    path = tmp_path / "partial.safetensors"
    save_file({"module.features.0.weight": np.zeros((64, 3, 3, 3), np.float32),
               "module.features.0.bias": np.zeros(64, np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"partial\.safetensors is not a torchvision vgg16 "
                                         r"state dict: missing keys \(30\)"):
        vgg16.load_torchvision_vgg16(path)
    assert recording_safe_open.loaded == []
    # The check sees the names (prefix stripped), shapes and read dtypes; the data follow.
    seen = {}
    state, _ = state_dicts.read_state_dict(path, check=lambda layout, origin: seen.update(
        {k: (v.shape, v.dtype) for k, v in layout.items()}))
    assert seen == {"features.0.weight": ((64, 3, 3, 3), np.float32),
                    "features.0.bias": ((64,), np.float32)}
    assert sorted(recording_safe_open.loaded) == sorted(f"module.{k}" for k in seen)
    assert sorted(state) == sorted(seen)


def test_an_unreadable_safetensors_dtype_is_refused_before_any_data_is_loaded(
        tmp_path, recording_safe_open):
    path = tmp_path / "fp8.safetensors"
    _write_safetensors_header(path, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [8, 12]}}, bytes(12))
    with pytest.raises(ValueError, match=r"^cannot read .*fp8\.safetensors as a safetensors "
                                         r"file: tensor 'b' has dtype F8_E4M3, which cannot "
                                         r"be read exactly"):
        state_dicts.read_state_dict(path)
    assert recording_safe_open.loaded == []


def test_a_tensor_named_twice_is_refused(tmp_path):
    # safetensors itself keeps the last entry of a repeated name; the format forbids it.
    path = tmp_path / "twice.safetensors"
    raw = (b'{"a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + np.float32(1.5).tobytes())
    with pytest.raises(ValueError, match=r"^cannot read .*twice\.safetensors as a safetensors "
                                         r"file: its header names 'a' twice$"):
        state_dicts.read_state_dict(path)


def test_a_safetensors_refusal_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(path))

    def refuse(*args, **kwargs):
        raise safetensors.SafetensorError("Error while deserializing header:\nsome new rule")

    monkeypatch.setattr(state_dicts.safetensors, "safe_open", refuse)
    # Nothing in the header is at fault, so safetensors' own reason is given, on one line.
    with pytest.raises(ValueError, match=r"^cannot read .*w\.safetensors as a safetensors file: "
                                         r"Error while deserializing header: some new rule$"):
        state_dicts.read_state_dict(path)


def test_bfloat16_safetensors_from_pytorch_are_read_as_float32(tmp_path):
    import safetensors.torch

    weights = {"w": torch.randn(4, 3, 3, 3).bfloat16(), "b": torch.randn(4).bfloat16()}
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file(weights, str(path))
    state, _ = state_dicts.read_state_dict(path)
    for name, tensor in weights.items():
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], tensor.float().numpy())


# --------------------------------------------------------------------------- heads


def test_num_outputs_gives_a_fresh_seeded_head_on_the_same_trunk(state_dict, converted):
    model, params = vgg16.load_torchvision_vgg16(state_dict, num_outputs=5, key=3)
    head = params["classification_module"]["fc8"]
    assert head["kernel"].shape == (1, 1, 4096, 5) and head["bias"].shape == (5,)
    np.testing.assert_array_equal(head["bias"], 0)
    assert 0.005 < float(jnp.std(head["kernel"])) < 0.02  # the task module's N(0, 0.01)
    # Seeded: the same seed (or key) gives the same head, another seed another head.
    _assert_trees_equal(head, vgg16.fresh_head(5, jax.random.key(3)))
    assert not np.array_equal(head["kernel"], vgg16.fresh_head(5, 4)["kernel"])
    trunk = {**params, "classification_module": {
        k: v for k, v in params["classification_module"].items() if k != "fc8"}}
    reference = {**converted[1], "classification_module": {
        k: v for k, v in converted[1]["classification_module"].items() if k != "fc8"}}
    _assert_trees_equal(trunk, reference)
    logits = jax.eval_shape(model.apply, {"params": params},
                            jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert logits.shape == (2, 5)
    with pytest.raises(ValueError, match="num_outputs must be >= 1"):
        vgg16.load_torchvision_vgg16(state_dict, num_outputs=0)


# --------------------------------------------------------------------------- FCN-8s


@pytest.fixture(scope="module")
def teacher(state_dict):
    return vgg16.load_torchvision_teacher(state_dict, num_outputs=1, num_classes=3)


def test_fcn8s_initialisation_from_vgg16(teacher, converted):
    teacher, params = teacher
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    expected = jax.eval_shape(teacher.init, jax.random.key(0), images)["params"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), expected)

    seg = params["segmentation_module"]
    for name in ("score_fr", "score_pool4", "score_pool3"):
        np.testing.assert_array_equal(seg[name]["kernel"], 0)
        np.testing.assert_array_equal(seg[name]["bias"], 0)
    for name, size in (("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)):
        assert set(seg[name]) == {"kernel"}
        np.testing.assert_array_equal(seg[name]["kernel"],
                                      modules.bilinear_upsampling_kernel(size, 3))
    trunk = {k: v for k, v in converted[1]["classification_module"].items() if k != "fc8"}
    _assert_trees_equal({k: seg[k] for k in trunk}, trunk)
    _assert_trees_equal(params["category_module"], converted[1]["category_module"])


def test_the_main_job_starts_teachers_from_the_torchvision_weights(tmp_path, safetensors_file,
                                                                  converted):
    from nettransplant import experiments
    from nettransplant.configs import voc_vgg16

    config = voc_vgg16.get_config()
    config.voc.manual_dir = str(tmp_path)
    config.pretrain.weights = str(safetensors_file)
    experiments.validate_config(config)
    zoo = experiments.TeacherZoo(config, tmp_path, benchmark=None, progress=False)
    params = zoo._init("cat")
    vgg = converted[1]
    _assert_trees_equal(params["category_module"], vgg["category_module"])
    trunk = {k: v for k, v in vgg["classification_module"].items() if k != "fc8"}
    for module in ("classification_module", "segmentation_module"):
        _assert_trees_equal({k: params[module][k] for k in trunk}, trunk)
    # fc8 is the teacher's own ("category vs random images": one output), freshly drawn.
    assert params["classification_module"]["fc8"]["kernel"].shape[-2:] == (4096, 1)
    np.testing.assert_array_equal(params["segmentation_module"]["score_fr"]["kernel"], 0)


def test_fcn8s_forward_at_224_shares_the_classification_trunk(teacher):
    teacher, params = teacher
    images = jnp.asarray(np.random.default_rng(3).standard_normal((1, 224, 224, 3)), jnp.float32)
    outputs, inter = jax.jit(teacher.apply)({"params": params}, images)
    assert outputs["segmentation"].shape == (1, 224, 224, 3)
    assert outputs["classification"].shape == (1, 1, 1, 1)
    # Zero score layers: FCN-8s starts from a zero score map.
    np.testing.assert_array_equal(outputs["segmentation"], 0)
    # fc6 SAME at pool5's 7×7 sees the whole map at the centre, as the VALID fc6 does.
    seg_fc7 = inter["segmentation_module"]["fc7"]
    cls_fc7 = inter["classification_module"]["fc7"]
    assert seg_fc7.shape == (1, 7, 7, 4096)
    np.testing.assert_allclose(seg_fc7[:, 3, 3], cls_fc7[:, 0, 0], rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(cls_fc7))))


# --------------------------------------------------------------------------- CLI


def test_cli_writes_a_checkpoint_with_the_converted_params(tmp_path, safetensors_file,
                                                           converted):
    out = tmp_path / "vgg16"
    assert convert_torchvision.main(["--weights", str(safetensors_file), "--out", str(out)]) == 0
    params, metadata = checkpoint.load_checkpoint(out)
    _assert_trees_equal(params, converted[1])
    sha256 = hashlib.sha256(safetensors_file.read_bytes()).hexdigest()
    assert metadata["source_sha256"] == sha256
    assert metadata["source"] == "vgg16.safetensors"
    assert metadata["architecture"] == "vgg16"
    assert metadata["num_outputs"] == 1000 and metadata["head"] == "stored"
    assert metadata["nettransplant_version"] == __import__("nettransplant").__version__
    model = vgg16.make_vgg16_classifier(metadata["num_outputs"])
    assert model == converted[0]



def test_cli_refuses_bad_arguments_and_weights(tmp_path, safetensors_file, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    for argv, message in (
            (["--weights", str(safetensors_file), "--out", str(existing)], "pass --overwrite"),
            (["--weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "o")],
             "no such file"),
            (["--weights", str(safetensors_file), "--out", str(tmp_path / "o"),
              "--num_outputs", "0"], "--num_outputs must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            convert_torchvision.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    not_vgg = tmp_path / "resnet.safetensors"
    save_file({k: np.zeros(s, np.float32) for k, s in RESNET18_SHAPES.items()}, str(not_vgg))
    assert convert_torchvision.main(["--weights", str(not_vgg), "--out", str(tmp_path / "o")]) == 1
    assert "holds a torchvision resnet state dict" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_verify_compares_a_fresh_head_with_pytorch(tmp_path, safetensors_file, capsys):
    out = tmp_path / "vgg16-k3"
    status = convert_torchvision.main([
        "--weights", str(safetensors_file), "--out", str(out), "--num_outputs", "3",
        "--seed", "7", "--verify", "--verify_sizes", "224"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "verify 224²: output (1, 3), max abs diff" in printed
    params, metadata = checkpoint.load_checkpoint(out)
    assert params["classification_module"]["fc8"]["kernel"].shape == (1, 1, 4096, 3)
    assert metadata["num_outputs"] == 3 and metadata["head"] == "fresh" and metadata["seed"] == 7
    assert metadata["verified"][0]["max_rel_diff"] < RELATIVE_TOLERANCE


def test_cli_verify_without_torch_is_a_clear_error(tmp_path, safetensors_file, monkeypatch,
                                                   capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit) as exit_info:
        convert_torchvision.main(["--weights", str(safetensors_file), "--out",
                                  str(tmp_path / "x"), "--verify"])
    assert exit_info.value.code == 2
    assert "--verify needs PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
