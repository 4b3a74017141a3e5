"""Retrain one cell of the main job with other optimisers, budgets or initialisations.

    nettransplant fit-probe --workdir workdir/reproduce --experiment exp1_1conv \\
        --target sheep --method direct-learn --samples 10 --steps 150,600 \\
        --optimizers adam@1e-2,adam@1e-3,adam_warmup_cosine@1e-2,adam_clip@1e-2,sgd_momentum@1e-1

uses (or trains) the teachers in ``--workdir`` (a main job's workdir reuses its
teachers; the config must be that job's), builds the cell's transplant problem
and labelled samples as the main job does, and trains ``--method`` once per
optimiser (default: the main job's) and step count from the cell's first-attempt
initialisation (the main job's restarts, ``config.transplant.restarts``, are not
redone). Every experiment of the main job has cells: ``exp1_1conv``,
``exp1_3conv``, ``exp2``, ``exp3``, ``table4_classification`` and
``table4_segmentation``. It prints a
table (train and validation metric, loss, the adapter's active outputs, the logits on
positive and negative samples) and writes every record to ``--json``. See
:mod:`nettransplant.experiments.fit_probe`.
A bad flag or config field prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.experiments import config as config_checks
from nettransplant.experiments import fit_probe
from nettransplant.runtime import cli, files

PROGRAM = "nettransplant fit-probe"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags besides ``--config``."""
    flags.DEFINE_string("workdir", "workdir/reproduce",
                        "where the teachers are (or are trained)", flag_values=values)
    flags.DEFINE_enum("experiment", "exp1_1conv", fit_probe.EXPERIMENTS,
                      "the cell's experiment", flag_values=values)
    flags.DEFINE_string("target", "sheep", "the cell's target category", flag_values=values)
    flags.DEFINE_string("method", "direct-learn", "the cell's method", flag_values=values)
    flags.DEFINE_integer("samples", 10, "labelled samples", flag_values=values)
    flags.DEFINE_list("steps", ["150"], "step counts, each run with every optimizer",
                      flag_values=values)
    flags.DEFINE_list("optimizers", [],
                      "NAME@RATE, NAME one of " + ", ".join(fit_probe.OPTIMIZERS)
                      + "; none given: the main job's, Adam at the cell's task's rate",
                      flag_values=values)
    flags.DEFINE_enum("init", "random", fit_probe.INITS,
                      "the adapter's initialisation (back-distill: its warm start)",
                      flag_values=values)
    flags.DEFINE_string("json", None, "write every record here (atomically)",
                        flag_values=values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return config_checks.parse_config_flags(
        argv, define_flags, program=PROGRAM, doc=__doc__, default_config="silhouettes",
        config_help="the main job's config")


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant fit-probe`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)

    def work() -> None:
        config = values.config
        config_checks.validate_config(config)
        optimizers = [fit_probe.OptimizerSpec.parse(o) for o in values.optimizers]
        try:
            steps = [int(s) for s in values.steps]
        except ValueError:
            raise ValueError(f"--steps {','.join(values.steps)}: expected integers") from None
        if not steps or min(steps) < 1:
            raise ValueError(f"--steps {','.join(values.steps)}: every count must be ≥ 1")
        if values.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {values.samples}")
        if values.json:
            cli.check_output_folder(Path(values.json).parent, "--json")
        cell = fit_probe.build_cell(config, values.workdir, values.experiment, values.target,
                                    values.samples)
        optimizers = optimizers or [fit_probe.job_optimizer(cell)]
        records = [r for n in steps
                   for r in fit_probe.probe(cell, values.method, optimizers, n, values.init)]
        print(fit_probe.table(cell, values.method, records))
        if values.json:
            files.write_atomically(values.json, json.dumps(
                {"experiment": cell.experiment, "target": cell.target,
                 "method": values.method, "samples": cell.num_samples,
                 "runs": records}, indent=1) + "\n")

    return cli.run_main(work)
