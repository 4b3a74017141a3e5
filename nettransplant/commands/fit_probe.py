"""Retrain one cell of the main job with other optimisers, budgets or initialisations.

The body of ``python -m launch.fit_probe``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/fit_probe.py`` (absl prints it for ``--help``).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from nettransplant import configs
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import fit_probe
from nettransplant.runtime import cli, files

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_checks.define_config_flag(_DEFAULT_CONFIG, "the main job's config")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/reproduce",
                               "where the teachers are (or are trained)")
_EXPERIMENT = flags.DEFINE_enum("experiment", "exp1_1conv", fit_probe.EXPERIMENTS,
                                "the cell's experiment")
_TARGET = flags.DEFINE_string("target", "sheep", "the cell's target category")
_METHOD = flags.DEFINE_string("method", "direct-learn", "the cell's method")
_SAMPLES = flags.DEFINE_integer("samples", 10, "labelled samples")
_STEPS = flags.DEFINE_list("steps", ["150"], "step counts, each run with every optimizer")
_OPTIMIZERS = flags.DEFINE_list("optimizers", [],
                                "NAME@RATE, NAME one of " + ", ".join(fit_probe.OPTIMIZERS)
                                + " (default: the main job's, Adam at the cell's task's rate)")
_INIT = flags.DEFINE_enum("init", "random", fit_probe.INITS,
                          "the adapter's initialisation (back-distill: its warm start)")
_JSON = flags.DEFINE_string("json", None, "write every record here (atomically)")


def main(argv) -> int:
    if not cli.start(argv):
        return cli.EXIT_USAGE

    def work() -> None:
        config = _CONFIG.value
        config_checks.validate_config(config)
        optimizers = [fit_probe.OptimizerSpec.parse(o) for o in _OPTIMIZERS.value]
        try:
            steps = [int(s) for s in _STEPS.value]
        except ValueError:
            raise ValueError(f"--steps {','.join(_STEPS.value)}: expected integers") from None
        if not steps or min(steps) < 1:
            raise ValueError(f"--steps {','.join(_STEPS.value)}: every count must be ≥ 1")
        if _SAMPLES.value < 1:
            raise ValueError(f"--samples must be >= 1, got {_SAMPLES.value}")
        if _JSON.value:
            cli.check_output_folder(Path(_JSON.value).parent, "--json")
        cell = fit_probe.build_cell(config, _WORKDIR.value, _EXPERIMENT.value, _TARGET.value,
                                    _SAMPLES.value)
        optimizers = optimizers or [fit_probe.job_optimizer(cell)]
        records = [r for n in steps
                   for r in fit_probe.probe(cell, _METHOD.value, optimizers, n, _INIT.value)]
        print(fit_probe.table(cell, _METHOD.value, records))
        if _JSON.value:
            files.write_atomically(_JSON.value, json.dumps(
                {"experiment": cell.experiment, "target": cell.target,
                 "method": _METHOD.value, "samples": cell.num_samples,
                 "runs": records}, indent=1) + "\n")

    return cli.run_main(work)


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.fit_probe`` runs."""
    app.run(main, flags_parser=config_checks.config_flags_parser(_DEFAULT_CONFIG))
