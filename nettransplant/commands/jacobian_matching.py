"""Knowledge transfer with Jacobian matching on the embedded silhouettes.

The body of ``python -m launch.jacobian_matching``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/jacobian_matching.py`` (absl prints it for ``--help``).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from nettransplant import configs
from nettransplant.experiments import config as config_checks
from nettransplant.jacobian import experiments
from nettransplant.runtime import cli

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "jacobian_matching.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (nettransplant/configs/jacobian_matching.py[:quick])")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/jacobian_matching", "where results go")


def main(argv) -> int:
    if not cli.start(argv):
        return cli.EXIT_USAGE
    workdir = Path(_WORKDIR.value)

    def work() -> None:
        results = experiments.run(_CONFIG.value, workdir)
        for claim in results["claims"]:
            print(f"{'holds' if claim['holds'] else 'does not hold'}: {claim['claim']} "
                  f"({claim['evidence']})")
        print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.md")

    return cli.run_main(work, interrupted=f"interrupted; nothing was written to {workdir}: run "
                                          "the same command again to start over")


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.jacobian_matching`` runs."""
    app.run(main, flags_parser=config_checks.config_flags_parser(_DEFAULT_CONFIG))
