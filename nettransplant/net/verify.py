"""Checks of an exported net before anything of it is built: content hash, field types, sizes.

A net's metadata holds ``net_sha256``: the SHA-256 of the canonical JSON of its
kind, spec version and whole spec (module kinds and fields, input size and
normalisation, edges with β and adapter fields such as the reorder seed,
provenance) together with the parameters' SHA-256. :func:`content_digest`
computes it; :func:`check_content_hash` compares it with the stored one, so an
edited spec field is refused before it is used and changed parameter bytes
when they are read. A net without the hash (written before it existed, or
with the field removed) is refused unless the caller allows unverified nets.

:func:`check_spec` checks the spec's structure and every field's type and
range; :func:`check_declared_sizes` compares the sizes the spec declares
(channels, widths, fc6 kernels, the adapters' conv counts) with the stored
tensors' shapes, read from the checkpoint's metadata. Both run before any
module is built or any parameter is allocated, and every error is one line
naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nettransplant.core.modules import (
    VGG16_BLOCKS,
    VGG16_FC_WIDTH,
    category_channels,
    default_fc6_kernel,
    scaled_channels,
)

CONTENT_HASH_FIELD = "net_sha256"
MAX_INPUT_SIDE = 8192
MAX_WIDTH = 16.0
MAX_CHANNELS = 1 << 16
MAX_ADAPTER_CONVS = 64
MAX_PARAM_BYTES = 16 << 30

_FIELD_RANGES: dict[str, tuple[float, float]] = {
    "width": (0.0, MAX_WIDTH), "in_channels": (1, MAX_CHANNELS),
    "input_size": (1, MAX_INPUT_SIDE), "dropout_rate": (0.0, 1.0),
    "fc6_kernel": (1, MAX_INPUT_SIDE), "num_outputs": (1, MAX_CHANNELS),
    "num_classes": (1, MAX_CHANNELS), "channels": (1, MAX_CHANNELS),
    "num_convs": (1, MAX_ADAPTER_CONVS), "kernel_size": (1, 3), "reorder_seed": (0, 2 ** 63 - 1),
}
_OPEN_BELOW = {"width"}  # > low, not >= low
_OPEN_ABOVE = {"dropout_rate"}  # < high


class NetVerificationError(ValueError):
    """The net's content hash is missing or does not match its spec and parameters."""


def canonical_json(value: Any) -> str:
    """The JSON text hashed for a net: sorted keys, no spaces (NaN stays visible as NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True,
                      ensure_ascii=True)


def content_digest(metadata: Mapping[str, Any], params_sha256: str) -> str:
    """``net_sha256`` of a net's metadata (kind, spec version, spec) and parameters' hash."""
    covered = {key: metadata.get(key) for key in ("kind", "spec_version", "spec")}
    covered["params_sha256"] = params_sha256
    return hashlib.sha256(canonical_json(covered).encode()).hexdigest()


def check_content_hash(metadata: Mapping[str, Any], params_sha256: str | None, file: Path, *,
                       allow_unverified: bool = False, reexport_hint: str = "") -> bool:
    """Compare a net's stored ``net_sha256`` with its content; True if it was verified.

    Returns False (the caller warns) only when the hash is missing and
    ``allow_unverified``; a hash that does not match is refused whatever the flag.

    Raises:
      NetVerificationError: one line naming ``file``.
    """
    stored = metadata.get(CONTENT_HASH_FIELD)
    if stored is None or params_sha256 is None:
        if allow_unverified:
            return False
        missing = CONTENT_HASH_FIELD if stored is None else "params_sha256"
        raise NetVerificationError(
            f"{file}: no content hash ({missing}), so the net cannot be verified; it was "
            f"written by an older nettransplant or edited. {reexport_hint}".strip())
    if not isinstance(stored, str) or stored != content_digest(metadata, params_sha256):
        raise NetVerificationError(
            f"{file}: the spec or the parameters' hash does not match {CONTENT_HASH_FIELD} "
            "(a field was edited or the file is damaged); export the net again from its source")
    return True


# --------------------------------------------------------------------------- spec checks


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(value: Any, where: str, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: {what} must be an object, got {_type_name(value)} "
                         f"{_brief(value)}")
    return value


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_field(name: str, annotation: str, value: Any, where: str) -> None:
    """A ValueError naming ``where`` and ``name`` unless ``value`` fits the field's type/range."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return
        raise ValueError(f"{where}: field {name!r} must be set, got null")
    if annotation.startswith("int") and not _is_int(value):
        raise ValueError(f"{where}: field {name!r} must be an integer, got {_type_name(value)} "
                         f"{_brief(value)}")
    if annotation.startswith("float") and not _is_number(value):
        raise ValueError(f"{where}: field {name!r} must be a finite number, got "
                         f"{_type_name(value)} {_brief(value)}")
    if not annotation.startswith(("int", "float", "bool")):
        raise ValueError(f"{where}: field {name!r} cannot be set from a spec")
    low, high = _FIELD_RANGES.get(name, (-math.inf, math.inf))
    too_low = value <= low if name in _OPEN_BELOW else value < low
    too_high = value >= high if name in _OPEN_ABOVE else value > high
    if too_low or too_high:
        lo = f"> {low}" if name in _OPEN_BELOW else f">= {low}"
        hi = f"< {high}" if name in _OPEN_ABOVE else f"<= {high}"
        raise ValueError(f"{where}: field {name!r} must be {lo} and {hi}, got {value!r}")


def check_module_spec(entry: Any, where: str, classes: Mapping[str, type]) -> None:
    """Kind, ``fields`` object and every field of a module spec."""
    entry = _mapping(entry, where, "a module spec")
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in classes:
        raise ValueError(f"{where}: unknown module kind {_brief(kind)}; expected one of "
                         f"{sorted(classes)}")
    fields = _mapping(entry.get("fields", {}), where, "'fields'")
    known = {f.name: f for f in dataclasses.fields(classes[kind])
             if f.name not in ("parent", "name")}
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise ValueError(f"{where}: {kind} has no fields {unknown}; it has {sorted(known)}")
    for name, field in known.items():
        if name in fields:
            check_field(name, str(field.type), fields[name], where)
        elif field.default is dataclasses.MISSING:
            raise ValueError(f"{where}: {kind} needs field {name!r}")
    if "provenance" in entry:
        _mapping(entry["provenance"], where, "'provenance'")


def check_input(entry: Any, where: str) -> None:
    """A category module's ``input``: size in 1..MAX_INPUT_SIDE, 3 finite means, 3 stds > 0."""
    spec = _mapping(entry, where, "'input'")
    unknown = sorted(str(k) for k in spec if k not in ("size", "mean", "std"))
    if unknown or "size" not in spec:
        raise ValueError(f"{where}: 'input' needs 'size' (and optional 'mean', 'std'), got "
                         f"keys {sorted(map(str, spec))}")
    check_field("input.size", "int", spec["size"], where)
    if not 1 <= spec["size"] <= MAX_INPUT_SIDE:
        raise ValueError(f"{where}: field 'input.size' must be >= 1 and <= {MAX_INPUT_SIDE}, "
                         f"got {spec['size']!r}")
    for name in ("mean", "std"):
        if name not in spec:
            continue
        value = spec[name]
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(_is_number(v) for v in value)
                or (name == "std" and not all(v > 0 for v in value))):
            rule = "3 finite numbers" + (" > 0" if name == "std" else "")
            raise ValueError(f"{where}: field 'input.{name}' must be {rule}, got "
                             f"{_brief(value)}")


def check_teacher_model(model: Any, num_outputs: Any, where: str) -> Mapping[str, Any]:
    """A teacher checkpoint's ``config.model`` (width, image_size, num_classes, dropout_rate)
    and ``num_outputs``, each of its type and range; the model mapping."""
    model = _mapping(model, where, "config.model")
    for name, annotation, field in (("width", "float", "width"),
                                    ("image_size", "int", "input_size"),
                                    ("num_classes", "int", "num_classes"),
                                    ("dropout_rate", "float", "dropout_rate")):
        if name not in model:
            raise ValueError(f"{where}: needs field {name!r}")
        try:
            check_field(field, annotation, model[name], where)
        except ValueError as e:
            raise ValueError(str(e).replace(f"'{field}'", f"'{name}'")) from None
    check_field("num_outputs", "int", num_outputs, where)
    return model


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _check_id(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{where}: {what} id {_brief(value)} is not valid")
    return value


def check_spec(spec: Any, file: Path, classes: Mapping[str, type],
               category_kinds: tuple[str, ...], task_kinds: tuple[str, ...]) -> None:
    """The spec's structure and every field's type and range; a ValueError naming ``file``."""
    spec = _mapping(spec, str(file), "the spec")
    for group, kinds in (("category_modules", category_kinds), ("task_modules", task_kinds)):
        modules = _mapping(spec.get(group, {}), f"{file}: {group}", group)
        for module_id, entry in modules.items():
            what = group.removesuffix("s").replace("_", " ")
            _check_id(module_id, f"{file}: {group}", what)
            where = f"{file}: {what} {module_id!r}"
            check_module_spec(entry, where, {k: classes[k] for k in kinds})
            if group == "category_modules":
                check_input(entry.get("input"), where)
            elif "task" in entry and not isinstance(entry["task"], str):
                raise ValueError(f"{where}: field 'task' must be a string")
    edges = spec.get("edges", [])
    if not isinstance(edges, list):
        raise ValueError(f"{file}: 'edges' must be a list, got {_type_name(edges)}")
    for i, edge in enumerate(edges):
        edge = _mapping(edge, f"{file}: edge {i}", "an edge")
        for key in ("category", "task_module"):
            _check_id(edge.get(key), f"{file}: edge {i}", key.replace("_", " "))
        where = f"{file}: edge {edge['category']} → {edge['task_module']}"
        beta = edge.get("beta", 1.0)
        if not _is_number(beta) or beta <= 0:
            raise ValueError(f"{where}: field 'beta' must be a finite number > 0, got "
                             f"{_brief(beta)}")
        if edge.get("adapter") is not None:
            check_module_spec(edge["adapter"], f"{where}: adapter", {"Adapter": classes["Adapter"]})
        if "provenance" in edge:
            _mapping(edge["provenance"], where, "'provenance'")


# --------------------------------------------------------------------------- declared sizes


def _fields(entry: Mapping, cls: type) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **entry.get("fields", {})}


def _expect(stored: Mapping[str, tuple], key: str, shape: tuple, where: str,
            declared: str) -> None:
    """A ValueError unless the stored tensor ``key`` has ``shape`` (None: any size)."""
    name = "/".join(key.split("/")[-2:])
    if key not in stored:
        raise ValueError(f"{where}: declares {declared}, but the stored tensors have no {name}")
    have = tuple(stored[key][0])
    if len(have) != len(shape) or any(w is not None and w != h
                                      for w, h in zip(shape, have, strict=True)):
        want = tuple("?" if w is None else w for w in shape)
        raise ValueError(f"{where}: declares {declared} → {name} {want}, but the stored "
                         f"tensor is {have}")


def check_declared_sizes(spec: Mapping[str, Any], stored: Mapping[str, tuple], file: Path,
                         classes: Mapping[str, type]) -> None:
    """Compare the sizes the spec declares with the stored tensors' shapes (from metadata).

    Runs on a spec :func:`check_spec` accepted, before any module is built: a
    spec declaring more adapter convs, another width or another fc6 kernel than
    the stored tensors is refused in one line naming the file and the field.
    """
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in stored.values())
    if total > MAX_PARAM_BYTES:
        raise ValueError(f"{file}: the stored tensors declare {total / 2**30:.1f} GiB of "
                         f"parameters, over the limit of {MAX_PARAM_BYTES >> 30} GiB")
    for cid, entry in spec.get("category_modules", {}).items():
        f = _fields(entry, classes[entry["kind"]])
        where = f"{file}: category module {cid!r}"
        c = category_channels(f["width"])
        _expect(stored, f"category_modules/{cid}/conv1_1/kernel", (3, 3, f["in_channels"], c),
                where, f"width {f['width']} and in_channels {f['in_channels']}")
    for tid, entry in spec.get("task_modules", {}).items():
        kind = entry["kind"]
        f = _fields(entry, classes[kind])
        where = f"{file}: task module {tid!r}"
        prefix = f"task_modules/{tid}"
        c_in = f["in_channels"] or category_channels(f["width"])
        _expect(stored, f"{prefix}/conv2_1/kernel",
                (3, 3, c_in, scaled_channels(VGG16_BLOCKS[1][0], f["width"])), where,
                f"width {f['width']} and in_channels {f['in_channels']}")
        k = f["fc6_kernel"] or default_fc6_kernel(f["input_size"])
        _expect(stored, f"{prefix}/fc6/kernel",
                (k, k, None, scaled_channels(VGG16_FC_WIDTH, f["width"])), where,
                f"input_size {f['input_size']} and fc6_kernel {f['fc6_kernel']}")
        out_key, out_field = (("fc8", "num_outputs") if kind == "ClassificationTaskModule"
                              else ("score_fr", "num_classes"))
        _expect(stored, f"{prefix}/{out_key}/kernel", (1, 1, None, f[out_field]), where,
                f"{out_field} {f[out_field]}")
    for edge in spec.get("edges", []):
        if edge.get("adapter") is None:
            continue
        cid, tid = edge["category"], edge["task_module"]
        f = _fields(edge["adapter"], classes["Adapter"])
        where = f"{file}: adapter {cid} → {tid}"
        prefix = f"adapters/{cid}/{tid}/"
        convs = sum(1 for key in stored
                    if key.startswith(prefix) and re.fullmatch(r"adapter_conv\d+/kernel",
                                                                key[len(prefix):]))
        if convs != f["num_convs"]:
            raise ValueError(f"{where}: declares num_convs {f['num_convs']}, but the stored "
                             f"tensors hold {convs} adapter convs")
        k, m = f["kernel_size"], f["channels"]
        for i in range(1, convs + 1):
            _expect(stored, f"{prefix}adapter_conv{i}/kernel", (k, k, m, m), where,
                    f"channels {m} and kernel_size {k}")
