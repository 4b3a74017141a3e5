"""End-to-end demo on the embedded silhouettes: train a teacher, transplant its category module.

The body of ``python -m launch.demo``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/demo.py``.
"""

from __future__ import annotations

import sys

from nettransplant import data
from nettransplant.configs import silhouettes
from nettransplant.experiments import demo
from nettransplant.runtime import cli, parallel


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--category", default="cat", choices=data.CATEGORIES)
    parser.add_argument("--quick", action="store_true", help="a shorter smoke run")
    parser.add_argument("--num-samples", type=int, default=10)
    parallel.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    cli.check_output_folder(args.workdir, "--workdir")
    parallel.initialize_from_args(args)
    config = silhouettes.get_config("quick" if args.quick else None)
    results = demo.run(config, args.workdir, category=args.category,
                       num_samples=args.num_samples)
    if parallel.is_primary():
        print(demo.format_results(results))
    return results


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.demo`` runs."""
    sys.exit(cli.run_main(main))
