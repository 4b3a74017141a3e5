"""The paper's experiments as library code: config checks, the teacher zoo, the main job.

* :mod:`~nettransplant.experiments.config` — :func:`validate_config`;
* :mod:`~nettransplant.experiments.zoo` — :class:`TeacherZoo` (train, checkpoint,
  reuse, resume every teacher);
* :mod:`~nettransplant.experiments.paper` — :func:`run` (the main job,
  ``nettransplant reproduce``) and its :class:`Runner`;
* :mod:`~nettransplant.experiments.cells` — :class:`CellStore` (finished transplant
  cells on disk, so a run resumes);
* :mod:`~nettransplant.experiments.workdir` — the workdir's lock, writability check
  and atomic file writes.
"""

from nettransplant.experiments.config import EXPERIMENTS, validate_config
from nettransplant.experiments.paper import Runner, run
from nettransplant.experiments.zoo import TeacherZoo

__all__ = ["EXPERIMENTS", "Runner", "TeacherZoo", "run", "validate_config"]
