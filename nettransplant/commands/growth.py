"""Grow a transplant net on the embedded data: choose task modules, fine-tune, measure forgetting.

The body of ``python -m launch.growth``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/growth.py`` (absl prints it for ``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from nettransplant import configs
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import growth
from nettransplant.experiments.workdir import WorkdirLockedError
from nettransplant.runtime import cli

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "net_growth.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (nettransplant/configs/net_growth.py[:variant])")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/reproduce",
                               "the main job's workdir (its teachers are reused)")


def main(argv) -> None:
    if not cli.start(argv):
        sys.exit(cli.EXIT_USAGE)

    def work():
        try:
            results = growth.run(_CONFIG.value, Path(_WORKDIR.value))
        except WorkdirLockedError as e:
            raise cli.UsageError(str(e)) from None
        print(growth.results_markdown(results))
        print(f"runtime {results['runtime_s']:.0f} s; results in "
              f"{Path(_WORKDIR.value) / 'growth'}")

    sys.exit(cli.run_main(work, interrupted="interrupted; run the same command again: the "
                                        "teachers already trained are reused"))


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.growth`` runs."""
    app.run(main, flags_parser=config_checks.config_flags_parser(_DEFAULT_CONFIG))
