"""Pre-train the embedded benchmark's shared backbone and ship it with the package.

    python -m launch.pretrain --workdir workdir/pretrain

trains the backbone of ``--config`` (default ``configs/silhouettes.py``: its
``seed``, ``model`` and ``pretrain`` sections; resumable in ``--workdir``) and
writes ``nettransplant/pretrained/silhouettes_backbone.{npz,json}``, which the
main job loads instead of training it when its configuration matches
(``--output_dir`` writes elsewhere). The same config and seed give the same
weights on the same CPU family. A bad flag or config field prints one
``error:`` line and exits with 2.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

import configs
from nettransplant import cli
from nettransplant.experiments import config as config_checks
from nettransplant.experiments import pretrain

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_checks.define_config_flag(_DEFAULT_CONFIG, "experiment config")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain",
                               "where the backbone trains (resumable checkpoints)")
_OUTPUT = flags.DEFINE_string("output_dir", str(pretrain.SHIPPED_DIR),
                              "where the .npz and .json are written")


def main(argv) -> int:
    if not cli.start(argv):
        return cli.EXIT_USAGE

    def work() -> None:
        config = _CONFIG.value
        config_checks.validate_config(config)
        cli.check_output_folder(_OUTPUT.value, "--output_dir")
        cli.check_output_folder(_WORKDIR.value, "--workdir")
        record = pretrain.run(config, workdir=_WORKDIR.value, output_dir=_OUTPUT.value)
        print(f"backbone {record['metrics']}: {record['num_params']:,} parameters in "
              f"{_OUTPUT.value}")

    return cli.run_main(work)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_DEFAULT_CONFIG))
