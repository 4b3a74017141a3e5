"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables, plots, a net.

    python -m launch.reproduce --workdir workdir/reproduce
    python -m launch.reproduce --workdir W --config configs/silhouettes.py:quick
    python -m launch.reproduce --workdir W --config.generic_category=elephant
    python -m launch.reproduce --workdir W --config configs/voc_vgg16.py \\
        --config.voc.manual_dir=D --config.pretrain.weights=vgg16.pth   # paper scale
    python -m launch.reproduce --workdir W --coordinator_address=host0:1234 \\
        --num_processes=2 --process_id=0   # (and =1 on host1): docs/scaling.md

Everything happens in :func:`nettransplant.experiments.paper.run`; the layout of
``W`` is described in docs/main_job.md. The same command resumes an
interrupted run (finished teachers and transplant cells are kept). A bad flag or
config field prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags

import configs
from nettransplant import cli, parallel, report
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import paper
from nettransplant.experiments.workdir import WorkdirLockedError

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (a configs/*.py file[:variant])")
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


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_DEFAULT_CONFIG))
