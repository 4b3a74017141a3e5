"""The ``nettransplant`` console script: one command line, a subcommand per job.

    nettransplant reproduce --workdir W          # the paper's experiments (the main job)
    nettransplant <command> --help               # what a command does, its flags and defaults

Each command is a module with ``main(argv) -> exit code``: the bodies in this package,
and beside their libraries ``net`` (:mod:`nettransplant.net.commands`) and ``convert``
(:mod:`nettransplant.interop.command`). ``python -m nettransplant`` runs the same, and in
a checkout ``python -m launch.X`` runs one command. Only the chosen command's module is
imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from nettransplant.runtime import cli

PROGRAM = "nettransplant"

# name: (module, what it does)
COMMANDS = {
    "reproduce": ("nettransplant.commands.reproduce",
                  "the paper's experiments end to end: teachers, Exps. 1-3, Table 4, a net"),
    "net": ("nettransplant.net.commands", "build, grow, inspect and use a transplant net"),
    "growth": ("nettransplant.commands.growth",
               "grow a transplant net on the embedded data, measure forgetting"),
    "jacobian": ("nettransplant.commands.jacobian_matching",
                 "knowledge transfer with Jacobian matching on the embedded silhouettes"),
    "pretrain": ("nettransplant.commands.pretrain",
                 "pre-train the embedded benchmark's shared backbone"),
    "benchmark": ("nettransplant.commands.benchmark",
                  "step-time benchmark of back-distillation and its data-parallel scaling"),
    "convert": ("nettransplant.interop.command",
                "convert torchvision VGG-16 weights into a nettransplant checkpoint"),
    "data-report": ("nettransplant.commands.data_report",
                    "report on the embedded benchmark: counts, balance, example grids"),
    "fit-probe": ("nettransplant.commands.fit_probe",
                  "retrain one cell of the main job with other optimisers or budgets"),
    "demo": ("nettransplant.commands.demo",
             "train a teacher on the embedded silhouettes and transplant its category module"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant <command> [flags]`` on ``argv`` (default ``sys.argv[1:]``).

    Returns the command's exit code; ``--help`` prints the commands (0). No command or an
    unknown one is one ``error:`` line (``SystemExit`` with status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = cli.choose_command(argv, {name: summary for name, (_, summary) in COMMANDS.items()},
                              program=PROGRAM)
    if name is None:  # --help
        return 0
    return importlib.import_module(COMMANDS[name][0]).main(argv[1:])


def console() -> None:
    """The console script's entry point: :func:`main` on ``sys.argv``, as the exit status."""
    sys.exit(main())
