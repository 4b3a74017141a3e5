"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables, plots, a net.

The body of ``python -m launch.reproduce``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/reproduce.py`` (absl prints it for ``--help``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags

from nettransplant import configs
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import paper, report
from nettransplant.experiments.workdir import WorkdirLockedError
from nettransplant.runtime import cli, parallel

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (a nettransplant/configs/*.py file[:variant])")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/reproduce", "where everything is written")
parallel.define_distributed_flags()


def main(argv) -> int:
    if not cli.start(argv):
        return cli.EXIT_USAGE
    parallel.initialize_from_flags()  # a multi-process run: before any other JAX call
    workdir = Path(_WORKDIR.value)

    def work() -> None:
        try:
            results = paper.run(_CONFIG.value, workdir, progress=True)
        except WorkdirLockedError as e:
            raise cli.UsageError(str(e)) from None
        if not parallel.is_primary():  # process 0 reports
            return
        print(report.summary(results))
        print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.json, "
              f"results.md, fig5_pca.png, learning_curves.png; the transplant net in "
              f"{workdir}/net")

    command = " ".join(["python -m launch.reproduce", *map(shlex.quote, sys.argv[1:])])
    return cli.run_main(work, interrupted=(
        f"interrupted; finished teachers and transplant cells are kept in {workdir}: run "
        f"the same command again to resume ({command})"))


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.reproduce`` runs."""
    app.run(main, flags_parser=config_checks.config_flags_parser(_DEFAULT_CONFIG))
