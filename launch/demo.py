"""End-to-end demo on the embedded silhouettes: train a teacher, transplant its category module.

    python -m launch.demo --workdir workdir/demo [--category cat] [--quick]

Runs :func:`nettransplant.experiments.demo.run` (``--quick``: under a minute on a
2-core CPU) and prints its table; writes ``demo_results.json`` and the teacher
checkpoint to ``--workdir``.
"""

from nettransplant.commands.demo import main, run  # noqa: F401 - main: the command's API

if __name__ == "__main__":
    run()
