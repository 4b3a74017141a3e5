"""Report on the embedded benchmark: counts, balance, example grids, pixel baselines.

    python -m launch.data_report --json data_report.json --out data_report/

Builds the dataset if needed (offline, about 5 s at 32²), prints per-split
counts and class balance, writes PNG grids of composited examples next to
their mask overlays (one row per category) to ``--out``, and the report
(:func:`nettransplant.data.report.data_report`) to ``--json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nettransplant import cli
from nettransplant.data.report import data_report


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


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
