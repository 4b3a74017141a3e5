"""Checkpoints: a parameter pytree stored with orbax plus JSON metadata, written atomically.

A checkpoint is a directory::

    DIR/
      checkpoint.json   {"format": "nettransplant.checkpoint", "format_version": 1,
                         "params_sha256": "…",   (content hash of the parameters)
                         "metadata": {...}}      (the caller's metadata, verbatim)
      params/           the pytree, written by orbax's StandardCheckpointHandler

:func:`save_checkpoint` writes everything into a temporary sibling directory and
moves it into place only once orbax has committed, so a failure part-way
leaves no half-written ``DIR`` and an existing checkpoint at ``DIR`` intact.
Replacing an existing checkpoint (``overwrite=True``) exchanges the two
directories atomically where the file system can (Linux ``renameat2`` with
``RENAME_EXCHANGE``), so a reader never finds ``DIR`` missing; elsewhere it
moves the old one aside first, and a crash between the two renames leaves it
under ``.DIR.old-*``, which :func:`recover` (called by every save and by
:func:`clean_stale`) moves back. :func:`clean_stale` also removes the staging
folders a killed save leaves behind.

:func:`load_checkpoint` returns ``(params, metadata)``; the parameters come back
as ``jax.Array``\\ s in nested dicts (or in ``target``'s structure when one is
given, which is how to restore trees with empty nodes such as optax states:
without a target, empty subtrees are not stored). Every load checks the
parameters against the SHA-256 stored at save time (:func:`tree_digest`): a
changed or damaged file is a :class:`CheckpointError`, never silently wrong
numbers.

In a multi-process run every process calls :func:`save_checkpoint` and
:func:`load_checkpoint` (orbax writes and reads collectively); process 0 moves
the directories. Parameters are saved as arrays replicated over every device and
restored onto each process's first device, so a checkpoint written by any
number of processes restores in any other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_FORMAT = "nettransplant.checkpoint"  # written in every checkpoint.json: keep it
CHECKPOINT_FORMAT_VERSION = 1
METADATA_FILE = "checkpoint.json"
PARAMS_DIR = "params"
_STAGING, _RETIRED = ".tmp-", ".old-"


class CheckpointError(ValueError):
    """A directory exists but is not a readable nettransplant checkpoint."""


def _short(error: BaseException, limit: int = 240) -> str:
    """The first line of an error, shortened: orbax and tensorstore errors run to pages."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _checked_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata as a JSON round trip, or a TypeError naming what is not JSON."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"checkpoint metadata keys must be strings, got {key!r}")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        bad = []
        for key, value in metadata.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                bad.append(f"{key!r} ({type(value).__name__})")
        raise TypeError(
            "checkpoint metadata must be JSON-serialisable (str, int, finite float, bool, "
            f"None, lists and dicts of these); offending entries: {', '.join(bad) or e}") from e


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def tree_digest(tree: Any) -> str:
    """SHA-256 of a pytree's contents: every leaf's path, dtype, shape and bytes.

    Leaves are taken in path order (paths as plain names), so a tree restored
    as nested dicts and the same tree as the original containers hash alike.
    """
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaves.append(("/".join(_key_name(k) for k in path), leaf))
    digest = hashlib.sha256()
    for name, leaf in sorted(leaves, key=lambda item: item[0]):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a nettransplant checkpoint (its ``checkpoint.json``)."""
    return (Path(directory) / METADATA_FILE).is_file()


def _siblings(target: Path, marker: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}{marker}"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def recover(directory: str | os.PathLike) -> bool:
    """Move back a checkpoint a crash left aside mid-replace; True if one was restored.

    A replace that cannot exchange directories atomically renames the old
    checkpoint to ``.DIR.old-*`` before renaming the new one in; a kill between
    the two leaves no ``DIR``. The newest complete ``.old-*`` becomes ``DIR`` again.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists():
        return False
    retired = [p for p in _siblings(target, _RETIRED) if is_checkpoint(p)]
    if not retired:
        return False
    newest = max(retired, key=lambda p: p.stat().st_mtime)
    os.rename(newest, target)
    return True


def clean_stale(directory: str | os.PathLike) -> list[Path]:
    """Restore a checkpoint left aside by a crash and delete stale staging folders.

    Call it when nothing else writes ``directory`` (the main job holds a lock on
    its workdir). Returns the paths removed.
    """
    target = Path(directory).expanduser().absolute()
    recover(target)
    removed = []
    for path in _siblings(target, _STAGING) + (
            _siblings(target, _RETIRED) if target.exists() else []):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _primary() -> bool:
    return jax.process_index() == 0


def save_checkpoint(directory: str | os.PathLike, params: Any, metadata: Mapping[str, Any], *,
                    overwrite: bool = False) -> Path:
    """Write ``params`` and ``metadata`` to the checkpoint directory ``directory``, atomically.

    Args:
      directory: the checkpoint directory to create. Its parent is created if needed.
      params: a pytree of arrays (nested dicts of ``jax.Array``/``np.ndarray``,
        e.g. Flax parameters).
      metadata: JSON-serialisable dict stored verbatim in ``checkpoint.json``.
      overwrite: replace an existing checkpoint at ``directory``. A directory that
        is not a checkpoint is never replaced.
    Returns:
      The absolute path of the checkpoint.
    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False, or it is
        not a checkpoint.
      TypeError: ``metadata`` is not JSON-serialisable.
    """
    target = Path(directory).expanduser().absolute()
    meta = _checked_metadata(metadata)
    if _primary():
        recover(target)
    if target.exists():
        if not is_checkpoint(target):
            raise FileExistsError(
                f"{target} exists and is not a nettransplant checkpoint (no {METADATA_FILE}); "
                "refusing to replace it")
        if not overwrite:
            raise FileExistsError(f"checkpoint {target} already exists; pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)

    # Every process of a multi-process run must name the same staging folder.
    tag = _shared_tag()
    staging = target.parent / f".{target.name}{_STAGING}{tag}"
    try:
        if _primary():
            staging.mkdir()
        _sync("nettransplant.checkpoint.staging")
        # orbax itself writes into a temporary folder and renames it on commit.
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        checkpointer.save(staging / PARAMS_DIR, args=ocp.args.StandardSave(_global(params)))
        if _primary():
            record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                      "params_sha256": tree_digest(params), "metadata": meta}
            with open(staging / METADATA_FILE, "w") as f:
                json.dump(record, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            if target.exists():
                if _exchange(staging, target):
                    shutil.rmtree(staging, ignore_errors=True)  # now the old checkpoint
                else:
                    retired = target.parent / f".{target.name}{_RETIRED}{tag}"
                    os.rename(target, retired)
                    try:
                        os.rename(staging, target)
                    except BaseException:
                        os.rename(retired, target)
                        raise
                    shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(staging, target)
        _sync("nettransplant.checkpoint.committed")
    finally:
        if _primary() and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _shared_tag() -> str:
    """A random tag, the same on every process (process 0's, broadcast)."""
    tag = uuid.uuid4().hex[:8]
    if jax.process_count() == 1:
        return tag
    from jax.experimental import multihost_utils
    value = np.frombuffer(bytes.fromhex(tag), np.uint8).astype(np.int32)
    shared = multihost_utils.broadcast_one_to_all(value)
    return bytes(np.asarray(shared, np.uint8).tolist()).hex()


def _global(tree: Any) -> Any:
    """Multi-process: orbax saves only global arrays, so replicate host-local leaves."""
    if jax.process_count() == 1:
        return tree
    from nettransplant.runtime import parallel
    return parallel.replicate(tree, parallel.data_mesh())


def _abstract(tree: Any) -> Any:
    """Shapes and dtypes to restore into, on this process's first device (any topology)."""
    from nettransplant.runtime import parallel
    sharding = parallel.local_sharding()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(  # arrays or orbax's array metadata
        tuple(getattr(x, "shape", np.shape(x))), jnp.result_type(getattr(x, "dtype", x)),
        sharding=sharding), tree)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _read_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} is not a nettransplant checkpoint: {METADATA_FILE} is missing")
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"corrupt checkpoint {path}: cannot read {meta_path}: {_short(e)}") from e
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"corrupt checkpoint {path}: {meta_path} is not a {CHECKPOINT_FORMAT} record")
    version = record.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this nettransplant reads "
            f"version {CHECKPOINT_FORMAT_VERSION}")
    if not isinstance(record.get("metadata"), dict):
        raise CheckpointError(f"corrupt checkpoint {path}: metadata in {meta_path} is not a dict")
    return record


def stored_digest(directory: str | os.PathLike) -> str | None:
    """The parameters' SHA-256 recorded when the checkpoint was written (None if older)."""
    return _read_record(Path(directory).expanduser().absolute()).get("params_sha256")


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict of the checkpoint at ``directory`` (without reading the params)."""
    return _read_record(Path(directory).expanduser().absolute())["metadata"]


def load_checkpoint(directory: str | os.PathLike, *,
                    target: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the checkpoint written by :func:`save_checkpoint`, checking its content hash.

    Args:
      directory: the checkpoint directory.
      target: optional pytree (arrays or ``jax.ShapeDtypeStruct``\\ s) giving the
        structure, shapes and dtypes to restore into; checked against the stored
        tree. Without it the stored nested-dict structure is returned.
    Returns:
      ``(params, metadata)``: the pytree with ``jax.Array`` leaves and the
      metadata dict.
    Raises:
      FileNotFoundError: ``directory`` does not exist.
      CheckpointError: it is not a checkpoint, is corrupt (unreadable, or its
        parameters differ from their stored SHA-256), or does not match ``target``.
    """
    path = Path(directory).expanduser().absolute()
    for attempt in range(2):  # a replace may land mid-read: read again once if it did
        record = _read_record(path)
        try:
            params = _restore(path, target)
        except CheckpointError:
            if attempt == 0 and _changed(path, record):
                continue
            raise
        stored = record.get("params_sha256")
        if stored is None or tree_digest(params) == stored:
            return jax.tree.map(jnp.asarray, params), record["metadata"]
        if attempt == 0 and _changed(path, record):
            continue
        raise CheckpointError(
            f"corrupt checkpoint {path}: its parameters do not match the SHA-256 recorded when "
            "it was written (a file under params/ was changed or damaged); move it away and "
            "create it again")
    raise AssertionError("unreachable")  # pragma: no cover


def _changed(path: Path, record: Mapping[str, Any]) -> bool:
    try:
        return _read_record(path) != record
    except (CheckpointError, FileNotFoundError):
        return True


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a/b/kernel": (shape, dtype)}`` of a pytree of arrays or ``ShapeDtypeStruct``\\ s."""
    return {"/".join(_key_name(k) for k in p): (tuple(np.shape(v)), str(np.dtype(v.dtype)))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stored_shapes(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a/b/kernel": (shape, dtype)}`` of the stored parameters, without reading them."""
    path = Path(directory).expanduser().absolute()
    _read_record(path)
    try:
        meta = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(path / PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return flat_shapes(tree)
    except Exception as e:  # noqa: BLE001 - unreadable metadata is a corrupt checkpoint
        raise CheckpointError(
            f"corrupt checkpoint {path}: cannot read the metadata of {PARAMS_DIR}/ "
            f"({_short(e)}); move it away and create it again") from e


def shape_mismatches(stored: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """Human-readable differences between two ``{path: (shape, dtype)}`` maps."""
    problems = [f"missing {k} {expected[k][0]}" for k in sorted(set(expected) - set(stored))]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(expected))]
    problems += [f"{k} is {stored[k][0]} {stored[k][1]}, expected {expected[k][0]} "
                 f"{expected[k][1]}" for k in sorted(set(stored) & set(expected))
                 if tuple(stored[k][0]) != tuple(expected[k][0])
                 or stored[k][1] != expected[k][1]]
    return problems


def _restore(path: Path, target: Any | None) -> Any:
    params_path = path / PARAMS_DIR
    if not params_path.is_dir():
        raise CheckpointError(f"corrupt checkpoint {path}: {PARAMS_DIR}/ is missing")
    if target is not None:
        problems = shape_mismatches(stored_shapes(path), flat_shapes(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), target)))
        if problems:
            shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more"
                                               if len(problems) > 6 else "")
            raise CheckpointError(f"checkpoint {path} does not match the expected parameters: "
                                  f"{shown}")
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        if target is None:  # the stored tree's shapes (orbax needs a target across topologies)
            meta = checkpointer.metadata(params_path)
            tree = getattr(meta, "item_metadata", meta)
            target = getattr(tree, "tree", tree)
        return checkpointer.restore(params_path,
                                    args=ocp.args.StandardRestore(_abstract(target)))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        raise CheckpointError(
            f"corrupt checkpoint {path}: cannot restore {PARAMS_DIR}/ ({_short(e)}); move it "
            "away and create it again") from e


def move_aside(directory: str | os.PathLike, reason: str) -> Path | None:
    """Rename ``directory`` to ``<directory>.<reason>-<time>`` (never delete); the new path."""
    path = Path(directory).expanduser().absolute()
    if not path.exists() or not _primary():
        return None
    import time
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
        n += 1
    os.rename(path, aside)
    return aside


def clean_stale_folder(folder: str | os.PathLike) -> list[Path]:
    """:func:`clean_stale` for every checkpoint a crash may have left mid-save in ``folder``."""
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        return []
    names = set()
    for p in root.iterdir():
        for marker in (_STAGING, _RETIRED):
            if p.name.startswith(".") and marker in p.name:
                names.add(p.name[1:].split(marker)[0])
    removed = []
    for name in sorted(names):
        removed += clean_stale(root / name)
    return removed
