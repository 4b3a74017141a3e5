"""The shipped backbone: pre-trained once by ``nettransplant pretrain``, loaded by the main job.

The embedded benchmark's teachers all start from one backbone (10-way
classification of every category + segmentation of every training image; the
stand-in for ImageNet pre-training). Trained long enough to be a credible
stand-in it costs more than the main job's time budget on a CPU, so the
package ships it: ``nettransplant/pretrained/<name>.npz`` (the parameters,
flattened, plain arrays) and ``<name>.json`` (the fingerprint of the
configuration that trained it, its test metrics and loss curve, the parameters'
SHA-256 and the command that rebuilds it).

:meth:`TeacherZoo.backbone <nettransplant.experiments.zoo.TeacherZoo.backbone>`
uses the shipped file when ``config.pretrain.shipped`` is on and the file was
trained with exactly the configuration asked for (same fingerprint: seed, data
version, model, pre-training settings); otherwise it trains the backbone as
before. Loading never executes code (``numpy.load(allow_pickle=False)``) and
checks the SHA-256 and every parameter's name and shape, naming the offending
one.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nettransplant.experiments.cells import flatten, unflatten
from nettransplant.runtime.files import file_sha256, write_atomically

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
NAME = "silhouettes_backbone"
COMMAND = "nettransplant pretrain"


class ShippedBackboneError(ValueError):
    """A shipped backbone file that cannot be used (damaged, or not this model's)."""


def shipped_files(directory: str | Path | None = None, name: str = NAME
                  ) -> tuple[Path, Path]:
    """``(weights .npz, record .json)`` of a shipped backbone (default: the package's)."""
    directory = Path(SHIPPED_DIR if directory is None else directory)
    return directory / f"{name}.npz", directory / f"{name}.json"


def save_backbone(params: Any, record: dict, directory: str | Path | None = None,
                  name: str = NAME) -> dict:
    """Write the parameters and their record, each file replaced in one rename.

    ``record`` must hold the ``fingerprint`` the zoo matches against; the
    parameters' file name, SHA-256 and count are added to it. Returns the record
    as written.
    """
    if "fingerprint" not in record:
        raise ValueError("the backbone's record needs its configuration's 'fingerprint'")
    weights, meta = shipped_files(directory, name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    arrays = {k: np.asarray(v, np.float32) for k, v in flatten(jax.device_get(params)).items()}
    np.savez_compressed(buffer, **arrays)
    write_atomically(weights, buffer.getvalue())
    record = {**record, "params_file": weights.name, "params_sha256": file_sha256(weights),
              "num_params": int(sum(a.size for a in arrays.values())),
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomically(meta, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def read_record(directory: str | Path | None = None, name: str = NAME) -> dict | None:
    """The shipped backbone's record, or None when there is none."""
    _, meta = shipped_files(directory, name)
    if not meta.exists():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShippedBackboneError(f"{meta}: unreadable ({e})") from None
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise ShippedBackboneError(f"{meta}: not a backbone record (no 'fingerprint')")
    return record


def load_backbone(template: Any, directory: str | Path | None = None, name: str = NAME
                  ) -> tuple[Any, dict]:
    """The shipped parameters, checked against ``template`` (same names and shapes).

    Raises:
      ShippedBackboneError: no file, a SHA-256 mismatch, a missing, extra or
        mis-shaped parameter (named), or a file numpy cannot read without pickle.
    """
    record = read_record(directory, name)
    weights, meta = shipped_files(directory, name)
    if record is None or not weights.exists():
        raise ShippedBackboneError(f"no shipped backbone {weights}")
    digest = file_sha256(weights)
    if digest != record.get("params_sha256"):
        raise ShippedBackboneError(
            f"{weights}: SHA-256 {digest[:12]}… does not match {meta.name} "
            f"({str(record.get('params_sha256'))[:12]}…); rebuild it with {COMMAND}")
    try:
        with np.load(weights, allow_pickle=False) as stored:
            flat = {k: stored[k] for k in stored.files}
    except (OSError, ValueError) as e:
        raise ShippedBackboneError(f"{weights}: unreadable ({e})") from None
    expected = flatten(jax.device_get(template))
    for key in sorted(set(expected) | set(flat)):
        if key not in flat:
            raise ShippedBackboneError(f"{weights}: parameter {key!r} is missing")
        if key not in expected:
            raise ShippedBackboneError(f"{weights}: parameter {key!r} is not in the model")
        if flat[key].shape != expected[key].shape:
            raise ShippedBackboneError(
                f"{weights}: parameter {key!r} has shape {flat[key].shape}, the model "
                f"{expected[key].shape}")
    return jax.tree.map(jax.numpy.asarray, unflatten(flat)), record
