"""Retrain one cell of the main job with other optimisers, budgets or initialisations.

    python -m launch.fit_probe --workdir workdir/reproduce --experiment exp1_1conv \\
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

from absl import flags

from nettransplant.commands import fit_probe

flags.adopt_module_key_flags(fit_probe)  # --help lists its flags

if __name__ == "__main__":
    fit_probe.run()
