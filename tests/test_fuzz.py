"""Bad input of every kind is one named error, and nothing already written is lost.

Parametrised over: every numeric config field (negative, zero, huge, NaN, wrong
type), every choice field (unknown values) and unknown ``--config`` fields;
weight files (pickles that try to run code, truncated or lying ``.safetensors``
headers, float16 and bfloat16 weights); the embedded data set's shards (bad
checksums, truncated, flipped).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from nettransplant import experiments
from nettransplant.configs import silhouettes
from nettransplant.data import silhouettes as silhouettes_data
from nettransplant.experiments import config as config_checks
from nettransplant.interop import state_dicts, vgg16

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- configs


def loose_config(**changes):
    """The default config without ml_collections' type locks (which would turn ``True``
    into ``1.0``), so any value reaches the checks as given."""
    def loose(tree):
        return ml_collections.ConfigDict({k: loose(v) if isinstance(v, dict) else v
                                          for k, v in tree.items()}, type_safe=False)

    tree = silhouettes.get_config().to_dict()
    for field, value in changes.items():
        *parents, leaf = field.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    return loose(tree)


def bad_values(kind: type, low: float, high: float) -> list:
    values = [low - 1, math.nan, math.inf, "3", None, True]
    values.append(high * 10 if math.isfinite(high) else -math.inf)
    if low > 0:
        values.append(0)
    if kind is int:
        values.append(low + 0.5)
    return values


NUMERIC_CASES = [(field, value) for field, kind, low, high in
                 config_checks.NUMERIC_FIELDS + config_checks.OPTIONAL_NUMERIC_FIELDS
                 for value in bad_values(kind, low, high)]


@pytest.mark.parametrize("field, value", NUMERIC_CASES,
                         ids=[f"{f}={v!r}" for f, v in NUMERIC_CASES])
def test_every_bad_number_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=rf"^config\.{field.replace('.', r'[.]')} ") as error:
        experiments.validate_config(loose_config(**{field: value}))
    assert "\n" not in str(error.value)


CHOICE_CASES = [(field, value) for field, _ in config_checks.CHOICE_FIELDS
                for value in ("unknown", "", None, 1, True)]


@pytest.mark.parametrize("field, value", CHOICE_CASES,
                         ids=[f"{f}={v!r}" for f, v in CHOICE_CASES])
def test_every_bad_choice_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=rf"^config\.{field.replace('.', r'[.]')} ") as error:
        experiments.validate_config(loose_config(**{field: value}))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, match", [
    ("adapters.exp2", (3,), r"config\.adapters\.exp2 must be \(num_convs, kernel_size\)"),
    ("adapters.exp3", (0, 1), r"config\.adapters\.exp3\[0\] \(num_convs\)"),
    ("adapters.exp1_1conv", (1, 2), "the kernel size must be odd"),
    ("sample_counts", (0, -10), "config.sample_counts"),
    ("sample_counts", (0, 10**9), "config.sample_counts"),
    ("model.image_size", 48, "multiple of 32"),
    ("pretrain.renderings", 0, r"config\.pretrain\.renderings must be in"),
    ("pretrain.shipped", "yes", r"config\.pretrain\.shipped must be True or False"),
])
def test_bad_adapters_counts_and_sizes_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        experiments.validate_config(loose_config(**{field: value}))


def test_the_valid_boundaries_pass():
    experiments.validate_config(loose_config(**{"transplant.num_steps": 1,
                                                "transplant.learning_rate": 1e12,
                                                "pretrain.num_steps": 0,
                                                "model.dropout_rate": 0.0}))


@pytest.mark.parametrize("args, expected", [
    (["--config.nonexistent=1"], "--config.nonexistent: config has no field 'nonexistent'; "
                                 "valid fields: adapters, categories, concurrent_cells, data, "
                                 "evidence, experiments, generic_category, jacobian_baseline, "
                                 "mesh, model, pretrain, sample_counts, seed, seeds, "
                                 "target_categories, teacher, transplant"),
    (["--config.model.widht", "2"], "--config.model.widht: config.model has no field 'widht'; "
                                    "valid fields: dropout_rate, image_size, num_classes, width"),
    (["--config.seed.x=1"], "--config.seed.x: config.seed has no field 'x'"),
    (["--config=nettransplant/configs/silhouettes.py:fast"],
     "--config nettransplant/configs/silhouettes.py:fast: unknown "
     "variant 'fast'"),
    (["--config", "configs/absent.py"], "--config configs/absent.py: no config file"),
    (["--config.model.width=2"], None),
])
def test_unknown_config_flags_are_named_with_the_valid_fields(args, expected):
    found = config_checks.override_error(args, str(REPO / "nettransplant" / "configs"
                                                   / "silhouettes.py"))
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.startswith(expected)


def run_launcher(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.reproduce", "--workdir", str(workdir),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args, message", [
    (["--config.nonexistent=1"], "error: --config.nonexistent: config has no field"),
    (["--config.model.width=0"], "error: config.model.width must be in"),
    (["--config.transplant.num_steps=-1"], "error: config.transplant.num_steps must be in"),
    (["--config.teacher.learning_rate=nan"], "error: config.teacher.learning_rate must be "
                                             "finite"),
    (["--config.model.width=abc"], "error: flag --config.model.width=abc"),
    (["--config=nettransplant/configs/silhouettes.py:fast"],
     "error: --config nettransplant/configs/silhouettes.py:fast"),
    (["extra"], "error: unexpected arguments"),
])
def test_the_launcher_prints_one_line_and_keeps_what_was_written(tmp_path, args, message):
    workdir = tmp_path / "w"
    (workdir / "teachers" / "cat").mkdir(parents=True)
    kept = {workdir / "results.json": '{"exp1": 1}',
            workdir / "teachers" / "cat" / "checkpoint.json": "{}"}
    for path, text in kept.items():
        path.write_text(text)
    result = run_launcher(workdir, "--config", "nettransplant/configs/silhouettes.py:quick", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
    assert {p: p.read_text() for p in kept} == kept
    assert sorted(p.name for p in workdir.rglob("*")) == ["cat", "checkpoint.json",
                                                         "results.json", "teachers"]


@pytest.mark.parametrize("command", ["launch.pretrain", "launch.fit_probe", "launch.growth"])
def test_every_command_refuses_positional_arguments_in_one_line(tmp_path, command):
    result = subprocess.run([sys.executable, "-m", command, "--workdir", str(tmp_path / "w"),
                             "extra"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    assert result.stderr == "error: unexpected arguments ['extra']\n", result.stderr
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------- weight files


class RunsCode:
    """Unpickling this runs ``touch <path>`` — what a malicious weights file would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def malicious_files(tmp_path: Path) -> list[Path]:
    import torch
    ran = tmp_path / "code-ran"
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"features.0.weight": RunsCode(ran)}))
    zipped = tmp_path / "zipped.pth"
    torch.save({"features.0.weight": torch.zeros(2), "extra": RunsCode(ran)}, zipped)
    return [plain, zipped]


@pytest.mark.torch
@pytest.mark.parametrize("which", [0, 1], ids=["plain pickle", "torch.save zip"])
def test_weights_that_try_to_run_code_are_refused_and_nothing_runs(tmp_path, which):
    path = malicious_files(tmp_path)[which]
    with pytest.raises(ValueError, match=r"torch\.load\(weights_only=True\) refused it") as error:
        state_dicts.read_state_dict(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "code-ran").exists()


@pytest.fixture
def small_safetensors(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = {"features.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "features.0.bias": np.array([0.5, -1.5], np.float32)}
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path))
    return path, arrays


@pytest.mark.parametrize("keep", [0, 4, 8, 12, 40, -1], ids=lambda k: f"keep{k}")
def test_a_truncated_safetensors_file_is_one_named_error(small_safetensors, keep):
    path, _ = small_safetensors
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ValueError, match=r"^cannot read .*w\.safetensors as a safetensors "
                                         r"file: ") as error:
        state_dicts.read_state_dict(path)
    assert "\n" not in str(error.value)


def write_with_header(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


LIES = {
    "length too big": (lambda h: h, 10**6, "header length field says"),
    "dtype": (lambda h: {**h, "b": {**h["b"], "dtype": "F64"}}, None, "needs 16 bytes"),
    "unknown dtype": (lambda h: {**h, "b": {**h["b"], "dtype": "Q7"}}, None,
                      "not a safetensors dtype"),
    "shape": (lambda h: {**h, "b": {**h["b"], "shape": [3]}}, None, "needs 12 bytes"),
    "negative shape": (lambda h: {**h, "b": {**h["b"], "shape": [-2]}}, None,
                       "not a list of non-negative"),
    "past the end": (lambda h: {**h, "b": {**h["b"], "data_offsets": [8, 24]}}, None,
                     "past the end"),
    "overlap": (lambda h: {**h, "b": {**h["b"], "data_offsets": [4, 12]}}, None, None),
    "not an object": (lambda h: [1, 2], None, "not an object"),
    "metadata": (lambda h: {**h, "__metadata__": {"a": 1}}, None, "__metadata__"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_safetensors_header_is_one_named_error(tmp_path, lie):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    change, length, match = LIES[lie]
    path = tmp_path / "lying.safetensors"
    write_with_header(path, change(header), np.arange(4, dtype=np.float32).tobytes(), length)
    with pytest.raises(ValueError, match=r"^cannot read .*lying\.safetensors as a safetensors "
                                         r"file: " + (f".*{match}" if match else "")) as error:
        state_dicts.read_state_dict(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_weights_convert_to_the_same_float32_kernels(tmp_path, dtype):
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    if dtype == "F16":
        stored = weight.astype(np.float16)
        exact = stored.astype(np.float32)
        data = stored.tobytes()
    else:  # bfloat16: the upper 16 bits of each float32
        bits = weight.view(np.uint32) >> 16
        exact = (bits << 16).view(np.float32)
        data = bits.astype("<u2").tobytes()
    bias = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    path = tmp_path / f"{dtype}.safetensors"
    write_with_header(path, {
        "w": {"dtype": dtype, "shape": list(weight.shape), "data_offsets": [0, len(data)]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}},
        data + bias.tobytes())
    state, _ = state_dicts.read_state_dict(path)
    assert state["w"].dtype == (np.float16 if dtype == "F16" else np.float32)
    np.testing.assert_array_equal(state["w"].astype(np.float32), exact)
    params = vgg16._conv_params(vgg16.conv_kernel_from_torch(state["w"]), state["b"])
    assert params["kernel"].dtype == np.float32
    np.testing.assert_array_equal(params["kernel"], np.transpose(exact, (2, 3, 1, 0)))
    np.testing.assert_array_equal(params["bias"], bias)


@pytest.mark.parametrize("wrapper", [{"state_dict": None}, {"model": None},
                                     {"model": {"state_dict": None}, "epoch": 3}],
                         ids=["state_dict", "model", "nested"])
def test_a_wrapped_state_dict_is_found_and_unwrapped(small_safetensors, wrapper):
    _, arrays = small_safetensors

    def fill(node):
        return {k: (dict(arrays) if v is None else fill(v) if isinstance(v, dict) else v)
                for k, v in node.items()}

    wrapped = fill(wrapper)
    if "epoch" in wrapped:
        wrapped["epoch"] = np.asarray(3)
    state, origin = state_dicts.read_state_dict(wrapped)
    assert origin.startswith("the state dict[")
    assert set(state) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(state[name], array)


# ---------------------------------------------------------------------------- data files


@pytest.fixture(scope="module")
def dataset_copy(tmp_path_factory) -> Path:
    """A copy of the embedded data set (built into it if the default one is absent)."""
    root = tmp_path_factory.mktemp("tfds")
    source = silhouettes_data.default_data_dir() / "animal_silhouettes"
    if source.is_dir():
        shutil.copytree(source, root / "animal_silhouettes")
    silhouettes_data.build_silhouettes(data_dir=root)
    return root


def shard(root: Path) -> Path:
    """A train shard of the current dataset version (older versions may sit beside it)."""
    version = str(silhouettes_data.AnimalSilhouettes.VERSION)
    return next(p for p in (root / "animal_silhouettes").rglob("*train.array_record*")
                if p.parent.name == version)


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_manifest(path: Path) -> None:
    manifest = path.parent / silhouettes_data.SHARD_MANIFEST
    record = json.loads(manifest.read_text())
    record["shards"][path.name]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(record))


DAMAGE = {"truncated": (damage_truncate, "bytes, .* when built"),
          "flipped": (damage_flip, "another SHA-256 than when built"),
          "bad checksum": (damage_manifest, "another SHA-256 than when built")}


def damaged_copy(dataset_copy: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    root = tmp_path / "tfds"
    shutil.copytree(dataset_copy, root)
    path = shard(root)
    damage(path)
    return root, path


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_shard_is_found_and_named(tmp_path, dataset_copy, name):
    damage, match = DAMAGE[name]
    root, path = damaged_copy(dataset_copy, tmp_path, damage)
    builder = silhouettes_data._prepare(silhouettes_data.AnimalSilhouettesConfig(), root)
    problem = silhouettes_data._check_shards(builder)
    assert problem is not None and "\n" not in problem
    assert re.search(rf"shard {re.escape(str(path))} .*{match}", problem), problem


def test_a_damaged_shard_is_moved_aside_never_deleted_and_rebuilt(tmp_path, dataset_copy):
    root, path = damaged_copy(dataset_copy, tmp_path, damage_truncate)
    damaged = path.read_bytes()
    with pytest.warns(RuntimeWarning, match=rf"{path.name}.*bytes, .* when built"):
        builder = silhouettes_data.build_silhouettes(data_dir=root)
    assert silhouettes_data._check_shards(builder) is None and path.read_bytes() != damaged
    aside = [p for p in (root / "animal_silhouettes").rglob(path.name) if ".damaged-" in str(p)]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged


def test_ctrl_c_while_converting_is_one_line_and_leaves_out_as_it_was(tmp_path, monkeypatch,
                                                                      capsys):
    from launch import convert_torchvision

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(state_dicts, "read_state_dict", interrupted)
    weights = tmp_path / "w.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(weights))
    code = convert_torchvision.main(["--weights", str(weights), "--out", str(tmp_path / "out")])
    assert code == 130 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == f"interrupted; {tmp_path / 'out'} is as it was\n"
