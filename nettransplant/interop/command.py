"""The ``python -m launch.convert_torchvision`` command: torchvision VGG-16 → a checkpoint.

What it reads, writes and verifies, and its exit codes: :mod:`launch.convert_torchvision`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import nettransplant
from nettransplant.interop import state_dicts, torch_check, vgg16
from nettransplant.runtime import cli
from nettransplant.runtime.files import file_sha256
from nettransplant.training import checkpoint

# Raised by the library for refused weights; anything else is reported as unexpected.
CONVERSION_ERRORS = (ValueError, ImportError, OSError, AssertionError)


def _one_line(text: object) -> str:
    """``str(text)`` with its lines joined: each error is one line of output."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are the tool's one ``error: ...`` line, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {_one_line(message)} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a usage error exits with status 2."""
    parser = _Parser(
        prog="python -m launch.convert_torchvision",
        description="Convert torchvision VGG-16 weights into a nettransplant checkpoint.")
    parser.add_argument("--weights", required=True, type=Path,
                        help="torchvision vgg16 state dict (.pth/.pt/.bin needs PyTorch, or "
                             ".safetensors)")
    parser.add_argument("--key", default=None,
                        help="entry of a checkpoint dict holding the weights ('a/b' for a "
                             "nested one); default: found among state_dict, model, "
                             "model_state_dict, net, weights")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--num-outputs", type=int, default=None,
                        help="replace the stored head by a fresh K-output head")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh head")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with PyTorch before writing (needs PyTorch)")
    parser.add_argument("--verify-sizes", type=int, nargs="+", default=[224, 288],
                        help="input sizes to verify at (224 = torchvision's classifier, larger "
                             "= the fully convolutional score map)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max|Δ| / max|PyTorch logits|")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint at --out")
    args = parser.parse_args(argv)
    if args.weights.is_dir():
        parser.error(f"--weights {args.weights} is a directory, not a weights file")
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    has_torch = importlib.util.find_spec("torch") is not None
    if args.weights.suffix.lower() != ".safetensors" and not has_torch:
        parser.error(f"--weights {args.weights} needs PyTorch to read (pip install torch); "
                     "without it, convert the state dict to .safetensors and pass that file")
    if args.key is not None and not args.key.strip("/"):
        parser.error("--key must name an entry, got an empty name")
    if args.out.exists():
        if not args.overwrite:
            parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
        if not checkpoint.is_checkpoint(args.out):
            parser.error(f"--out {args.out} exists and is not a nettransplant checkpoint; "
                         "refusing to replace it (choose another --out)")
    try:  # the checkpoint is written last: refuse an unwritable --out before the work
        cli.check_output_folder(args.out.parent, "--out", create=False)
    except cli.UsageError as e:
        parser.error(str(e))
    if args.verify and not has_torch:
        parser.error("--verify needs PyTorch to build the reference VGG-16 (pip install torch); "
                     "run without --verify to convert only")
    if args.num_outputs is not None and args.num_outputs < 1:
        parser.error(f"--num-outputs must be >= 1, got {args.num_outputs}")
    if min(args.verify_sizes) < vgg16.INPUT_SIZE:
        parser.error(f"--verify-sizes must be >= {vgg16.INPUT_SIZE}")
    if not args.tolerance >= 0:  # also refuses NaN
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    return args


def _convert(args: argparse.Namespace) -> int:
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
    invalid arguments exit with status 2 (``SystemExit``), Ctrl-C with
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

