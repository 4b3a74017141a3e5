"""Pre-train the embedded benchmark's shared backbone.

    nettransplant pretrain --workdir workdir/pretrain
    nettransplant pretrain --workdir workdir/pretrain --output_dir nettransplant/pretrained

trains the backbone of ``--config`` (default ``silhouettes``: its ``seed``, ``model`` and
``pretrain`` sections; resumable in ``--workdir``) and writes
``silhouettes_backbone.{npz,json}`` to ``--output_dir`` (default ``<workdir>/backbone``).
Written to ``nettransplant/pretrained`` of a checkout, they ship with the package: the
main job loads them instead of training the backbone when its configuration matches.
The same config and seed give the same weights on the same CPU family. A bad flag or
config field prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.data import benchmarks
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import pretrain
from nettransplant.experiments.zoo import TeacherZoo
from nettransplant.runtime import cli

PROGRAM = "nettransplant pretrain"


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags besides ``--config``."""
    flags.DEFINE_string("workdir", "workdir/pretrain",
                        "where the backbone trains (resumable checkpoints)", flag_values=values)
    flags.DEFINE_string("output_dir", None,
                        "where the .npz and .json are written (default: <workdir>/backbone)",
                        flag_values=values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return config_checks.parse_config_flags(
        argv, define_flags, program=PROGRAM, doc=__doc__, default_config="silhouettes",
        config_help="experiment config")


def train_and_ship(config, *, workdir: str | Path, output_dir: str | Path | None = None,
        progress: bool = True) -> dict:
    """Train the backbone of ``config`` (resumably, in ``workdir/teachers``) and ship it.

    Returns the record written next to the weights.
    """
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.pretrain.shipped = False  # train it, do not load it
    zoo = TeacherZoo(config, Path(workdir), benchmarks.make_benchmark(config), progress)
    start = time.monotonic()
    params = zoo.backbone()
    record = {"fingerprint": zoo.backbone_fingerprint(), "metrics": zoo.metrics["backbone"],
              "history": zoo.curves["backbone"], "seed": config.seed,
              "data": config.data, "data_version": zoo.benchmark.version,
              "model": config.model.to_dict(),
              "pretrain": {k: v for k, v in config.pretrain.to_dict().items()
                           if k not in ("shipped", "weights")},
              "train_seconds": round(time.monotonic() - start, 1),
              "command": f"{pretrain.COMMAND} --workdir {workdir}"}
    return pretrain.save_backbone(params, record, output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant pretrain`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)
    output_dir = values.output_dir or str(Path(values.workdir) / "backbone")

    def work() -> None:
        config = values.config
        config_checks.validate_config(config)
        cli.check_output_folder(output_dir, "--output_dir")
        cli.check_output_folder(values.workdir, "--workdir")
        record = train_and_ship(config, workdir=values.workdir, output_dir=output_dir)
        print(f"backbone {record['metrics']}: {record['num_params']:,} parameters in "
              f"{output_dir}")

    return cli.run_main(work)
