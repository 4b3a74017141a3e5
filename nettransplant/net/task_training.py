"""Training a task module on frozen features: what :func:`~nettransplant.net.operations.add_task`
and :func:`~nettransplant.net.operations.fine_tune` run (the one training loop,
:func:`nettransplant.training.loop.train_loop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.net.graph import TaskModule
from nettransplant.training import loop

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class TaskTrainingSettings:
    """How a task module is trained on frozen features (:func:`add_task`, :func:`fine_tune`)."""

    num_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-4
    log_every: int = 25
    seed: int = 0


def task_step(module: TaskModule, optimizer: optax.GradientTransformation):
    """Jitted ``step(state, key, features, targets)``: the task loss, dropout on."""

    def loss_fn(params, key, x, targets):
        y = module.apply({"params": params}, x, train=True, rngs={"dropout": key})[0]
        return module.task.loss(y, targets, jnp.ones((x.shape[0],), jnp.float32))

    @partial(jax.jit, donate_argnums=0)
    def step(state, key, x, targets):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, key, x, targets)
        new_state, grad_norm, finite = loop.guarded_update(state, grads, loss, optimizer)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step


def train_task_module(module: TaskModule, params: Params, features: np.ndarray,
                       targets: np.ndarray, settings: TaskTrainingSettings, what: str
                       ) -> tuple[Params, list[dict[str, float]]]:
    """``params`` after ``settings.num_steps`` steps of the task loss on ``features``
    (frozen: computed once) and ``targets``; ``(params, history)``."""
    optimizer = optax.adam(settings.learning_rate)
    state = loop.create_train_state(params, optimizer)
    stream = loop.IndexStream(len(targets), settings.batch_size, settings.seed,
                              padded=False)
    key = jax.random.key(settings.seed)

    def step_args(i):
        rows = stream.next()
        return jax.random.fold_in(key, i), features[rows], targets[rows]

    state, history = loop.train_loop(
        task_step(module, optimizer), state, step_args, num_steps=settings.num_steps,
        log_every=settings.log_every, progress=what, what=what)
    return state.params, history
