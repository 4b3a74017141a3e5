"""Jitted adapter training: one train step for every objective, and one loop.

Only θ_h is differentiated: the step takes the adapter's parameters and the
frozen modules' parameters as separate jit arguments (:func:`transplant.split_params`
names the frozen modules once), so no gradient of ``f``, ``g_S`` or ``g_T`` is
ever formed. Back-back-propagation is ``jax.value_and_grad`` through the
adapter's pseudo chain; the frozen chains come from a :class:`ChainCache`
(``recompute_chains=True`` builds the naive step that recomputes them every
step, for benchmarks and tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nettransplant.objectives import (
    ChainCache,
    Method,
    ObjectiveWeights,
    TransferData,
    TransplantScalars,
    objective_terms,
    sample_output_gradients,
)
from nettransplant.transplant import Transplant

Array = jax.Array
Params = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
    """``step`` counts applied (finite) updates; ``params`` are the learned ones only."""

    step: Array
    params: Params
    opt_state: optax.OptState


AdapterTrainState = TrainState  # θ_h only


def guarded_update(state: TrainState, grads: Params, loss: Array,
                   optimizer: optax.GradientTransformation) -> tuple[TrainState, Array, Array]:
    """Apply one optimizer update unless the loss or the gradient is not finite.

    Returns ``(new_state, grad_norm, finite)``; with ``finite`` False the state
    is returned unchanged, so the caller always holds the last good state.
    """
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    return (TrainState(step=state.step + finite.astype(jnp.int32),
                       params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state)), grad_norm, finite)


def create_train_state(adapter_params: Params,
                       optimizer: optax.GradientTransformation) -> AdapterTrainState:
    """A fresh state owning a copy of ``adapter_params`` (the step donates its state)."""
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), adapter_params)
    return AdapterTrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))


@flax.struct.dataclass
class RawDraws:
    """Uncached draws ``(G_y', mask keys)`` for the naive step that recomputes the chains."""

    output_gradients: Array
    mask_keys: Array

    @property
    def num_draws(self) -> int:
        return self.output_gradients.shape[0]

    def take(self, index: Array) -> RawDraws:
        return jax.tree.map(lambda a: a[index], self)


def raw_draws(key: Array, num_draws: int, output_shape: tuple[int, ...]) -> RawDraws:
    """The same draws :func:`objectives.build_chain_cache` caches, uncached."""
    return RawDraws(*sample_output_gradients(key, num_draws, output_shape))


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient; ``state`` is the last good state."""

    def __init__(self, message: str, state: AdapterTrainState, metrics: dict[str, float]):
        super().__init__(message)
        self.state = state
        self.metrics = metrics


StepFn = Callable[..., tuple[AdapterTrainState, dict[str, Array]]]


def make_train_step(transplant: Transplant, method: Method,
                    optimizer: optax.GradientTransformation, *,
                    weights: ObjectiveWeights | None = None,
                    recompute_chains: bool = False) -> StepFn:
    """A jitted ``step(state, frozen, scalars, data, draws, batch_index, draw_index)``.

    Args:
      method: ``"direct-learn"``, ``"distill"``, ``"back-distill"`` or ``"jacobian"``.
      recompute_chains: ``draws`` is a :class:`RawDraws` and the frozen task
        modules' chains are recomputed inside the step (the naive baseline).
    Step args:
      state: :class:`AdapterTrainState` (donated).
      frozen: the frozen modules' params (from :func:`split_params`).
      data: :class:`TransferData` or None (zero-sample back-distillation).
      draws: :class:`ChainCache` (or :class:`RawDraws`), None for other methods.
      batch_index / draw_index: ``(B,)`` / ``(B_d,)`` int rows of ``data`` / ``draws``.
    Returns:
      ``(new_state, metrics)``; metrics hold ``loss``, each term, ``grad_norm``,
      ``param_norm`` and ``finite``. A non-finite loss or gradient leaves the
      state unchanged (the update is not applied).
    """

    def loss_fn(adapter_params, frozen, scalars, batch, draw_batch):
        if recompute_chains and draw_batch is not None:
            g, keys = draw_batch.output_gradients, draw_batch.mask_keys
            draw_batch = ChainCache(transplant.student_task_gradient(frozen, g, keys),
                                    transplant.teacher_gradient(frozen, g, keys), keys)
        terms = objective_terms(method, transplant, adapter_params, frozen, scalars, batch,
                                draw_batch, weights)
        return sum(terms.values()), terms

    @partial(jax.jit, donate_argnums=0)
    def step(state: AdapterTrainState, frozen, scalars: TransplantScalars,
             data: TransferData | None, draws, batch_index, draw_index):
        batch = None if data is None else data.take(batch_index)
        draw_batch = None if draws is None else draws.take(draw_index)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, scalars, batch, draw_batch)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm,
                   "param_norm": optax.tree.norm(new_state.params), "finite": finite}
        return new_state, metrics

    return step


class IndexStream:
    """Deterministic epoch-shuffled indices of fixed batch size.

    With ``padded`` and ``num_valid <= batch_size`` every batch is rows
    ``0..batch_size-1`` (the sample set, padded with masked rows) — one compiled
    shape for every N. Without ``padded`` (a set of real rows only) a set smaller
    than a batch repeats within it, each epoch shuffled.
    """

    def __init__(self, num_valid: int, batch_size: int, seed: int, *, padded: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if num_valid < 1 and not padded:
            raise ValueError(f"cannot draw batches from an empty set ({num_valid} rows)")
        self.num_valid, self.batch_size, self.padded = num_valid, batch_size, padded
        self._rng = np.random.default_rng(seed)
        self._pending = np.zeros((0,), np.int32)

    def next(self) -> np.ndarray:
        if self.padded and self.num_valid <= self.batch_size:
            return np.arange(self.batch_size, dtype=np.int32)
        while self._pending.size < self.batch_size:
            self._pending = np.concatenate(
                [self._pending, self._rng.permutation(self.num_valid).astype(np.int32)])
        batch, self._pending = (self._pending[: self.batch_size],
                                self._pending[self.batch_size:])
        return batch


def train_adapter(step: StepFn, state: AdapterTrainState, frozen: Params,
                  scalars: TransplantScalars, *, num_steps: int,
                  data: TransferData | None = None, num_samples: int = 0, batch_size: int = 32,
                  draws: ChainCache | RawDraws | None = None, draws_per_step: int = 8,
                  seed: int = 0, progress: bool | str = True,
                  log_every: int = 1) -> tuple[AdapterTrainState, list[dict[str, float]]]:
    """Run ``num_steps`` steps; returns the final state and the logged metrics.

    Args:
      data: padded :class:`TransferData` (``num_samples`` real rows) or None.
      draws: the bank of cached draws, or None.
      progress: show a progress bar (a string sets its description).
    Raises:
      NonFiniteError: at the first non-finite loss or gradient, carrying the
        last good state (the failing update was not applied).
    """
    if data is not None and data.size < batch_size:
        raise ValueError(
            f"data holds {data.size} rows, fewer than batch_size {batch_size}; "
            "pad it with make_transfer_data(..., pad_to=batch_size)")
    batches = IndexStream(num_samples, batch_size, seed)
    draw_stream = (IndexStream(draws.num_draws, min(draws_per_step, draws.num_draws), seed + 1)
                   if draws is not None else None)
    history: list[dict[str, float]] = []
    desc = progress if isinstance(progress, str) else "train adapter"
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    for i in bar:
        batch_index = jnp.asarray(batches.next()) if data is not None else None
        draw_index = jnp.asarray(draw_stream.next()) if draws is not None else None
        state, metrics = step(state, frozen, scalars, data, draws, batch_index, draw_index)
        if not bool(metrics["finite"]):
            values = {k: float(v) for k, v in metrics.items()}
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} at step {i}: training stopped, the last good "
                f"state (after {int(state.step)} updates) is kept", state, values)
        if i % log_every == 0 or i == num_steps - 1:
            values = {k: float(v) for k, v in metrics.items() if k != "finite"}
            values["step"] = i
            history.append(values)
            bar.set_postfix(loss=f"{values['loss']:.4g}")
    return state, history
