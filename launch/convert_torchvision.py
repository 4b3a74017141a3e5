"""Convert torchvision VGG-16 weights into a nettransplant checkpoint.

    python -m launch.convert_torchvision --weights vgg16-397923af.pth --out ckpt/vgg16 \\
        [--num-outputs K] [--seed 0] [--verify] [--overwrite]

Reads a ``.pth`` (needs PyTorch) or ``.safetensors`` state dict of torchvision's
``vgg16``, converts it with :func:`nettransplant.convert.load_torchvision_vgg16`
(``--num-outputs`` replaces the 1000-class head by a fresh one drawn from
``--seed``) and writes ``{"category_module", "classification_module"}`` with
:func:`nettransplant.checkpoint.save_checkpoint`. The metadata records the source
file and its sha256, the architecture, ``num_outputs``, the head, the seed and the
nettransplant version. Rebuild the model with
``convert.make_vgg16_classifier(metadata["num_outputs"])``.

``--verify`` (needs PyTorch) compares the converted logits with a PyTorch VGG-16
holding the same weights on random images (224², and 288² fully convolutionally),
prints the max abs/rel differences and writes nothing if they exceed
``--tolerance``. Full-width VGG-16 on a CPU XLA path takes ~10 s per verified size.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import nettransplant
from nettransplant import checkpoint, convert


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.convert_torchvision",
        description="Convert torchvision VGG-16 weights into a nettransplant checkpoint.")
    parser.add_argument("--weights", required=True, type=Path,
                        help="torchvision vgg16 state dict (.pth/.pt needs PyTorch, or "
                             ".safetensors)")
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
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.verify and importlib.util.find_spec("torch") is None:
        parser.error("--verify needs PyTorch to build the reference VGG-16 (pip install torch); "
                     "run without --verify to convert only")
    if args.num_outputs is not None and args.num_outputs < 1:
        parser.error(f"--num-outputs must be >= 1, got {args.num_outputs}")
    if min(args.verify_sizes) < convert.INPUT_SIZE:
        parser.error(f"--verify-sizes must be >= {convert.INPUT_SIZE}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, optionally verify, write the checkpoint.

    Returns 0 on success and 1 when the weights are refused or verification fails;
    invalid arguments exit with status 2.
    """
    args = parse_args(argv)
    try:
        model, params = convert.load_torchvision_vgg16(
            args.weights, num_outputs=args.num_outputs, key=args.seed)
    except (ValueError, ImportError) as e:  # not a VGG-16 state dict, or unreadable
        print(f"error: {e}", file=sys.stderr)
        return 1
    num_outputs = model.classification_module.num_outputs
    metadata = {
        "architecture": convert.ARCHITECTURE,
        "model": type(model).__name__,
        "source": args.weights.name,
        "source_sha256": _sha256(args.weights),
        "num_outputs": num_outputs,
        "head": "stored" if args.num_outputs is None else "fresh",
        "seed": None if args.num_outputs is None else args.seed,
        "input_size": convert.INPUT_SIZE,
        "nettransplant_version": nettransplant.__version__,
    }
    if args.verify:
        state, _ = convert.read_state_dict(args.weights)
        results = convert.verify_against_torch(state, model, params,
                                               input_sizes=args.verify_sizes)
        for r in results:
            print(f"verify {r['input_size']}²: output {tuple(r['output_shape'])}, "
                  f"max abs diff {r['max_abs_diff']:.3g}, max rel diff {r['max_rel_diff']:.3g}")
        worst = max(r["max_rel_diff"] for r in results)
        if worst > args.tolerance:
            print(f"error: converted logits differ from PyTorch by {worst:.3g} (relative) > "
                  f"--tolerance {args.tolerance:g}; nothing written", file=sys.stderr)
            return 1
        metadata["verified"] = results
    path = checkpoint.save_checkpoint(args.out, params, metadata, overwrite=args.overwrite)
    print(f"wrote {path}: {json.dumps(metadata)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
