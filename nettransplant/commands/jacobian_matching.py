"""Knowledge transfer with Jacobian matching on the embedded silhouettes.

    nettransplant jacobian --workdir workdir/jacobian_matching
    nettransplant jacobian --workdir W --config jacobian_matching:quick
    nettransplant jacobian --workdir W --config.distillation.jacobian_weight=3

The full run takes 3.5-5 minutes on a 2-core CPU and writes
``W/results.json``, ``W/results.md`` (our tables beside the paper's, each claim
marked holds / does not hold) and ``W/accuracy_vs_samples.png``,
``W/accuracy_vs_noise.png``. Everything happens in
:func:`nettransplant.jacobian.experiments.run`. A bad flag or config field (checked
before any data is loaded), an unwritable ``--workdir`` or a training that
diverges prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.experiments import config as config_checks
from nettransplant.jacobian import experiments
from nettransplant.runtime import cli

PROGRAM = "nettransplant jacobian"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags besides ``--config``."""
    flags.DEFINE_string("workdir", "workdir/jacobian_matching", "where results go",
                        flag_values=values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return config_checks.parse_config_flags(
        argv, define_flags, program=PROGRAM, doc=__doc__,
        default_config="jacobian_matching", config_help="experiment config")


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant jacobian`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)
    workdir = Path(values.workdir)

    def work() -> None:
        results = experiments.run(values.config, workdir)
        for claim in results["claims"]:
            print(f"{'holds' if claim['holds'] else 'does not hold'}: {claim['claim']} "
                  f"({claim['evidence']})")
        print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.md")

    return cli.run_main(work, interrupted=f"interrupted; nothing was written to {workdir}: run "
                                          "the same command again to start over")
