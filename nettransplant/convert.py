"""Torchvision VGG-16 weights → nettransplant's VGG-16 modules (and an FCN-8s initialisation).

torchvision's ``vgg16`` state dict holds 13 convs ``features.N.{weight,bias}``
(``N`` in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; weights OIHW) and
three linear layers ``classifier.{0,3,6}.{weight,bias}`` (weights ``(out, in)``).
They become:

* conv1_1, conv1_2 → the category module; conv2_1 … conv5_3 → the
  classification task module; kernels OIHW → HWIO;
* ``classifier.0`` (fc6, ``(4096, 25088)``) → a 7×7 conv. PyTorch flattens
  pool5 in (C, H, W) order, so the weight is reshaped to ``(4096, 512, 7, 7)``
  and permuted to a ``(7, 7, 512, 4096)`` HWIO kernel;
* ``classifier.3`` (fc7) and ``classifier.6`` (fc8) → 1×1 convs.

torchvision's VGG-16 average-pools pool5 to 7×7 (``AdaptiveAvgPool2d((7, 7))``)
before the classifier. At a 224² input pool5 is already 7×7 and that pooling is
the identity, so the converted network reproduces torchvision's logits there.
On larger inputs the converted network runs fully convolutionally (fc6 as a
VALID 7×7 conv) and returns an ``S×S`` score map, which equals torchvision's
classifier applied at every 7×7 window of pool5 — not torchvision's output on
the enlarged image, which average-pools pool5 down to 7×7 first.

Inputs are NHWC float32 images normalised as torchvision expects (RGB in
[0, 1], minus mean ``(0.485, 0.456, 0.406)``, divided by std
``(0.229, 0.224, 0.225)``).

State dicts come from a ``.pth``/``.pt``/``.bin`` file (needs PyTorch; read
with ``torch.load(weights_only=True)``, so a file cannot run code), a
``.safetensors`` file (read with the safetensors library, no PyTorch needed;
its header checked before any data is loaded), or memory (a mapping of torch
tensors or numpy arrays), in float32, float16 or bfloat16; parameters come out
float32. A checkpoint dict wrapping the
weights (``{"state_dict": ..., "epoch": ...}``) is unwrapped when exactly one
state dict sits under a :data:`WRAPPER_KEYS` entry, or under the entry named
by ``key``. A ``module.`` prefix on *every* key (what
``torch.nn.DataParallel`` saves) is removed; any other mismatch is a one-line
error listing the missing, unexpected and mis-shaped keys. Batch-norm VGGs
(``vgg16_bn``), other VGG depths and other architectures are refused by name.

The ``torch_*`` functions build the PyTorch reference networks used to verify a
conversion; they import PyTorch when called.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  # gives numpy the bfloat16 that safetensors reads BF16 as
import numpy as np
import safetensors

from nettransplant import modules

Array = jax.Array
Params = dict[str, Any]
StateDictSource = str | os.PathLike | Mapping[str, Any]
# check(layout, origin) of read_state_dict: raises to refuse a file before its data is loaded.
LayoutCheck = Callable[[Mapping[str, np.ndarray], str], Any]

ARCHITECTURE = "vgg16"
IMAGENET_CLASSES = 1000
INPUT_SIZE = modules.FULL_SCALE_INPUT
POOL5_SIZE = INPUT_SIZE // 32
DATA_PARALLEL_PREFIX = "module."

# Convs per block of torchvision's VGG configurations "A", "B", "D", "E".
VGG_CONVS_PER_BLOCK = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": tuple(n for _, n in modules.VGG16_BLOCKS),
    "vgg19": (2, 2, 4, 4, 4),
}
# classifier.{0,3,6} = Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
FC_LAYERS = (("fc6", "classifier.0"), ("fc7", "classifier.3"), ("fc8", "classifier.6"))
CATEGORY_LAYERS = ("conv1_1", "conv1_2")


# --------------------------------------------------------------------------- layout


def vgg_feature_indices(convs_per_block: Sequence[int], *,
                        batch_norm: bool = False) -> tuple[int, ...]:
    """Indices of the convs in a torchvision VGG's ``features`` Sequential.

    Each conv is followed by a ReLU — with ``batch_norm``, by a BatchNorm2d and
    then the ReLU — and each block ends in a MaxPool2d.
    ``(2, 2, 3, 3, 3)`` → ``(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)``.
    """
    step = 3 if batch_norm else 2
    indices: list[int] = []
    index = 0
    for n in convs_per_block:
        for _ in range(n):
            indices.append(index)
            index += step
        index += 1  # MaxPool2d
    return tuple(indices)


def vgg16_conv_names() -> tuple[tuple[str, int], ...]:
    """``(nettransplant name, torchvision features index)`` of VGG-16's 13 convs."""
    names = [f"conv{b}_{i}" for b, (_, n) in enumerate(modules.VGG16_BLOCKS, 1)
             for i in range(1, n + 1)]
    return tuple(zip(names, vgg_feature_indices(VGG_CONVS_PER_BLOCK["vgg16"])))


def torchvision_vgg16_shapes(num_classes: int = IMAGENET_CLASSES) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's ``vgg16(num_classes=...)`` state dict and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    conv_names = iter(vgg16_conv_names())
    for channels, n in modules.VGG16_BLOCKS:
        for _ in range(n):
            _, index = next(conv_names)
            shapes[f"features.{index}.weight"] = (channels, in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (channels,)
            in_channels = channels
    fc = modules.VGG16_FC_WIDTH
    fc_shapes = {"fc6": (fc, in_channels * POOL5_SIZE ** 2), "fc7": (fc, fc),
                 "fc8": (num_classes, fc)}
    for name, key in FC_LAYERS:
        shapes[f"{key}.weight"] = fc_shapes[name]
        shapes[f"{key}.bias"] = fc_shapes[name][:1]
    return shapes


def detect_architecture(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Name the torchvision architecture a state dict's keys and shapes belong to.

    Returns ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"`` (with ``"_bn"``
    for the batch-norm variants), ``"alexnet"``, ``"resnet"``, ``"densenet"``,
    or None when the layout is not recognised (e.g. a VGG-16 with keys missing).
    """
    keys = set(shapes)
    if "fc.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    if any(k.startswith("features.denseblock") for k in keys):
        return "densenet"
    conv_indices = sorted(
        int(k.split(".")[1]) for k in keys
        if k.startswith("features.") and k.endswith(".weight") and k.count(".") == 2
        and k.split(".")[1].isdigit() and len(shapes[k]) == 4)
    if not conv_indices:
        return None
    if len(conv_indices) == 5 and "classifier.1.weight" in keys:
        return "alexnet"
    for name, convs in VGG_CONVS_PER_BLOCK.items():
        for batch_norm in (False, True):
            if tuple(conv_indices) == vgg_feature_indices(convs, batch_norm=batch_norm):
                return name + ("_bn" if batch_norm else "")
    return None


# --------------------------------------------------------------------------- reading

# Entries under which training scripts nest the weights in a checkpoint dict
# ({"state_dict": ..., "epoch": ..., "optimizer": ...}), searched in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
# Error messages name at most this many keys per kind of problem, so they stay
# one readable line even for a state dict of another architecture.
MAX_LISTED_KEYS = 10

# safetensors dtype codes read here, with their bytes per element. BF16 tensors
# arrive as ml_dtypes' bfloat16 and are widened to float32, which holds every
# bfloat16 value exactly.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4,
    "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
# The numpy dtype each of those codes is returned as.
SAFETENSORS_READ_AS = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "F16": "float16", "BF16": "float32", "U32": "uint32", "I32": "int32", "F32": "float32",
    "U64": "uint64", "I64": "int64", "F64": "float64",
}
# Codes the format defines that have no exact numpy reading here; refused from
# the header, before any data is loaded.
UNSUPPORTED_SAFETENSORS_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                                  "F6_E2M3", "F6_E3M2", "F4", "C64")
# The largest header safetensors reads; a longer length field is named as such.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000


def _one_line(text: object) -> str:
    """``str(text)`` with its lines joined, so that an error message stays on one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _summarise(items: Sequence[str], limit: int = MAX_LISTED_KEYS) -> str:
    """The first ``limit`` items joined by ``"; "``, then how many were left out."""
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (torch already imported), numpy or JAX array."""
    torch = sys.modules.get("torch")
    return (isinstance(value, np.ndarray | jax.Array)
            or (torch is not None and isinstance(value, torch.Tensor)))


def _is_state_dict(value: Any) -> bool:
    """Whether ``value`` is a non-empty mapping whose every value is a tensor."""
    return (isinstance(value, Mapping) and len(value) > 0
            and all(_is_tensor(v) for v in value.values()))


def _to_numpy(value: Any) -> np.ndarray | None:
    """A torch tensor, numpy or JAX array as numpy (bfloat16 → float32); None otherwise.

    Raises:
      ValueError: a torch tensor without a numpy form (sparse, quantized, on the
        meta device, ...), with torch's reason.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        try:
            return value.cpu().numpy()
        except (RuntimeError, TypeError) as e:
            raise ValueError(_one_line(e)) from e
    if isinstance(value, np.ndarray | jax.Array):
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 is no np.floating
            array = array.astype(np.float32)
        return array
    return None


def _is_int_list(value: Any) -> bool:
    """Whether ``value`` is a JSON list of integers (``true``/``false`` excluded)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


class _DuplicateKey(Exception):
    """A JSON object names the same key twice (json.loads would keep the last)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _unreadable_dtype(name: str, code: object) -> str:
    """Why tensor ``name`` of safetensors dtype ``code`` is not read."""
    readable = ", ".join(SAFETENSORS_DTYPES)
    if code in UNSUPPORTED_SAFETENSORS_DTYPES:
        return (f"tensor {name!r} has dtype {code}, which cannot be read exactly (readable: "
                f"{readable}); re-save it as F32, F16 or BF16")
    return (f"tensor {name!r} has dtype {code!r}, which is not a safetensors dtype (readable: "
            f"{readable})")


def _safetensors_header(path: Path, fail: Callable[[str], ValueError],
                        ) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the number of data bytes after it.

    Used to refuse a header that names a tensor twice (safetensors keeps the
    last; the format forbids it) and to say what is wrong with a file that
    safetensors refused. No tensor data is read.

    Raises:
      ValueError (from ``fail``): the length field, the encoding or the JSON is
        wrong, a name is given twice, or the header is not a JSON object.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise fail(f"it has {size} bytes, fewer than the 8-byte header length "
                       "(truncated or empty file)")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > size - 8:
            raise fail(f"its header length field says {header_bytes} bytes but only "
                       f"{size - 8} follow (truncated, or not a safetensors file)")
        if header_bytes > SAFETENSORS_MAX_HEADER_BYTES:
            raise fail(f"its header length field says {header_bytes} bytes, more than the "
                       f"format's {SAFETENSORS_MAX_HEADER_BYTES} (not a safetensors file?)")
        raw_header = f.read(header_bytes)
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise fail(f"its header is not UTF-8 text (byte {e.start})") from e
    except _DuplicateKey as e:
        raise fail(f"its header names {e.args[0]!r} twice") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reason = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else e
        raise fail(f"its header is not JSON ({_one_line(reason)})") from e
    if not isinstance(header, dict):
        raise fail(f"its header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - header_bytes


def _safetensors_fault(header: Mapping[str, Any], data_bytes: int) -> str | None:
    """The first entry of a safetensors header that does not describe the data, named.

    Says why safetensors refused a file, which its own error does not always
    tell (e.g. which tensor's shape, dtype and offsets disagree); None when
    every entry is consistent.
    """
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                return "its __metadata__ is not a mapping of strings to strings"
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return f"header entry {name!r} is not an object with dtype, shape and data_offsets"
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in SAFETENSORS_DTYPES:
            return _unreadable_dtype(name, code)
        if not _is_int_list(shape) or any(d < 0 for d in shape):
            return f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers"
        if not _is_int_list(offsets) or len(offsets) != 2:
            return f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]"
        begin, end = offsets
        if not 0 <= begin <= end:
            return f"tensor {name!r} has data_offsets [{begin}, {end}], not 0 <= begin <= end"
        if end > data_bytes:
            return (f"tensor {name!r} has data_offsets [{begin}, {end}] past the end of the "
                    f"{data_bytes}-byte data section (truncated file?)")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[code]
        if end - begin != expected:
            return (f"tensor {name!r} ({code}, shape {tuple(shape)}) needs {expected} bytes but "
                    f"its data_offsets [{begin}, {end}] span {end - begin}")
        entries.append((name, begin, end))
    # The format packs the tensors back to back: a gap, an overlap or bytes left
    # over mean the offsets (or the header length) do not describe this file.
    entries.sort(key=lambda e: (e[1], e[2]))
    position, previous = 0, None
    for name, begin, end in entries:
        if begin < position:
            return f"tensors {previous!r} and {name!r} overlap (byte {begin} is in both)"
        if begin > position:
            where = f"after {previous!r}" if previous is not None else "before the first tensor"
            return (f"{begin - position} unused bytes {where} (at data byte {position}); the "
                    "offsets do not describe the data")
        position, previous = end, name
    if position != data_bytes:
        return (f"the tensors span {position} bytes but the data section holds {data_bytes} "
                "(a wrong header length, or bytes appended to the file)")
    return None


def _strip_data_parallel_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the ``module.`` prefix, when every key has it."""
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return state


def _read_safetensors(path: Path, check: LayoutCheck | None = None) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file with the safetensors library (no PyTorch needed).

    safetensors checks the header when it opens the file (length, JSON, dtype
    codes, shapes, and offsets that tile the data section exactly); the header
    is then checked for a name given twice, every tensor's dtype for an exact
    numpy reading, and the names and shapes by ``check`` (see
    :func:`read_state_dict`), all before any tensor data is loaded. A file
    safetensors refuses is refused with the entry at fault named where one is.

    Returns:
      ``{name: array}``; BF16 tensors as float32.
    Raises:
      ValueError: ``cannot read <path> as a safetensors file: <reason>``.
    """
    def fail(reason: str) -> ValueError:
        return ValueError(f"cannot read {path} as a safetensors file: {reason}")

    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            _safetensors_header(path, fail)  # a name given twice: safetensors keeps the last
            layout = {}
            for name in f.keys():
                piece = f.get_slice(name)
                code = piece.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise fail(_unreadable_dtype(name, code))
                # Zero-memory stand-ins: the shape, and the dtype the tensor is read as.
                layout[name] = np.broadcast_to(np.zeros((), SAFETENSORS_READ_AS[code]),
                                               tuple(piece.get_shape()))
            if check is not None:
                check(_strip_data_parallel_prefix(layout), str(path))
            # ml_dtypes gives numpy a bfloat16 for BF16 tensors; _to_numpy widens it.
            return {name: f.get_tensor(name) for name in layout}
    except safetensors.SafetensorError as e:
        header, data_bytes = _safetensors_header(path, fail)
        raise fail(_safetensors_fault(header, data_bytes) or _one_line(e)) from e


def _torch_load_error(path: Path, error: Exception) -> ValueError:
    """A one-line error for a file ``torch.load(weights_only=True)`` refused."""
    text = str(error)
    if "Weights only load failed" in text:
        # torch explains at length how to load the file unsafely; keep the line
        # that says what it refused.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        details = [line for line in lines[1:]
                   if not line.startswith(("Check the documentation", "Please file an issue"))]
        detail = details[0].rstrip(".") if details else "content other than tensors"
        return ValueError(
            f"cannot read {path} as a PyTorch state dict: torch.load(weights_only=True) refused "
            f"it ({detail}) and none of its code ran; a state dict holds only tensors, so "
            "re-save model.state_dict() or convert it to .safetensors")
    return ValueError(
        f"cannot read {path} as a PyTorch state dict: {type(error).__name__}: {_one_line(text)}")


def _load_file(path: Path, check: LayoutCheck | None = None) -> Any:
    """Read a ``.safetensors`` (safetensors; ``check`` its layout first) or PyTorch
    (``torch.load``) state dict file."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            return _read_safetensors(path, check)
        except OSError as e:
            raise ValueError(f"cannot read {path} as a safetensors file: {_one_line(e)}") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); without it, convert the state "
            "dict to .safetensors and pass that file") from e
    try:
        with warnings.catch_warnings():
            # Raised for plain pickles, which are then refused with a clearer error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # weights_only: an unpickler that builds tensors and containers only,
            # so a file cannot run code however it was made.
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises pickle, zip and runtime errors for bad files
        raise _torch_load_error(path, e) from e


def _select_entry(raw: Any, origin: str, key: str) -> tuple[Any, str]:
    """The entry ``key`` (or ``"a/b"``: entry b of entry a) of a checkpoint dict."""
    parts = [key] if isinstance(raw, Mapping) and key in raw else key.split("/")
    value, where = raw, origin
    for part in parts:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} is a {type(value).__name__}, not a mapping with an entry "
                             f"{part!r}")
        if part not in value:
            entries = _summarise([repr(k) for k in value]) or "none"
            raise ValueError(f"{where} has no entry {part!r} (its entries: {entries})")
        value, where = value[part], f"{where}[{part!r}]"
    return value, where


def _find_wrapped(raw: Any, origin: str) -> tuple[Any, str]:
    """``raw`` itself, or the one state dict under :data:`WRAPPER_KEYS` (two levels deep)."""
    if not isinstance(raw, Mapping) or _is_state_dict(raw):
        return raw, origin
    found: list[tuple[tuple[str, ...], Any]] = []
    for outer in WRAPPER_KEYS:
        value = raw.get(outer)
        if _is_state_dict(value):
            found.append(((outer,), value))
        elif isinstance(value, Mapping):
            found += [((outer, inner), value[inner]) for inner in WRAPPER_KEYS
                      if _is_state_dict(value.get(inner))]
    if len(found) > 1:
        names = ", ".join(repr("/".join(path)) for path, _ in found)
        raise ValueError(f"{origin} holds several state dicts ({names}); choose one with "
                         "key=NAME (--key NAME on the command line)")
    if not found:
        return raw, origin  # the caller lists what is not a tensor
    path, value = found[0]
    return value, origin + "".join(f"[{part!r}]" for part in path)


def read_state_dict(source: StateDictSource, key: str | None = None, *,
                    check: LayoutCheck | None = None,
                    ) -> tuple[dict[str, np.ndarray], str]:
    """Read a state dict as numpy arrays, keys with a common ``module.`` prefix stripped.

    Args:
      source: a ``.safetensors`` path (read with safetensors; F16/BF16/F32/...),
        any other path (read with ``torch.load(weights_only=True)``, which runs no
        code from the file), or a mapping of tensors/arrays.
      key: the entry of a checkpoint dict holding the weights (``"state_dict"``,
        ``"model"``, ...; ``"a/b"`` for entry b of entry a). None: the source
        itself if it is a flat state dict, else the single state dict found
        under one of :data:`WRAPPER_KEYS`, one or two levels deep.
      check: called as ``check(layout, origin)`` before a ``.safetensors``
        file's data is loaded (with ``key`` None): ``layout`` maps every name (a
        common ``module.`` prefix stripped) to a zero-memory array of the
        tensor's shape and of the dtype it is read as, and whatever ``check``
        raises refuses the file unread (e.g. :func:`validate_vgg16_state_dict`).
        Other sources are read whole; check them afterwards.
    Returns:
      ``(state_dict, origin)``: float tensors keep their precision, except
      bfloat16 which becomes float32; ``origin`` names the file and entry (or
      "the state dict") for error messages.
    Raises:
      FileNotFoundError / IsADirectoryError: no such file.
      ImportError: a PyTorch file without PyTorch installed.
      ValueError: an unreadable file, no such entry, several candidate state
        dicts, or entries that are not tensors (all named, on one line).
    """
    if isinstance(source, Mapping):
        raw, origin = source, "the state dict"
    elif isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        raw, origin = _load_file(path, check if key is None else None), str(path)
    else:
        raise TypeError(
            "expected a path to a .pth/.safetensors file or a state dict mapping, got "
            f"{type(source).__name__}")
    if key is not None:
        raw, origin = _select_entry(raw, origin, key)
    else:
        raw, origin = _find_wrapped(raw, origin)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{origin} holds a {type(raw).__name__}, not a state dict")
    state: dict[str, np.ndarray] = {}
    not_arrays = []
    for name, value in raw.items():
        try:
            array = _to_numpy(value)
        except ValueError as e:
            not_arrays.append(f"{name!r} (unreadable {type(value).__name__}: {e})")
            continue
        if array is None:
            not_arrays.append(f"{name!r} ({type(value).__name__})")
        else:
            state[str(name)] = array
    if not_arrays:
        nested = [repr(k) for k, v in raw.items() if isinstance(v, Mapping)]
        hint = (f"; if the weights are in one of its entries ({_summarise(nested)}), pass "
                "key=NAME (--key NAME on the command line)" if nested else "")
        raise ValueError(f"{origin} is not a flat state dict of tensors: non-tensor entries "
                         f"{_summarise(not_arrays)}{hint}")
    return _strip_data_parallel_prefix(state), origin


def validate_vgg16_state_dict(state: Mapping[str, np.ndarray], origin: str = "the state dict",
                              ) -> int:
    """Check that ``state`` is exactly torchvision's VGG-16; return its number of classes.

    ``classifier.6`` may have any number of classes K (1000 for ImageNet).
    Floating dtypes of any precision are accepted (conversion casts to float32).

    Raises:
      ValueError: another architecture (named when recognised), or one line
        listing the missing, unexpected, mis-shaped and non-floating keys
        (up to :data:`MAX_LISTED_KEYS` of each, then how many more).
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    architecture = detect_architecture(shapes)
    if architecture not in (None, ARCHITECTURE):
        hint = ""
        if architecture.endswith("_bn"):
            hint = (" Its batch-norm layers shift the feature indices and carry running "
                    "statistics; nettransplant's VGG-16 has no batch norm, so use the plain "
                    "vgg16 weights (torchvision's VGG16_Weights.IMAGENET1K_V1).")
        raise ValueError(
            f"{origin} holds a torchvision {architecture} state dict; only {ARCHITECTURE} "
            f"(without batch norm) can be converted.{hint}")

    head = shapes.get("classifier.6.weight")
    num_classes = (head[0] if head is not None and len(head) == 2 and head[0] >= 1
                   else IMAGENET_CLASSES)
    expected = torchvision_vgg16_shapes(num_classes)
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in expected)
    misshaped = [f"{k} has shape {shapes[k]}, expected {expected[k]}"
                 for k in expected if k in shapes and shapes[k] != expected[k]]
    not_float = [f"{k} ({state[k].dtype})" for k in expected
                 if k in state and not np.issubdtype(state[k].dtype, np.floating)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", misshaped), ("non-floating keys", not_float)):
        if items:
            problems.append(f"{title} ({len(items)}): {_summarise(items)}")
    if problems:
        raise ValueError(f"{origin} is not a torchvision {ARCHITECTURE} state dict: "
                         + " | ".join(problems))
    return num_classes


# --------------------------------------------------------------------------- conversion


def conv_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``(O, I, kh, kw)`` → HWIO kernel ``(kh, kw, I, O)``."""
    return np.transpose(weight, (2, 3, 1, 0))


def fc6_kernel_from_torch(weight: np.ndarray, channels: int, size: int) -> np.ndarray:
    """fc6 ``(O, C·size·size)`` → a ``(size, size, C, O)`` conv kernel.

    PyTorch flattens pool5 ``(C, H, W)`` with W fastest, so the weight is read as
    ``(O, C, H, W)`` and permuted to HWIO.
    """
    return conv_kernel_from_torch(weight.reshape(weight.shape[0], channels, size, size))


def linear_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch linear weight ``(O, I)`` → a 1×1 conv kernel ``(1, 1, I, O)``."""
    return weight.T[None, None]


def _conv_params(kernel: np.ndarray, bias: np.ndarray) -> dict[str, Array]:
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def vgg16_params_from_state_dict(state: Mapping[str, np.ndarray]) -> Params:
    """Convert a validated torchvision VGG-16 state dict (numpy arrays).

    Returns:
      ``{"category_module": {conv1_1, conv1_2}, "classification_module":
      {conv2_1 … conv5_3, fc6 (7, 7, 512, 4096), fc7 (1, 1, 4096, 4096),
      fc8 (1, 1, 4096, K)}}``, each ``{"kernel": HWIO, "bias": (O,)}``, float32.
    """
    category: dict[str, Any] = {}
    classification: dict[str, Any] = {}
    for name, index in vgg16_conv_names():
        target = category if name in CATEGORY_LAYERS else classification
        target[name] = _conv_params(conv_kernel_from_torch(state[f"features.{index}.weight"]),
                                    state[f"features.{index}.bias"])
    pool5_channels = modules.VGG16_BLOCKS[-1][0]
    kernels = {
        "fc6": fc6_kernel_from_torch(state["classifier.0.weight"], pool5_channels, POOL5_SIZE),
        "fc7": linear_kernel_from_torch(state["classifier.3.weight"]),
        "fc8": linear_kernel_from_torch(state["classifier.6.weight"]),
    }
    for name, key in FC_LAYERS:
        classification[name] = _conv_params(kernels[name], state[f"{key}.bias"])
    return {"category_module": category, "classification_module": classification}


def _as_key(key: Array | int) -> Array:
    return jax.random.key(int(key)) if isinstance(key, int | np.integer) else key


def fresh_head(num_outputs: int, key: Array | int = 0) -> dict[str, Array]:
    """A newly initialised fc8: ``{"kernel": (1, 1, 4096, K), "bias": (K,)}``.

    Drawn with the classification task module's own fc8 initialiser (normal,
    std 0.01) and zero bias; ``key`` is a PRNG key or an integer seed.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    task_module = modules.ClassificationTaskModule(num_outputs=num_outputs)
    init = task_module.kernel_inits()["fc8"]
    kernel = init(_as_key(key), (1, 1, modules.VGG16_FC_WIDTH, num_outputs), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_outputs,), jnp.float32)}


class VGG16Classifier(nn.Module):
    """VGG-16 as category module + fully convolutional classification task module.

    ``images (B, H, W, 3)`` (NHWC, torchvision-normalised, H, W >= 224) →
    logits ``(B, K)`` when the score map is 1×1 (a 224² input, as torchvision
    returns), else the score map ``(B, S, S, K)`` with ``S = H // 32 - 6``.
    Parameters: ``{"category_module": ..., "classification_module": ...}``.
    """

    category_module: modules.CategoryModule
    classification_module: modules.ClassificationTaskModule

    def __call__(self, images: Array, *, train: bool = False) -> Array:
        """Logits ``(B, K)`` or the score map ``(B, S, S, K)``; dropout with ``train=True``."""
        x, _ = self.category_module(images, train=train)
        scores, _ = self.classification_module(x, train=train)
        if scores.shape[1:3] == (1, 1):
            return scores[:, 0, 0]
        return scores


def make_vgg16_classifier(num_outputs: int = IMAGENET_CLASSES, *,
                          dropout_rate: float = 0.5) -> VGG16Classifier:
    """A full-width :class:`VGG16Classifier` with fc6 sized for 224² inputs (7×7 kernel)."""
    return VGG16Classifier(
        category_module=modules.CategoryModule(width=1.0),
        classification_module=modules.ClassificationTaskModule(
            width=1.0, input_size=INPUT_SIZE, num_outputs=num_outputs,
            dropout_rate=dropout_rate))


def vgg16_from_state_dict(state: Mapping[str, np.ndarray], origin: str = "the state dict", *,
                          num_outputs: int | None = None, key: Array | int = 0,
                          ) -> tuple[VGG16Classifier, Params]:
    """Validate and convert a state dict already read by :func:`read_state_dict`.

    Args:
      state: ``{torchvision key: numpy array}`` (any floating dtype).
      origin: names the state dict in error messages.
      num_outputs, key: as in :func:`load_torchvision_vgg16`.
    Returns:
      ``(VGG16Classifier, {"category_module": ..., "classification_module": ...})``.
    Raises:
      ValueError: not a torchvision VGG-16 state dict (:func:`validate_vgg16_state_dict`).
    """
    if num_outputs is not None and num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    stored_classes = validate_vgg16_state_dict(state, origin)
    params = vgg16_params_from_state_dict(state)
    if num_outputs is not None:
        params["classification_module"]["fc8"] = fresh_head(num_outputs, key)
    return make_vgg16_classifier(num_outputs or stored_classes), params


def load_torchvision_vgg16(source: StateDictSource, *, num_outputs: int | None = None,
                           key: Array | int = 0, state_dict_key: str | None = None,
                           ) -> tuple[VGG16Classifier, Params]:
    """Load torchvision VGG-16 weights as ``(model, params)``.

    ``model.apply({"params": params}, images)`` with NHWC images ``(B, 224, 224, 3)``
    gives the logits ``(B, K)`` of ``torchvision.models.vgg16().eval()`` on the
    same images in NCHW; larger images give a score map ``(B, S, S, K)``.

    Args:
      source: ``.pth``/``.pt`` file (needs PyTorch), ``.safetensors`` file, or a
        state dict in memory (torch tensors or numpy arrays); float32, float16
        or bfloat16 weights.
      num_outputs: None keeps the stored head (K = 1000 ImageNet classes for
        torchvision's weights); an integer replaces fc8 by a fresh K-output head.
      key: PRNG key or integer seed for the fresh head.
      state_dict_key: the entry of a checkpoint dict that holds the weights
        (``key`` of :func:`read_state_dict`); None finds it.
    Returns:
      ``(VGG16Classifier, {"category_module": ..., "classification_module": ...})``,
      float32 whatever the stored precision.
    Raises:
      ValueError: not a torchvision VGG-16 state dict (see
        :func:`validate_vgg16_state_dict`), or an unreadable file (see
        :func:`read_state_dict`).
    """
    state, origin = read_state_dict(source, key=state_dict_key, check=validate_vgg16_state_dict)
    return vgg16_from_state_dict(state, origin, num_outputs=num_outputs, key=key)


# --------------------------------------------------------------------------- FCN-8s


def fcn8s_params_from_vgg16(vgg16_params: Mapping[str, Any], num_classes: int = 2) -> Params:
    """FCN-8s segmentation task module parameters initialised from VGG-16, as FCN does.

    conv2_1 … conv5_3, fc6 and fc7 are VGG-16's (the segmentation module's fc6
    is a SAME 7×7 conv taking the same ``(7, 7, 512, 4096)`` kernel); score_fr,
    score_pool4 and score_pool3 are zero; upscore2, upscore_pool4 and upscore8
    are bilinear kernels (:func:`modules.bilinear_upsampling_kernel`).

    Args:
      vgg16_params: ``{"category_module", "classification_module"}`` as returned by
        :func:`load_torchvision_vgg16` (any width).
      num_classes: segmentation classes C.
    Returns:
      The ``segmentation_module`` parameters of :class:`modules.SegmentationTaskModule`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    classification = vgg16_params["classification_module"]
    params: dict[str, Any] = {name: dict(p) for name, p in classification.items() if name != "fc8"}

    def zero_score(in_channels: int) -> dict[str, Array]:
        return {"kernel": jnp.zeros((1, 1, in_channels, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32)}

    params["score_fr"] = zero_score(classification["fc7"]["kernel"].shape[-1])
    params["score_pool4"] = zero_score(classification["conv4_3"]["kernel"].shape[-1])
    params["score_pool3"] = zero_score(classification["conv3_3"]["kernel"].shape[-1])
    for name, stride in modules.FCN_UPSAMPLING:
        params[name] = {"kernel": jnp.asarray(
            modules.bilinear_upsampling_kernel(2 * stride, num_classes))}
    return params


def load_torchvision_teacher(source: StateDictSource, *, num_outputs: int | None = None,
                             num_classes: int = 2, key: Array | int = 0,
                             state_dict_key: str | None = None,
                             ) -> tuple[modules.Teacher, Params]:
    """A full-width :class:`modules.Teacher` initialised from torchvision VGG-16 weights.

    Category module and classification task module as in
    :func:`load_torchvision_vgg16`; the segmentation task module from
    :func:`fcn8s_params_from_vgg16`. ``state_dict_key`` picks the entry of a
    checkpoint dict holding the weights, as in :func:`read_state_dict`.

    Returns:
      ``(teacher, {"category_module", "classification_module",
      "segmentation_module"})``; ``teacher.apply({"params": params}, images)`` with
      ``(B, 224, 224, 3)`` images gives ``({"classification": (B, 1, 1, K),
      "segmentation": (B, 224, 224, num_classes)}, intermediates)``.
    """
    classifier, params = load_torchvision_vgg16(source, num_outputs=num_outputs, key=key,
                                                state_dict_key=state_dict_key)
    params["segmentation_module"] = fcn8s_params_from_vgg16(params, num_classes)
    teacher = modules.make_teacher(
        width=1.0, input_size=INPUT_SIZE,
        num_outputs=classifier.classification_module.num_outputs, num_classes=num_classes)
    return teacher, params


# --------------------------------------------------------------------------- PyTorch reference


def torch_vgg16(num_classes: int = IMAGENET_CLASSES) -> Any:
    """A PyTorch VGG-16 with torchvision's module layout (its ``load_state_dict`` takes
    torchvision's weights): ``features``, ``avgpool = AdaptiveAvgPool2d((7, 7))``,
    ``classifier``. NCHW ``(B, 3, H, W)`` → ``(B, num_classes)``. Needs PyTorch."""
    import torch
    from torch import nn as tnn

    class VGG16(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[tnn.Module] = []
            in_channels = 3
            for channels, n in modules.VGG16_BLOCKS:
                for _ in range(n):
                    layers += [tnn.Conv2d(in_channels, channels, 3, padding=1),
                               tnn.ReLU(inplace=True)]
                    in_channels = channels
                layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
            fc = modules.VGG16_FC_WIDTH
            self.features = tnn.Sequential(*layers)
            self.avgpool = tnn.AdaptiveAvgPool2d((POOL5_SIZE, POOL5_SIZE))
            self.classifier = tnn.Sequential(
                tnn.Linear(in_channels * POOL5_SIZE ** 2, fc), tnn.ReLU(True), tnn.Dropout(),
                tnn.Linear(fc, fc), tnn.ReLU(True), tnn.Dropout(),
                tnn.Linear(fc, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    return VGG16()


def torch_vgg16_fully_convolutional(vgg16: Any) -> Any:
    """The conv-ified PyTorch VGG-16 sharing ``vgg16``'s weights, in eval mode.

    ``features``, then fc6 as ``Conv2d(512, 4096, 7)``, fc7 and fc8 as 1×1
    convs (no average pooling): NCHW ``(B, 3, H, W)`` → ``(B, K, S, S)``.
    """
    import torch
    from torch import nn as tnn

    linears = [m for m in vgg16.classifier if isinstance(m, tnn.Linear)]
    channels = modules.VGG16_BLOCKS[-1][0]
    convs = []
    for i, linear in enumerate(linears):
        size = POOL5_SIZE if i == 0 else 1
        conv = tnn.Conv2d(linear.in_features // size ** 2, linear.out_features, size)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.reshape(
                linear.out_features, channels if i == 0 else linear.in_features, size, size))
            conv.bias.copy_(linear.bias)
        convs.append(conv)
    fcn = tnn.Sequential(vgg16.features, convs[0], tnn.ReLU(), convs[1], tnn.ReLU(), convs[2])
    return fcn.eval()


def verify_against_torch(state: Mapping[str, np.ndarray], model: VGG16Classifier,
                         params: Params, *, input_sizes: Sequence[int] = (224, 288),
                         batch_size: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Compare converted logits with PyTorch's on random images; needs PyTorch.

    The PyTorch VGG-16 gets ``state`` (its fc8 replaced by the converted one, so a
    fresh head is compared too). At 224² the reference is the PyTorch VGG-16
    itself, at larger sizes its conv-ified form (:func:`torch_vgg16_fully_convolutional`).

    Returns:
      One dict per input size: ``{"input_size", "output_shape", "max_abs_diff",
      "max_rel_diff"}``, the relative difference being ``max|Δ| / max|torch|``.
    """
    import torch

    fc8 = params["classification_module"]["fc8"]
    num_outputs = fc8["kernel"].shape[-1]
    reference = dict(state)
    reference["classifier.6.weight"] = np.asarray(fc8["kernel"])[0, 0].T
    reference["classifier.6.bias"] = np.asarray(fc8["bias"])
    with torch.device("meta"):  # no initialisation: every weight is loaded next
        vgg16 = torch_vgg16(num_outputs)
    vgg16.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                           for k, v in reference.items()}, assign=True)
    vgg16.eval()
    fully_convolutional = torch_vgg16_fully_convolutional(vgg16)
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(seed)
    results = []
    for size in input_sizes:
        images = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
        with torch.no_grad():
            nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            if size == INPUT_SIZE:
                expected = vgg16(nchw).numpy()
            else:
                expected = fully_convolutional(nchw).numpy().transpose(0, 2, 3, 1)
        actual = np.asarray(apply({"params": params}, jnp.asarray(images)))
        if actual.shape != expected.shape:
            raise AssertionError(
                f"converted output shape {actual.shape} != PyTorch {expected.shape} at {size}²")
        max_abs = float(np.max(np.abs(actual - expected)))
        results.append({"input_size": size, "output_shape": list(actual.shape),
                        "max_abs_diff": max_abs,
                        "max_rel_diff": max_abs / max(float(np.max(np.abs(expected))), 1e-30)})
    return results
