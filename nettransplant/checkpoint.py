"""Checkpoints: a parameter pytree stored with orbax plus JSON metadata, written atomically.

A checkpoint is a directory::

    DIR/
      checkpoint.json   {"format": "nettransplant.checkpoint", "format_version": 1,
                         "metadata": {...}}   (the caller's metadata, verbatim)
      params/           the pytree, written by orbax's StandardCheckpointHandler

:func:`save_checkpoint` writes everything into a temporary sibling directory and
renames it into place only once orbax has committed, so a failure part-way
leaves no half-written ``DIR`` and an existing checkpoint at ``DIR`` intact.
Replacing an existing checkpoint (``overwrite=True``) moves the old one aside,
renames the new one in and then deletes the old one; POSIX offers no atomic
exchange of two directories, so a crash between those two renames leaves the
old checkpoint under ``.DIR.old-*`` next to ``DIR``.

:func:`load_checkpoint` returns ``(params, metadata)``; the parameters come back
as ``jax.Array``\\ s in nested dicts (or in ``target``'s structure when one is
given, which is how to restore trees with empty nodes such as optax states:
without a target, empty subtrees are not stored).

Writes are single-process: call :func:`save_checkpoint` from one process.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKPOINT_FORMAT = "nettransplant.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
METADATA_FILE = "checkpoint.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A directory exists but is not a readable nettransplant checkpoint."""


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


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a nettransplant checkpoint (its ``checkpoint.json``)."""
    return (Path(directory) / METADATA_FILE).is_file()


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
    if target.exists():
        if not is_checkpoint(target):
            raise FileExistsError(
                f"{target} exists and is not a nettransplant checkpoint (no {METADATA_FILE}); "
                "refusing to replace it")
        if not overwrite:
            raise FileExistsError(f"checkpoint {target} already exists; pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)

    tag = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.tmp-{tag}"
    try:
        staging.mkdir()
        # orbax itself writes into a temporary folder and renames it on commit.
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        checkpointer.save(staging / PARAMS_DIR, args=ocp.args.StandardSave(params))
        record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                  "metadata": meta}
        with open(staging / METADATA_FILE, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            retired = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict of the checkpoint at ``directory`` (without reading the params)."""
    path = Path(directory).expanduser().absolute()
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
        raise CheckpointError(f"corrupt checkpoint {path}: cannot read {meta_path}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"corrupt checkpoint {path}: {meta_path} is not a {CHECKPOINT_FORMAT} record")
    version = record.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this nettransplant reads "
            f"version {CHECKPOINT_FORMAT_VERSION}")
    metadata = record.get("metadata")
    if not isinstance(metadata, dict):
        raise CheckpointError(f"corrupt checkpoint {path}: metadata in {meta_path} is not a dict")
    return metadata


def load_checkpoint(directory: str | os.PathLike, *,
                    target: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the checkpoint written by :func:`save_checkpoint`.

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
      CheckpointError: it is not a checkpoint, is corrupt, or does not match ``target``.
    """
    path = Path(directory).expanduser().absolute()
    metadata = load_metadata(path)
    params_path = path / PARAMS_DIR
    if not params_path.is_dir():
        raise CheckpointError(f"corrupt checkpoint {path}: {PARAMS_DIR}/ is missing")
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        if target is None:
            params = checkpointer.restore(params_path)
        else:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), target)
            params = checkpointer.restore(params_path, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        what = "corrupt checkpoint" if target is None else "checkpoint does not match target:"
        raise CheckpointError(
            f"{what} {path}: cannot restore {params_path}: {type(e).__name__}: {e}") from e
    return jax.tree.map(jnp.asarray, params), metadata
