"""Convert torchvision VGG-16 weights into a nettransplant checkpoint.

    nettransplant convert --weights vgg16-397923af.pth --out ckpt/vgg16 \\
        [--key state_dict] [--num_outputs K] [--seed 0] [--verify] [--overwrite]

Reads a ``.pth``/``.pt``/``.bin`` (needs PyTorch; loaded with
``weights_only=True``, so the file runs no code) or ``.safetensors`` state dict
of torchvision's ``vgg16`` in float32, float16 or bfloat16, converts it with
:func:`nettransplant.interop.vgg16.vgg16_from_state_dict` (``--num_outputs`` replaces
the 1000-class head by a fresh one drawn from ``--seed``) and writes
``{"category_module", "classification_module"}`` (float32) with
:func:`nettransplant.training.checkpoint.save_checkpoint`. A checkpoint dict that wraps
the weights (``{"state_dict": ..., "epoch": ...}``) is unwrapped when one entry
among ``state_dict``, ``model``, ``model_state_dict``, ``net``, ``weights``
holds them; ``--key NAME`` (``a/b`` for a nested entry) names the entry. The
metadata records the source file and its sha256, the architecture,
``num_outputs``, the head, the seed and the nettransplant version. Rebuild the
model with ``nettransplant.interop.vgg16.make_vgg16_classifier(metadata["num_outputs"])``.

``--verify`` (needs PyTorch) compares the converted logits with a PyTorch VGG-16
holding the same weights on random images (224², and 288² fully convolutionally),
prints the max abs/rel differences and writes nothing if they exceed
``--tolerance``. Full-width VGG-16 on a CPU XLA path takes ~10 s per verified size.

Every expected error is one line on stderr, ``error: <message>``: exit status 2
for bad arguments (a missing weights file, an ``--out`` that may not be replaced
or whose folder is not writable, a missing PyTorch) and for a full disk, 1 when
the weights are refused or verification fails. An unexpected error (a bug)
prints its traceback and one line asking for a report. The checkpoint is
written last and atomically, so a failed run leaves whatever was at ``--out``
as it was.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from absl import flags

import nettransplant
from nettransplant.interop import state_dicts, torch_check, vgg16
from nettransplant.runtime import cli
from nettransplant.runtime.files import file_sha256
from nettransplant.training import checkpoint

# Raised by the library for refused weights; anything else is reported as unexpected.
CONVERSION_ERRORS = (ValueError, ImportError, OSError, AssertionError)


PROGRAM = "nettransplant convert"


def _one_line(text: object) -> str:
    """``str(text)`` with its lines joined: each error is one line of output."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags."""
    flags.DEFINE_string("weights", None, "torchvision vgg16 state dict (.pth/.pt/.bin needs "
                        "PyTorch, or .safetensors)", flag_values=values, required=True)
    flags.DEFINE_string("key", None, "entry of a checkpoint dict holding the weights ('a/b' for "
                        "a nested one); default: found among state_dict, model, "
                        "model_state_dict, net, weights", flag_values=values)
    flags.DEFINE_string("out", None, "checkpoint directory to write", flag_values=values,
                        required=True)
    flags.DEFINE_integer("num_outputs", None, "replace the stored head by a fresh K-output head",
                         flag_values=values)
    flags.DEFINE_integer("seed", 0, "seed of the fresh head", flag_values=values)
    flags.DEFINE_boolean("verify", False, "compare logits with PyTorch before writing (needs "
                         "PyTorch)", flag_values=values)
    flags.DEFINE_list("verify_sizes", ["224", "288"], "input sizes to verify at (224 = "
                      "torchvision's classifier, larger = the fully convolutional score map)",
                      flag_values=values)
    flags.DEFINE_float("tolerance", 1e-4, "largest accepted max|Δ| / max|PyTorch logits|",
                       flag_values=values)
    flags.DEFINE_boolean("overwrite", False, "replace an existing checkpoint at --out",
                         flag_values=values)


@dataclasses.dataclass(frozen=True)
class Arguments:
    """The checked command line."""

    weights: Path
    key: str | None
    out: Path
    num_outputs: int | None
    seed: int
    verify: bool
    verify_sizes: tuple[int, ...]
    tolerance: float
    overwrite: bool


def parse_args(argv: Sequence[str] | None = None) -> Arguments:
    """Parse and check the command line; a usage error is one line, exit status 2."""
    values = cli.parse_flags(argv, define_flags, program=PROGRAM, doc=__doc__)
    try:
        verify_sizes = tuple(int(size) for size in values.verify_sizes)
    except ValueError:
        cli.refuse(f"--verify_sizes must be integers, got {','.join(values.verify_sizes)}")
    args = Arguments(weights=Path(values.weights), key=values.key, out=Path(values.out),
                     num_outputs=values.num_outputs, seed=values.seed, verify=values.verify,
                     verify_sizes=verify_sizes, tolerance=values.tolerance,
                     overwrite=values.overwrite)
    if args.weights.is_dir():
        cli.refuse(f"--weights {args.weights} is a directory, not a weights file")
    if not args.weights.is_file():
        cli.refuse(f"--weights {args.weights}: no such file")
    has_torch = importlib.util.find_spec("torch") is not None
    if args.weights.suffix.lower() != ".safetensors" and not has_torch:
        cli.refuse(f"--weights {args.weights} needs PyTorch to read (pip install torch); "
                   "without it, convert the state dict to .safetensors and pass that file")
    if args.key is not None and not args.key.strip("/"):
        cli.refuse("--key must name an entry, got an empty name")
    if args.out.exists():
        if not args.overwrite:
            cli.refuse(f"--out {args.out} exists; pass --overwrite to replace it")
        if not checkpoint.is_checkpoint(args.out):
            cli.refuse(f"--out {args.out} exists and is not a nettransplant checkpoint; "
                       "refusing to replace it (choose another --out)")
    try:  # the checkpoint is written last: refuse an unwritable --out before the work
        cli.check_output_folder(args.out.parent, "--out", create=False)
    except cli.UsageError as e:
        cli.refuse(e)
    if args.verify and not has_torch:
        cli.refuse("--verify needs PyTorch to build the reference VGG-16 (pip install torch); "
                   "run without --verify to convert only")
    if args.num_outputs is not None and args.num_outputs < 1:
        cli.refuse(f"--num_outputs must be >= 1, got {args.num_outputs}")
    if not verify_sizes or min(verify_sizes) < vgg16.INPUT_SIZE:
        cli.refuse(f"--verify_sizes must be >= {vgg16.INPUT_SIZE}")
    if not args.tolerance >= 0:  # also refuses NaN
        cli.refuse(f"--tolerance must be >= 0, got {args.tolerance}")
    return args


def _convert(args: Arguments) -> int:
    """Read, convert, optionally verify, then write: nothing is written before the end."""
    # A .safetensors file's names and shapes are checked before its data is loaded.
    state, origin = state_dicts.read_state_dict(args.weights, key=args.key,
                                                check=vgg16.validate_vgg16_state_dict)
    model, params = vgg16.vgg16_from_state_dict(
        state, origin, num_outputs=args.num_outputs, key=args.seed)
    num_outputs = model.classification_module.num_outputs
    metadata = {
        "architecture": vgg16.ARCHITECTURE,
        "model": type(model).__name__,
        "source": args.weights.name,
        "source_sha256": file_sha256(args.weights),
        "num_outputs": num_outputs,
        "head": "stored" if args.num_outputs is None else "fresh",
        "seed": None if args.num_outputs is None else args.seed,
        "input_size": vgg16.INPUT_SIZE,
        "nettransplant_version": nettransplant.__version__,
    }
    if args.verify:
        results = torch_check.verify_against_torch(state, model, params,
                                                   input_sizes=args.verify_sizes)
        for r in results:
            print(f"verify {r['input_size']}²: output {tuple(r['output_shape'])}, "
                  f"max abs diff {r['max_abs_diff']:.3g}, max rel diff {r['max_rel_diff']:.3g}")
        worst = max(r["max_rel_diff"] for r in results)
        if not worst <= args.tolerance:  # a NaN difference fails too
            raise AssertionError(
                f"converted logits differ from PyTorch by {worst:.3g} (relative) > --tolerance "
                f"{args.tolerance:g}; nothing written")
        metadata["verified"] = results
    path = checkpoint.save_checkpoint(args.out, params, metadata, overwrite=args.overwrite)
    print(f"wrote {path}: {json.dumps(metadata)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, optionally verify, write the checkpoint.

    Returns 0 on success and 1 when the weights are refused, verification fails
    or the checkpoint cannot be written, after printing one ``error:`` line; 2 after
    one line when the disk is full or ``--out`` is read-only or not writable;
    ``--help`` exits with status 0 and invalid arguments with status 2 (``SystemExit``, after
    one ``error:`` line), Ctrl-C with
    :data:`nettransplant.runtime.cli.EXIT_INTERRUPTED` after one line. Any other error is a
    bug: its traceback, then one line asking for a report (status 1).
    """
    args = parse_args(argv)
    try:
        return _convert(args)
    except KeyboardInterrupt:
        # The checkpoint is written last and atomically: nothing at --out has changed.
        print(f"interrupted; {args.out} is as it was", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in cli.DISK_ERRORS:
            print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
            return 1
        # A full disk or a read-only, unwritable --out: one line naming the path.
        print(f"error: {cli.error_message(e)}", file=sys.stderr)
        return cli.EXIT_USAGE
    except CONVERSION_ERRORS as e:
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 1
    except Exception:  # a bug: its traceback, then how to report it
        traceback.print_exc()
        print(cli.BUG_REPORT, file=sys.stderr)
        return cli.EXIT_BUG

