"""Export and import transplant nets and single modules: an orbax checkpoint + a JSON spec.

A net on disk is a :mod:`nettransplant.training.checkpoint` directory whose parameters
are the net's tree by module id and whose metadata is::

    {"kind": "nettransplant.transplant_net", "spec_version": 1,
     "spec": {"category_modules": {id: {"kind": "CategoryModule", "fields": {...},
                                        "input": {"size", "mean", "std"}, "provenance"}},
              "task_modules": {id: {"kind": "ClassificationTaskModule", "task": …,
                                    "fields": {...}, "provenance"}},
              "edges": [{"category", "task_module", "adapter": {"kind": "Adapter",
                         "fields"} | null, "beta", "provenance"}]}}

Provenance records where each piece came from (teacher checkpoint and its
parameters' SHA-256, method, sample count, α/β/λ, metrics). The metadata also
holds ``net_sha256``, the hash of the whole spec and the parameters
(:mod:`nettransplant.net.verify`).

:func:`load_net` verifies that hash (a net without one is refused unless
``allow_unverified``), checks every spec field's type and range and compares
the sizes the spec declares with the stored tensors' shapes before building any
module, then rebuilds every module from the spec, checks every stored tensor's
shape against the module's own (an error names the module and the key) and
the parameters' hash; a net exported in one process and imported in another
gives bit-identical predictions. :func:`export_module` writes a one-module net.
:func:`export_net` holds the output's lock (:mod:`nettransplant.net.outputs`)
while it writes, so two writers of one directory never race.

:func:`load_teacher` reads a teacher checkpoint (the main job's
``W/teachers/<name>`` or a torchvision VGG-16 converted by
``nettransplant convert``) as :class:`~nettransplant.net.graph.TeacherParts`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nettransplant.core.adapter import Adapter
from nettransplant.core.modules import (
    CategoryModule,
    ClassificationTaskModule,
    SegmentationTaskModule,
)
from nettransplant.net import outputs, verify
from nettransplant.net.graph import (
    ADAPTERS,
    CATEGORY_MODULES,
    TASK_MODULES,
    CategoryNode,
    Edge,
    InputSpec,
    ModuleRef,
    TaskNode,
    TeacherParts,
    TransplantNet,
    check_id,
)
from nettransplant.training import checkpoint

NET_KIND = "nettransplant.transplant_net"
SPEC_VERSION = 1
MODULE_KINDS = {cls.__name__: cls for cls in (CategoryModule, ClassificationTaskModule,
                                              SegmentationTaskModule, Adapter)}
_CATEGORY_KINDS = ("CategoryModule",)
_TASK_KINDS = ("ClassificationTaskModule", "SegmentationTaskModule")


class NetSpecError(ValueError):
    """A net's spec or tensors do not describe a valid transplant net."""


class UnverifiedNetWarning(UserWarning):
    """A net without a content hash was loaded because the caller allowed it."""


REEXPORT_HINT = ("Re-export it: nettransplant net export --net {path} --out NEW "
                 "--allow_unverified (once you trust its source), or pass --allow_unverified "
                 "to use it unverified.")


# --------------------------------------------------------------------------- module specs


def module_spec(module) -> dict[str, Any]:
    """``{"kind": class name, "fields": constructor fields}`` of a module."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name")}
    return {"kind": type(module).__name__, "fields": fields}


def module_from_spec(spec: Mapping[str, Any], where: str, kinds=tuple(MODULE_KINDS)):
    """The module a :func:`module_spec` describes; a :class:`NetSpecError` naming ``where``."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise NetSpecError(f"{where}: a module spec needs 'kind' and 'fields', got {spec!r}")
    kind = spec["kind"]
    if kind not in kinds:
        raise NetSpecError(f"{where}: unknown module kind {kind!r}; expected one of {list(kinds)}")
    cls = MODULE_KINDS[kind]
    fields = dict(spec.get("fields", {}))
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise NetSpecError(f"{where}: {kind} has no fields {unknown}; it has {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise NetSpecError(f"{where}: cannot build {kind} from {fields}: {e}") from e


def _abstract_params(module, input_shape) -> Any:
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _category_input(module: CategoryModule, spec: InputSpec) -> tuple[int, ...]:
    return (1, spec.size, spec.size, module.input_channels())


def _task_input(module) -> tuple[int, ...]:
    side = max(module.input_size // 2, 16 * module.fc6_size())
    return (1, side, side, module.input_channels())


def expected_params(net_or_spec: TransplantNet) -> dict[str, Any]:
    """The net's parameter tree as ``jax.ShapeDtypeStruct``\\ s, from its modules alone."""
    net = net_or_spec
    tree: dict[str, Any] = {CATEGORY_MODULES: {}, TASK_MODULES: {}, ADAPTERS: {}}
    for cid, node in net.category_modules.items():
        tree[CATEGORY_MODULES][cid] = _abstract_params(node.module,
                                                       _category_input(node.module, node.input))
    for tid, node in net.task_modules.items():
        tree[TASK_MODULES][tid] = _abstract_params(node.module, _task_input(node.module))
    for (cid, tid), edge in net.edges.items():
        if edge.adapter is not None:
            shape = (1, 16, 16, edge.adapter.channels)
            tree[ADAPTERS].setdefault(cid, {})[tid] = _abstract_params(edge.adapter, shape)
    if not tree[ADAPTERS]:
        del tree[ADAPTERS]
    return tree


# --------------------------------------------------------------------------- nets


def net_spec(net: TransplantNet) -> dict[str, Any]:
    """The JSON spec of a net (module kinds and sizes, edges, provenance)."""
    return {
        CATEGORY_MODULES: {
            cid: {**module_spec(node.module), "input": dataclasses.asdict(node.input),
                  "provenance": dict(node.provenance)}
            for cid, node in sorted(net.category_modules.items())},
        TASK_MODULES: {
            tid: {**module_spec(node.module), "task": node.task.name,
                  "provenance": dict(node.provenance)}
            for tid, node in sorted(net.task_modules.items())},
        "edges": [
            {"category": cid, "task_module": tid,
             "adapter": None if edge.adapter is None else module_spec(edge.adapter),
             "beta": edge.beta, "provenance": dict(edge.provenance)}
            for (cid, tid), edge in sorted(net.edges.items())],
    }


def net_metadata(net: TransplantNet, params_sha256: str) -> dict[str, Any]:
    """The checkpoint metadata of ``net``: kind, spec version, spec and ``net_sha256``."""
    metadata = {"kind": NET_KIND, "spec_version": SPEC_VERSION, "spec": net_spec(net)}
    metadata = checkpoint._checked_metadata(metadata)  # the JSON it is read back as
    metadata[verify.CONTENT_HASH_FIELD] = verify.content_digest(metadata, params_sha256)
    return metadata


def write_net(net: TransplantNet, directory: str | os.PathLike, *,
              overwrite: bool = False) -> Path:
    """Write ``net`` to ``directory`` atomically, without taking the output's lock.

    For a caller that already holds it (:func:`nettransplant.net.outputs.exclusive_output`);
    everything else calls :func:`export_net`.
    """
    # orbax writes an empty group (a net without adapters) as a marker that does
    # not restore into a target; empty groups are left out and restored empty.
    params = {group: tree for group, tree in net.params.items() if tree}
    metadata = net_metadata(net, checkpoint.tree_digest(params))
    return checkpoint.save_checkpoint(directory, params, metadata, overwrite=overwrite)


def export_net(net: TransplantNet, directory: str | os.PathLike, *,
               overwrite: bool = False) -> Path:
    """Write ``net`` to ``directory`` (atomically; see :mod:`nettransplant.training.checkpoint`).

    Holds ``directory``'s lock while writing (a second writer is refused with an
    :class:`~nettransplant.net.outputs.OutputBusyError`) and first removes the
    staging folders a killed write left behind. In a multi-process run every
    process calls it (orbax writes collectively) and no lock is taken: the
    run's own workdir lock keeps other writers out.
    """
    if jax.process_count() > 1:
        return write_net(net, directory, overwrite=overwrite)
    with outputs.exclusive_output(directory) as target:
        checkpoint.clean_stale(target)
        return write_net(net, target, overwrite=overwrite)


def export_module(net: TransplantNet, directory: str | os.PathLike, *,
                  category: str | None = None, task_module: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write one module of ``net`` as a one-module net (load it with :func:`load_net`)."""
    return export_net(single_module_net(net, category=category, task_module=task_module),
                      directory, overwrite=overwrite)


def single_module_net(net: TransplantNet, *, category: str | None = None,
                      task_module: str | None = None) -> TransplantNet:
    """A net holding one module of ``net`` (exactly one of ``category``, ``task_module``)."""
    if (category is None) == (task_module is None):
        raise ValueError("export_module takes exactly one of category= or task_module=")
    single = TransplantNet()
    if category is not None:
        node = net.category(category)
        single = single.add_category_module(category, node.module, net.category_params(category),
                                            input=node.input, provenance=node.provenance)
    else:
        node = net.task_module(task_module)
        single = single.add_task_module(task_module, node.module, net.task_params(task_module),
                                        provenance=node.provenance)
    return single


def _spec_of(path: Path, allow_unverified: bool = False) -> dict[str, Any]:
    """The spec of the net at ``path``, after checking its content hash and every field."""
    metadata = checkpoint.load_metadata(path)
    if metadata.get("kind") != NET_KIND:
        raise NetSpecError(f"{path} is a checkpoint but not a transplant net (kind "
                           f"{metadata.get('kind')!r}); teacher checkpoints load with "
                           "load_teacher")
    if metadata.get("spec_version") != SPEC_VERSION:
        raise NetSpecError(f"{path}: spec_version {metadata.get('spec_version')!r}; this "
                           f"nettransplant reads version {SPEC_VERSION}")
    spec = metadata.get("spec")
    if not isinstance(spec, Mapping):
        raise NetSpecError(f"{path}: the metadata holds no spec")
    file = path / checkpoint.METADATA_FILE
    verified = verify.check_content_hash(
        metadata, checkpoint.stored_digest(path), file, allow_unverified=allow_unverified,
        reexport_hint=REEXPORT_HINT.format(path=path))
    if not verified:
        warnings.warn(f"{file} has no content hash: loading the net UNVERIFIED "
                      "(--allow_unverified); an edited or damaged spec or parameter file "
                      "would go unnoticed", UnverifiedNetWarning, stacklevel=3)
    try:
        verify.check_spec(spec, file, MODULE_KINDS, _CATEGORY_KINDS, _TASK_KINDS)
    except ValueError as e:
        raise NetSpecError(str(e)) from None
    return spec


def _structure_from_spec(spec: Mapping[str, Any], path: Path) -> TransplantNet:
    """A net whose modules and edges are the spec's, with abstract (shape-only) params."""
    categories, task_nodes, edges = {}, {}, {}
    for cid, entry in dict(spec.get(CATEGORY_MODULES, {})).items():
        where = f"{path}: category module {cid!r}"
        check_id(cid, "category module")
        module = module_from_spec(entry, where, _CATEGORY_KINDS)
        try:
            spec_input = InputSpec(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in entry["input"].items()})
        except (KeyError, TypeError) as e:
            raise NetSpecError(f"{where}: bad input spec {entry.get('input')!r}") from e
        categories[cid] = CategoryNode(module, spec_input, dict(entry.get("provenance", {})))
    for tid, entry in dict(spec.get(TASK_MODULES, {})).items():
        where = f"{path}: task module {tid!r}"
        check_id(tid, "task module")
        module = module_from_spec(entry, where, _TASK_KINDS)
        if entry.get("task", module.task.name) != module.task.name:
            raise NetSpecError(f"{where}: task {entry.get('task')!r} but a {entry['kind']} "
                               f"solves {module.task.name}")
        task_nodes[tid] = TaskNode(module, dict(entry.get("provenance", {})))
    for i, entry in enumerate(spec.get("edges", [])):
        try:
            cid, tid = entry["category"], entry["task_module"]
        except (KeyError, TypeError) as e:
            raise NetSpecError(f"{path}: edge {i} needs 'category' and 'task_module'") from e
        where = f"{path}: edge {cid} → {tid}"
        if cid not in categories or tid not in task_nodes:
            raise NetSpecError(f"{where}: names a module the spec does not define")
        adapter = None
        if entry.get("adapter") is not None:
            adapter = module_from_spec(entry["adapter"], where, ("Adapter",))
            if adapter.channels != categories[cid].module.output_channels():
                raise NetSpecError(f"{where}: the adapter takes {adapter.channels} channels, "
                                   f"the category module outputs "
                                   f"{categories[cid].module.output_channels()}")
        edges[cid, tid] = Edge(adapter, float(entry.get("beta", 1.0)),
                               dict(entry.get("provenance", {})))
    placeholder = {CATEGORY_MODULES: dict.fromkeys(categories, {}),
                   TASK_MODULES: dict.fromkeys(task_nodes, {}),
                   ADAPTERS: {}}
    for (cid, tid), edge in edges.items():
        if edge.adapter is not None:
            placeholder[ADAPTERS].setdefault(cid, {})[tid] = {}
    try:
        return TransplantNet(categories, task_nodes, edges, placeholder)
    except ValueError as e:
        raise NetSpecError(f"{path}: {e}") from e


def load_net(directory: str | os.PathLike, *, allow_unverified: bool = False
             ) -> TransplantNet:
    """Read a net written by :func:`export_net` (or a module by :func:`export_module`).

    Args:
      directory: the net's folder.
      allow_unverified: load a net without a content hash (written before
        nettransplant recorded one), with an :class:`UnverifiedNetWarning`.
        A hash that does not match is refused whatever this flag.

    Raises:
      NetVerificationError: no content hash (and not ``allow_unverified``), or
        one that does not match the spec and the parameters' hash.
      NetSpecError: a field of the wrong type or out of range, sizes the
        stored tensors do not have (checked before any module is built), an
        unknown module kind or field, an edge between modules the spec does
        not define, or a stored tensor whose shape is not the module's (the
        error names the module and the key).
      CheckpointError: unreadable or damaged files (parameters' hash mismatch).
    """
    path = Path(directory).expanduser().absolute()
    spec = _spec_of(path, allow_unverified)
    stored = checkpoint.stored_shapes(path)
    try:
        verify.check_declared_sizes(spec, stored, path / checkpoint.METADATA_FILE,
                                    MODULE_KINDS)
    except ValueError as e:
        raise NetSpecError(str(e)) from None
    structure = _structure_from_spec(spec, path)
    expected = expected_params(structure)
    problems = _module_mismatches(stored, checkpoint.flat_shapes(expected))
    if problems:
        raise NetSpecError(f"{path}: the stored tensors do not fit the spec: "
                           + "; ".join(problems[:5])
                           + (f"; … {len(problems) - 5} more" if len(problems) > 5 else ""))
    target = {group: tree for group, tree in expected.items() if tree}
    params, _ = checkpoint.load_checkpoint(path, target=target)
    params = {group: params.get(group, {}) for group in expected}
    return TransplantNet(structure.category_modules, structure.task_modules, structure.edges,
                         params)


def _owner(path: str) -> tuple[str, str]:
    """``task_modules/dog.classification/fc7/kernel`` → ("task module 'dog.classification'",
    "fc7/kernel")."""
    parts = path.split("/")
    if parts[0] == ADAPTERS and len(parts) >= 3:
        return f"adapter {parts[1]} → {parts[2]}", "/".join(parts[3:])
    kind = {CATEGORY_MODULES: "category module", TASK_MODULES: "task module"}.get(parts[0])
    if kind is None or len(parts) < 2:
        return "the net", path
    return f"{kind} {parts[1]!r}", "/".join(parts[2:])


def _module_mismatches(stored: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """Differences between stored and expected tensors, each naming its module and key."""
    by_owner: dict[str, tuple[dict, dict]] = {}
    for side, tree in ((0, stored), (1, expected)):
        for path, value in tree.items():
            owner, key = _owner(path)
            by_owner.setdefault(owner, ({}, {}))[side][key] = value
    return [f"{owner}: {problem}" for owner, (have, want) in sorted(by_owner.items())
            for problem in checkpoint.shape_mismatches(have, want)]


# --------------------------------------------------------------------------- teachers


def load_teacher(directory: str | os.PathLike, name: str | None = None) -> TeacherParts:
    """A teacher checkpoint as :class:`TeacherParts` (with its parameters' SHA-256).

    Reads the main job's teachers (``W/teachers/<name>``: category module +
    classification + segmentation task modules; the modules are rebuilt from
    the checkpoint's ``modules`` record or its ``config.model``) and
    torchvision VGG-16 checkpoints written by ``nettransplant convert``
    (category module + classification task module at 224²).

    Args:
      name: the category module's id in a net (default: the checkpoint's
        category, else the directory's name).
    """
    path = Path(directory).expanduser().absolute()
    metadata = checkpoint.load_metadata(path)
    if metadata.get("kind") == NET_KIND:
        raise NetSpecError(f"{path} is a transplant net, not a teacher checkpoint")
    roles = _teacher_modules(metadata, path)
    input_size = _teacher_input_size(metadata, path)
    _check_teacher_shapes(path, roles, input_size)
    params, metadata = checkpoint.load_checkpoint(path)
    missing = sorted(set(roles) - set(params))
    if missing:
        raise NetSpecError(f"{path}: the checkpoint lacks {missing}; it holds {sorted(params)}")
    name = name or metadata.get("category") or metadata.get("name") or path.name
    category = roles.pop("category_module")
    provenance = {"checkpoint": str(path), "params_sha256": checkpoint.stored_digest(path),
                  **{k: metadata[k] for k in ("kind", "category", "categories", "metrics",
                                               "fingerprint", "architecture", "source_sha256")
                     if k in metadata}}
    task_modules = {role.removesuffix("_module"): ModuleRef(module, params[role])
                    for role, module in roles.items()}
    for role, ref in task_modules.items():
        problems = checkpoint.shape_mismatches(
            checkpoint.flat_shapes(ref.params),
            checkpoint.flat_shapes(_abstract_params(ref.module, _task_input(ref.module))))
        if problems:
            raise NetSpecError(f"{path}: {role} module: " + "; ".join(problems[:5]))
    return TeacherParts(check_id(name, "category module"),
                        ModuleRef(category, params["category_module"]), task_modules,
                        InputSpec(int(input_size)), provenance)


def _teacher_input_size(metadata: Mapping[str, Any], path: Path) -> int:
    """The teacher's training input side, checked (1 .. ``verify.MAX_INPUT_SIDE``)."""
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    input_size = metadata.get("input_size") or model.get("image_size")
    if input_size is None:
        raise NetSpecError(f"{path}: the metadata records no input size")
    try:
        verify.check_field("input_size", "int", input_size, f"{path}: metadata")
    except ValueError as e:
        raise NetSpecError(str(e)) from None
    return int(input_size)


def _check_teacher_shapes(path: Path, roles: Mapping[str, Any], input_size: int) -> None:
    """The stored tensors of each role have its module's shapes (read from metadata first)."""
    stored = checkpoint.stored_shapes(path)
    for role, module in roles.items():
        if not any(key.startswith(f"{role}/") for key in stored):
            continue  # reported as missing once the checkpoint is read
        shape = ((1, input_size, input_size, module.input_channels())
                 if isinstance(module, CategoryModule) else _task_input(module))
        want = checkpoint.flat_shapes(_abstract_params(module, shape))
        have = {key.removeprefix(f"{role}/"): value for key, value in stored.items()
                if key.startswith(f"{role}/")}
        problems = checkpoint.shape_mismatches(have, want)
        if problems:
            raise NetSpecError(f"{path}: {role}: the stored tensors do not fit the metadata: "
                               + "; ".join(problems[:5]))


def _teacher_modules(metadata: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``{role: module}`` of a teacher checkpoint, from its metadata (fields checked)."""
    if "modules" in metadata:
        record = metadata["modules"]
        if not isinstance(record, Mapping) or not record:
            raise NetSpecError(f"{path}: 'modules' must map roles to module specs")
        try:
            for role, spec in record.items():
                verify.check_module_spec(spec, f"{path}: {role}", MODULE_KINDS)
        except ValueError as e:
            raise NetSpecError(str(e)) from None
        return {role: module_from_spec(spec, f"{path}: {role}") for role, spec in record.items()}
    if metadata.get("architecture") == "vgg16":  # nettransplant convert
        from nettransplant.interop import vgg16
        try:
            verify.check_field("num_outputs", "int", metadata.get("num_outputs"),
                               f"{path}: metadata")
        except ValueError as e:
            raise NetSpecError(str(e)) from None
        model = vgg16.make_vgg16_classifier(int(metadata["num_outputs"]))
        return {"category_module": model.category_module,
                "classification_module": model.classification_module}
    config = metadata.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    if model is None:
        raise NetSpecError(f"{path}: not a teacher checkpoint (no 'modules', 'architecture' "
                           "or 'config.model' in its metadata)")
    try:
        model = verify.check_teacher_model(model, metadata.get("num_outputs", 1),
                                           f"{path}: config.model")
    except ValueError as e:
        raise NetSpecError(str(e)) from None
    from nettransplant.core import modules
    teacher = modules.make_teacher(width=model["width"], input_size=model["image_size"],
                                   num_outputs=metadata.get("num_outputs", 1),
                                   num_classes=model["num_classes"],
                                   dropout_rate=model["dropout_rate"])
    return {"category_module": teacher.category_module,
            "classification_module": teacher.classification_module,
            "segmentation_module": teacher.segmentation_module}
