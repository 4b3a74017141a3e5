"""A training run's resumable state (teachers resume from it after a kill).

:class:`TrainingCheckpoints` keeps the latest state of a run with orbax's
``CheckpointManager``; finished parameters are written as checkpoints by
:mod:`nettransplant.training.checkpoint`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from nettransplant.training.checkpoint import (
    CheckpointError,
    _abstract,
    _checked_metadata,
    _global,
    _primary,
    _short,
    tree_digest,
)


class TrainingCheckpoints:
    """A training run's resumable state, kept by orbax's ``CheckpointManager``.

    The manager commits each save atomically, keeps only the latest step and
    removes the temporary folders a killed save leaves behind; in a
    multi-process run it saves and restores collectively. Each save holds the
    state (a pytree) and JSON metadata: the run's ``fingerprint`` (a resumed
    state must come from the same configuration), its ``history`` and the
    state's content hash (checked on restore).

    Args:
      directory: the folder (``W/teachers/<name>.partial``).
      fingerprint: identifies the configuration that produced the state.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory).expanduser().absolute()
        self.fingerprint = fingerprint
        self._manager = None

    def _open(self):
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                   cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def exists(self) -> bool:
        return self.directory.is_dir() and any(self.directory.iterdir())

    def save(self, step: int, state: Any, history: list) -> None:
        """Store ``state`` (a pytree) as of ``step`` with the history so far."""
        meta = _checked_metadata({"fingerprint": self.fingerprint, "step": int(step),
                                  "history": list(history), "state_sha256": tree_digest(state)})
        self._open().save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(_global(state)), meta=ocp.args.JsonSave(meta)))

    def _latest(self):
        """The orbax manager and the step of its latest save (None: no save)."""
        manager = self._open()
        return manager, manager.latest_step()

    def restore(self, target: Any) -> tuple[Any, list] | None:
        """``(state, history)`` of the latest save, or None if there is none.

        Raises:
          CheckpointError: the saved state is unreadable, damaged (content hash),
            from another configuration (fingerprint) or of another structure.
        """
        if not self.exists():
            return None
        try:
            manager, step = self._latest()
            if step is None:
                return None
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged folders
            raise CheckpointError(
                f"damaged resumable state {self.directory}: {_short(e)}") from e
        meta = restored["meta"] or {}
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"resumable state {self.directory} comes from another "
                                  "configuration")
        state = restored["state"]
        if meta.get("state_sha256") not in (None, tree_digest(state)):
            raise CheckpointError(f"damaged resumable state {self.directory}: its content does "
                                  "not match the SHA-256 recorded when it was saved")
        return state, list(meta.get("history", []))

    def stored_fingerprint(self) -> str | None:
        """The fingerprint of the latest save (None: no save, or unreadable)."""
        if not self.exists():
            return None
        try:
            manager, step = self._latest()
            if step is None:
                return None
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return (meta["meta"] or {}).get("fingerprint")
        except Exception:  # noqa: BLE001 - a damaged folder has no trustworthy fingerprint
            return None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def delete(self) -> None:
        """Remove the folder (the run finished)."""
        self.close()
        if _primary():
            shutil.rmtree(self.directory, ignore_errors=True)
