"""Report on the embedded benchmark: counts, balance, example grids, pixel baselines.

The body of ``python -m launch.data_report``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/data_report.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nettransplant.data.report import data_report
from nettransplant.runtime import cli


def main(argv: list[str] | None = None) -> dict:
    """Runs the report; returns what it writes to ``--json``."""
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", required=True)
    parser.add_argument("--out", metavar="DIR", required=True)
    parser.add_argument("--image-size", "--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", "--data_dir", default=None)
    args = parser.parse_args(argv)
    if not 16 <= args.image_size <= 1024:
        parser.error(f"--image-size must be in [16, 1024], got {args.image_size}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    cli.check_output_folder(args.out, "--out")
    cli.check_output_folder(Path(args.json).parent, "--json")
    return data_report(json_path=args.json, out=args.out, image_size=args.image_size,
                       seed=args.seed, data_dir=args.data_dir)


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.data_report`` runs."""
    sys.exit(cli.run_main(main))
