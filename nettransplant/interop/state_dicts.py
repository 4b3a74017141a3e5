"""Read a state dict as numpy arrays: a PyTorch or ``.safetensors`` file, or memory.

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

import jax
import ml_dtypes  # noqa: F401  # gives numpy the bfloat16 that safetensors reads BF16 as
import numpy as np
import safetensors

StateDictSource = str | os.PathLike | Mapping[str, Any]
# check(layout, origin) of read_state_dict: raises to refuse a file before its data is loaded.
LayoutCheck = Callable[[Mapping[str, np.ndarray], str], Any]

# The prefix ``torch.nn.DataParallel`` puts on every key.
DATA_PARALLEL_PREFIX = "module."


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

