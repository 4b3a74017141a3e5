"""Grow a transplant net on the embedded data: choose task modules, fine-tune, measure forgetting.

    nettransplant growth --workdir W          # W: the main job's workdir (teachers reused)
    nettransplant growth --workdir W --config net_growth:quick

Runs :func:`nettransplant.experiments.growth.run`; writes ``W/growth/results.json``
and ``W/growth/results.md`` (what they hold: ``nettransplant/configs/net_growth.py``).
A bad flag or config field prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.experiments import config as config_checks
from nettransplant.experiments import growth
from nettransplant.experiments.workdir import WorkdirLockedError
from nettransplant.runtime import cli

PROGRAM = "nettransplant growth"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags besides ``--config``."""
    flags.DEFINE_string("workdir", "workdir/reproduce",
                        "the main job's workdir (its teachers are reused)", flag_values=values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return config_checks.parse_config_flags(
        argv, define_flags, program=PROGRAM, doc=__doc__, default_config="net_growth",
        config_help="experiment config")


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant growth`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)

    def work():
        try:
            results = growth.run(values.config, Path(values.workdir))
        except WorkdirLockedError as e:
            raise cli.UsageError(str(e)) from None
        print(growth.results_markdown(results))
        print(f"runtime {results['runtime_s']:.0f} s; results in "
              f"{Path(values.workdir) / 'growth'}")

    return cli.run_main(work, interrupted="interrupted; run the same command again: the "
                                          "teachers already trained are reused")
