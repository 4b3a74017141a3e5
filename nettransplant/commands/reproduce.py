"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables, plots, a net.

    nettransplant reproduce --workdir workdir/reproduce
    nettransplant reproduce --workdir W --config silhouettes:quick
    nettransplant reproduce --workdir W --config.generic_category=elephant
    nettransplant reproduce --workdir W --config voc_vgg16 \\
        --config.voc.manual_dir=D --config.pretrain.weights=vgg16.pth   # paper scale
    nettransplant reproduce --workdir W --coordinator_address=host0:1234 \\
        --num_processes=2 --process_id=0   # (and =1 on host1): docs/scaling.md

Everything happens in :func:`nettransplant.experiments.paper.run`; the layout of
``W`` is described in docs/main_job.md. The same command resumes an
interrupted run (finished teachers and transplant cells are kept). A bad flag or
config field prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.experiments import config as config_checks
from nettransplant.experiments import paper, report
from nettransplant.experiments.workdir import WorkdirLockedError
from nettransplant.runtime import cli, parallel

PROGRAM = "nettransplant reproduce"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags besides ``--config``."""
    flags.DEFINE_string("workdir", "workdir/reproduce", "where everything is written",
                        flag_values=values)
    parallel.define_distributed_flags(values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return config_checks.parse_config_flags(
        argv, define_flags, program=PROGRAM, doc=__doc__, default_config="silhouettes",
        config_help="experiment config")


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant reproduce`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = parse(argv)
    parallel.initialize_from_flags(values)  # a multi-process run: before any other JAX call
    workdir = Path(values.workdir)

    def work() -> None:
        try:
            results = paper.run(values.config, workdir, progress=True)
        except WorkdirLockedError as e:
            raise cli.UsageError(str(e)) from None
        if not parallel.is_primary():  # process 0 reports
            return
        print(report.summary(results))
        print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.json, "
              f"results.md, fig5_pca.png, learning_curves.png; the transplant net in "
              f"{workdir}/net")

    command = " ".join([PROGRAM, *map(shlex.quote, argv)])
    return cli.run_main(work, interrupted=(
        f"interrupted; finished teachers and transplant cells are kept in {workdir}: run "
        f"the same command again to resume ({command})"))
