"""End-to-end demo on the embedded silhouettes: train a teacher, transplant its category module.

    nettransplant demo --workdir workdir/demo [--category cat] [--quick]

Runs :func:`nettransplant.experiments.demo.run` (``--quick``: under a minute on a
2-core CPU) and prints its table; writes ``demo_results.json`` and the teacher
checkpoint to ``--workdir``. A bad flag prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from nettransplant import data
from nettransplant.configs import silhouettes
from nettransplant.experiments import demo
from nettransplant.runtime import cli, parallel

PROGRAM = "nettransplant demo"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags."""
    flags.DEFINE_string("workdir", None, "where the results and the teacher go",
                        flag_values=values, required=True)
    flags.DEFINE_enum("category", "cat", data.CATEGORIES, "the teacher's category",
                      flag_values=values)
    flags.DEFINE_boolean("quick", False, "a shorter smoke run", flag_values=values)
    flags.DEFINE_integer("num_samples", 10, "labelled samples of the transplant (>= 1)",
                         flag_values=values)
    parallel.define_distributed_flags(values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return cli.parse_flags(argv, define_flags, program=PROGRAM, doc=__doc__)


def run(values: flags.FlagValues) -> dict:
    """The demo of the parsed flags ``values``; returns its results."""
    if values.num_samples < 1:
        raise cli.UsageError(f"--num_samples must be >= 1, got {values.num_samples}")
    cli.check_output_folder(values.workdir, "--workdir")
    parallel.initialize_from_flags(values)
    config = silhouettes.get_config("quick" if values.quick else None)
    results = demo.run(config, values.workdir, category=values.category,
                       num_samples=values.num_samples)
    if parallel.is_primary():
        print(demo.format_results(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant demo`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)
    return cli.run_main(lambda: run(values))
