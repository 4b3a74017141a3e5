"""Knowledge transfer with Jacobian matching on the embedded silhouettes.

    python -m launch.jacobian_matching --workdir workdir/jacobian_matching
    python -m launch.jacobian_matching --workdir W --config configs/jacobian_matching.py:quick
    python -m launch.jacobian_matching --workdir W --config.distillation.jacobian_weight=3

The full run takes 3.5-5 minutes on a 2-core CPU and writes
``W/results.json``, ``W/results.md`` (our tables beside the paper's, each claim
marked holds / does not hold) and ``W/accuracy_vs_samples.png``,
``W/accuracy_vs_noise.png``. Everything happens in
:func:`nettransplant.jacobian.experiments.run`. A bad flag or config field (checked
before any data is loaded), an unwritable ``--workdir`` or a training that
diverges prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

import configs
from nettransplant import cli
from nettransplant.experiments import config as config_checks
from nettransplant.jacobian import experiments

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "jacobian_matching.py")
_CONFIG = config_checks.define_config_flag(
    _DEFAULT_CONFIG, "experiment config (configs/jacobian_matching.py[:quick])")
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


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_DEFAULT_CONFIG))
