"""The paper's experiments as library code: config checks, the teacher zoo, the main job.

* :mod:`~nettransplant.experiments.config` — :func:`validate_config`;
* :mod:`~nettransplant.experiments.zoo` — :class:`TeacherZoo` (train, checkpoint,
  reuse, resume every teacher);
* :mod:`~nettransplant.experiments.paper` — :func:`run` (the main job,
  ``nettransplant reproduce``) and the experiments' problems;
* :mod:`~nettransplant.experiments.runner` — its :class:`Runner` (builds problems,
  schedules their cells); :mod:`~nettransplant.experiments.cell_training` trains them;
* :mod:`~nettransplant.experiments.results` — :class:`Results` (every finished cell,
  ``results.json`` and the other outputs);
* :mod:`~nettransplant.experiments.cells` — :class:`Cell`, :class:`CellResult` and
  :class:`CellStore` (finished transplant cells on disk, so a run resumes);
* :mod:`~nettransplant.experiments.timing` — compile time and each cell's clock;
* :mod:`~nettransplant.experiments.workdir` — the workdir's lock, writability check
  and atomic file writes.
"""

from nettransplant.experiments.config import EXPERIMENTS, validate_config
from nettransplant.experiments.paper import run
from nettransplant.experiments.results import Results
from nettransplant.experiments.runner import Runner
from nettransplant.experiments.zoo import TeacherZoo

__all__ = ["EXPERIMENTS", "Results", "Runner", "TeacherZoo", "run", "validate_config"]
