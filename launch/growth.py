"""Grow a transplant net on the embedded data: choose task modules, fine-tune, measure forgetting.

    python -m launch.growth --workdir W          # W: the main job's workdir (teachers reused)
    python -m launch.growth --workdir W --config configs/net_growth.py:quick

Runs :func:`nettransplant.experiments.growth.run`; writes ``W/growth/results.json``
and ``W/growth/results.md`` (what they hold: ``configs/net_growth.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

import configs
from nettransplant import cli
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import growth
from nettransplant.experiments.workdir import WorkdirLockedError

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "net_growth.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (configs/net_growth.py[:variant])")
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


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_DEFAULT_CONFIG))
