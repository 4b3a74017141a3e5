"""Report on the embedded benchmark: counts, balance, example grids, pixel baselines.

    nettransplant data-report --json data_report.json --out data_report/

Builds the dataset if needed (offline, about 5 s at 32²), prints per-split
counts and class balance, writes PNG grids of composited examples next to
their mask overlays (one row per category) to ``--out``, and the report
(:func:`nettransplant.data.report.data_report`) to ``--json``. A bad flag or an
unwritable output prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.data.report import data_report
from nettransplant.runtime import cli

PROGRAM = "nettransplant data-report"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags."""
    flags.DEFINE_string("json", None, "where the report is written (JSON)",
                        flag_values=values, required=True)
    flags.DEFINE_string("out", None, "folder of the PNG grids", flag_values=values,
                        required=True)
    flags.DEFINE_integer("image_size", 32, "side of the images, in [16, 1024]",
                         flag_values=values)
    flags.DEFINE_integer("seed", 0, "seed of the examples drawn (>= 0)", flag_values=values)
    flags.DEFINE_string("data_dir", None, "where the dataset is built (default: TFDS's)",
                        flag_values=values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return cli.parse_flags(argv, define_flags, program=PROGRAM, doc=__doc__)


def run(values: flags.FlagValues) -> dict:
    """The report of the parsed flags ``values``; returns what it writes to ``--json``."""
    if not 16 <= values.image_size <= 1024:
        raise cli.UsageError(f"--image_size must be in [16, 1024], got {values.image_size}")
    if values.seed < 0:
        raise cli.UsageError(f"--seed must be >= 0, got {values.seed}")
    cli.check_output_folder(values.out, "--out")
    cli.check_output_folder(Path(values.json).parent, "--json")
    return data_report(json_path=values.json, out=values.out, image_size=values.image_size,
                       seed=values.seed, data_dir=values.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant data-report`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)
    return cli.run_main(lambda: run(values))
