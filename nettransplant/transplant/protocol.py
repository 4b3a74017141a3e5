"""The main job's training protocol: one rule, the same for every method.

Every run trains its method's objective with Adam at its task's rate, from the
method's start, for at most ``num_steps`` steps, and ends at the first check
(every ``check_every`` steps) where it fits its labelled samples
(:func:`nettransplant.transplant.problem.fits_samples`). A run that has not fit by then is
trained again, up to ``restarts`` times, from a re-drawn start — one draw per
(problem, attempt), the same for every method — with the same objective, λ,
rate and budget, and the attempt that fits its samples best is kept.

What a re-drawn start is: a row that starts from a random initialisation
draws a new one; back-distillation's closed-form warm start, which has nothing
random to re-draw, is perturbed by ``restart_noise`` times that draw. Only the
run's own labelled samples decide anything here; test data never does.
``docs/protocol.md`` states the rule for readers and the numbers behind each
setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from nettransplant.transplant import problem

# Separates the restarts' keys from the problem's own draws.
RESTART_SALT = 0x5E57A27


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How every transplant run of the main job trains (module docstring).

    Attributes:
      num_steps: the most steps an attempt trains.
      learning_rate: Adam's rate for classification adapters.
      learning_rate_segmentation: Adam's rate for segmentation adapters.
      check_every: steps between fit checks (0: no early end; an attempt trains
        ``num_steps`` and its fit is checked once, at the end).
      restarts: further attempts of a run that has not fit its samples.
      restart_noise: the scale of the draw that perturbs back-distill's warm start.
    """

    num_steps: int
    learning_rate: float
    learning_rate_segmentation: float
    check_every: int = 10
    restarts: int = 0
    restart_noise: float = 0.3

    @classmethod
    def from_config(cls, transplant_config) -> Protocol:
        """The protocol of ``config.transplant`` (validated by
        :func:`nettransplant.experiments.config.validate_config`)."""
        tc = transplant_config
        return cls(num_steps=int(tc.num_steps), learning_rate=float(tc.learning_rate),
                   learning_rate_segmentation=float(tc.learning_rate_segmentation),
                   check_every=int(tc.early_end_every), restarts=int(tc.restarts),
                   restart_noise=float(tc.restart_noise))

    def rate(self, task_name: str) -> float:
        """Adam's rate for an adapter of ``task_name``'s task module."""
        return self.learning_rate_segmentation if task_name == "segmentation" \
            else self.learning_rate

    @staticmethod
    def fits(task_name: str, train_fit: float | None, reference: float | None) -> bool:
        """Whether an attempt with ``train_fit`` on its samples fits them (None: it
        diverged, which never fits)."""
        return train_fit is not None and problem.fits_samples(task_name, train_fit, reference)

    @staticmethod
    def better(task, candidate: float | None, kept: float | None) -> bool:
        """Whether an attempt's ``candidate`` train fit beats the ``kept`` one's
        (ties keep the earlier attempt; a diverged attempt, None, never wins)."""
        if candidate is None:
            return False
        if kept is None:
            return True
        return candidate > kept if task.higher_is_better else candidate < kept

    def start(self, transplant, method: str, attempt: int, key, first: Any,
              warm_start: Any) -> Any:
        """Where ``attempt`` (0 = the first, 1, 2, … the restarts) of a ``method`` run starts.

        ``first``: the method's own start (the warm start for back-distill, the
        problem's random initialisation for every other row); ``key``: the problem's
        restart key, so attempt ``k`` of every method uses the same draw.
        """
        if attempt == 0:
            return first
        draw_key = jax.random.fold_in(key, attempt)
        if method == "back-distill":
            return problem.perturbed_adapter(transplant, warm_start, draw_key,
                                             self.restart_noise)
        return problem.random_adapter(transplant, draw_key)
