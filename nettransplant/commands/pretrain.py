"""Pre-train the embedded benchmark's shared backbone and ship it with the package.

The body of ``python -m launch.pretrain``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/pretrain.py`` (absl prints it for ``--help``).
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from nettransplant import configs
from nettransplant.data import benchmarks
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import pretrain
from nettransplant.experiments.zoo import TeacherZoo
from nettransplant.runtime import cli

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_checks.define_config_flag(_DEFAULT_CONFIG, "experiment config")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain",
                               "where the backbone trains (resumable checkpoints)")
_OUTPUT = flags.DEFINE_string("output_dir", str(pretrain.SHIPPED_DIR),
                              "where the .npz and .json are written")


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


def main(argv) -> int:
    if not cli.start(argv):
        return cli.EXIT_USAGE

    def work() -> None:
        config = _CONFIG.value
        config_checks.validate_config(config)
        cli.check_output_folder(_OUTPUT.value, "--output_dir")
        cli.check_output_folder(_WORKDIR.value, "--workdir")
        record = train_and_ship(config, workdir=_WORKDIR.value, output_dir=_OUTPUT.value)
        print(f"backbone {record['metrics']}: {record['num_params']:,} parameters in "
              f"{_OUTPUT.value}")

    return cli.run_main(work)


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.pretrain`` runs."""
    app.run(main, flags_parser=config_checks.config_flags_parser(_DEFAULT_CONFIG))
