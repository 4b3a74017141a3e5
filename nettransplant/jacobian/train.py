"""Training a whole student: one jitted step factory on the project's one loop.

:func:`make_train_step` turns a loss ``loss_fn(params, frozen, batch, key) ->
(loss, terms)`` into a jitted step with donated state whose update goes
through :func:`~nettransplant.training.loop.guarded_update`; :func:`fit` draws
batches with :class:`~nettransplant.training.loop.IndexStream` and runs
:func:`~nettransplant.training.loop.train_loop`. Every learned parameter is in the
state; everything held fixed (a teacher's parameters, cached teacher targets)
is passed as ``frozen``, an argument of the step — never closed over, so XLA
cannot constant-fold it and one compilation serves every teacher of a shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.training.loop import IndexStream, TrainState, guarded_update, train_loop

Array = jax.Array
Params = Mapping[str, Any]
Batch = Mapping[str, Array]
LossFn = Callable[[Params, Any, Batch, Array], tuple[Array, Mapping[str, Array]]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A jitted ``step(state, frozen, batch, key, index) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, frozen, batch, key) -> (loss, {term: value})``; ``key``
        is ``fold_in(key, index)``, fresh for every step.
      optimizer: updates every leaf of ``state.params``.
    Returns:
      The step; its state argument is donated. ``metrics`` holds ``loss``, each
      term, ``grad_norm``, ``param_norm`` and ``finite`` (the update was applied).
    """

    @partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, frozen: Any, batch: Batch, key: Array, index: Array):
        step_key = jax.random.fold_in(key, index)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, step_key)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer)
        return new_state, {"loss": loss, **terms, "grad_norm": grad_norm,
                           "param_norm": optax.tree.norm(new_state.params), "finite": finite}

    return step


def fit(step, state: TrainState, frozen: Any, data: Mapping[str, np.ndarray], *,
        batch_size: int, num_steps: int, seed: int, log_every: int = 100,
        progress: bool | str = False, what: str = "student") -> tuple[TrainState, list[dict]]:
    """Train ``state`` for ``num_steps`` steps on batches of ``data`` (host arrays, one row each).

    Batches are ``{name: data[name][rows]}`` for rows drawn by a seeded
    :class:`IndexStream` of real rows (a set smaller than a batch repeats within
    it), so every set size shares one compiled shape. The loop reads the device
    back only at logged steps.

    Args:
      step: from :func:`make_train_step`.
      frozen: the step's fixed inputs (teacher parameters, …).
      data: ``{name: (N, …)}`` with a common ``N >= 1``.
    Returns:
      ``(state, history)`` from :func:`~nettransplant.training.loop.train_loop`.
    """
    sizes = {name: len(v) for name, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what}: data arrays differ in length: {sizes}")
    stream = IndexStream(next(iter(sizes.values())), batch_size, seed, padded=False)
    key = jax.random.key(seed)

    def step_args(i: int) -> tuple:
        rows = stream.next()
        return frozen, {name: v[rows] for name, v in data.items()}, key, np.int32(i)

    return train_loop(step, state, step_args, num_steps=num_steps, log_every=log_every,
                      progress=progress, what=what)


def batched_apply(fn: Callable[..., Any], *arrays: np.ndarray, batch_size: int,
                  args: tuple = ()) -> Any:
    """``fn(*args, *rows)`` over fixed-size chunks of ``arrays``, concatenated on the host.

    The last chunk is padded to ``batch_size`` (one compiled shape) and cut back.
    ``fn`` should be jitted and return an array or a pytree of ``(rows, …)`` arrays.
    """
    n = len(arrays[0])
    outputs = []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        real = len(chunk[0])
        if real < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)])
                     for c in chunk]
        out = fn(*args, *chunk)
        outputs.append(jax.tree.map(lambda o, r=real: o[:r], out))
    return jax.tree.map(lambda *parts: np.asarray(jnp.concatenate(parts)), *outputs)
