"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables, plots, a net.

    python -m launch.reproduce --workdir workdir/reproduce
    python -m launch.reproduce --workdir W --config configs/silhouettes.py:quick
    python -m launch.reproduce --workdir W --config.generic_category=elephant
    python -m launch.reproduce --workdir W --config configs/voc_vgg16.py \\
        --config.voc.manual_dir=D --config.pretrain.weights=vgg16.pth   # paper scale
    python -m launch.reproduce --workdir W --coordinator_address=host0:1234 \\
        --num_processes=2 --process_id=0   # (and =1 on host1): docs/scaling.md

Everything happens in :func:`nettransplant.experiments.paper.run`; the layout of
``W`` is described in the README ("The main job").
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from nettransplant import parallel, report
from nettransplant.experiments import paper

_DEFAULT_CONFIG = str(Path(configs.__file__).parent / "silhouettes.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "experiment config (a configs/*.py file[:variant])")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/reproduce", "where everything is written")
parallel.define_distributed_flags()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    parallel.initialize_from_flags()  # a multi-process run: before any other JAX call
    workdir = Path(_WORKDIR.value)
    results = paper.run(_CONFIG.value, workdir, progress=True)
    if not parallel.is_primary():
        return
    print(report.summary(results))
    print(f"runtime {results['runtime_s']:.0f} s; results in {workdir}/results.json, "
          f"results.md, fig5_pca.png, learning_curves.png; the transplant net in {workdir}/net")


if __name__ == "__main__":
    app.run(main)
