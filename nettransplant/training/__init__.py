"""Training: the one loop every learner uses, teachers, and checkpoints.

* :mod:`~nettransplant.training.loop` — train state, guarded update, the training loop;
* :mod:`~nettransplant.training.teachers` — teacher training (resumable, backbone transfer);
* :mod:`~nettransplant.training.checkpoint` — atomic, hashed orbax checkpoints;
* :mod:`~nettransplant.training.resumable` — a training run's resumable state.
"""
