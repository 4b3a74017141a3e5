"""Jitted adapter training: one train step for every objective, and one loop.

Only θ_h is differentiated: the step takes the adapter's parameters and the
frozen modules' parameters as separate jit arguments (:func:`transplant.split_params`
names the frozen modules once), so no gradient of ``f``, ``g_S`` or ``g_T`` is
ever formed. Back-back-propagation is ``jax.value_and_grad`` through the
adapter's pseudo chain; the frozen chains come from a :class:`ChainCache`
(``recompute_chains=True`` builds the naive step that recomputes them every
step, for benchmarks and tests).

Steps are data parallel over a device mesh (:mod:`nettransplant.runtime.parallel`):
θ_h, its optimizer state, the frozen parameters and the cached bank are
replicated; each step's labelled batch and its batch of draws are split over
the ``data`` axis, so a step's batch and draw counts must divide by its size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from nettransplant.runtime import parallel
from nettransplant.training.loop import (
    IndexStream,
    NonFiniteError,
    TrainState,
    guarded_update,
    train_loop,
)
from nettransplant.transplant.objectives import (
    ChainCache,
    Method,
    ObjectiveWeights,
    TransferData,
    TransplantScalars,
    objective_terms,
    sample_output_gradients,
)
from nettransplant.transplant.wiring import Draws, Transplant

Array = jax.Array
Params = Mapping[str, Any]


AdapterTrainState = TrainState  # θ_h only


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


def raw_draws(key: Array, num_draws: int, output_shape: tuple[int, ...], *,
              draws: Draws = "randomised") -> RawDraws:
    """The same draws :func:`objectives.build_chain_cache` caches, uncached
    (``draws``: the transplant's :attr:`~nettransplant.transplant.wiring.Transplant.draws`)."""
    return RawDraws(*sample_output_gradients(key, num_draws, output_shape, draws=draws))


StepFn = Callable[..., tuple[AdapterTrainState, dict[str, Array]]]


def objective_loss(transplant: Transplant, method: Method, weights: ObjectiveWeights | None,
             recompute_chains: bool = False):
    """``loss(adapter_params, frozen, scalars, batch, draw_batch) -> (loss, terms)``."""

    def loss_fn(adapter_params, frozen, scalars, batch, draw_batch):
        if recompute_chains and draw_batch is not None:
            g, keys = draw_batch.output_gradients, draw_batch.mask_keys
            draw_batch = ChainCache(transplant.student_task_gradient(frozen, g, keys),
                                    transplant.teacher_gradient(frozen, g, keys), keys)
        terms = objective_terms(method, transplant, adapter_params, frozen, scalars, batch,
                                draw_batch, weights)
        return sum(terms.values()), terms
    return loss_fn


def make_train_step(transplant: Transplant, method: Method,
                    optimizer: optax.GradientTransformation, *,
                    weights: ObjectiveWeights | None = None,
                    recompute_chains: bool = False,
                    mesh: jax.sharding.Mesh | None = None) -> StepFn:
    """A jitted ``step(state, frozen, scalars, data, draws, batch_index, draw_index)``.

    Args:
      method: ``"direct-learn"``, ``"distill"``, ``"back-distill"`` or ``"jacobian"``.
      recompute_chains: ``draws`` is a :class:`RawDraws` and the frozen task
        modules' chains are recomputed inside the step (the naive baseline).
      mesh: the devices, data parallel (default: every device on one ``data``
        axis). The state comes back replicated; ``B`` and ``B_d`` must divide by
        the ``data`` axis' size (a ValueError names both numbers).
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

    loss_fn = objective_loss(transplant, method, weights, recompute_chains)
    mesh = mesh or parallel.data_mesh()

    @partial(jax.jit, donate_argnums=0, out_shardings=parallel.replicated(mesh))
    def sharded_step(state: AdapterTrainState, frozen, scalars: TransplantScalars,
             data: TransferData | None, draws, batch_index, draw_index):
        batch = draw_batch = None
        if data is not None:  # the labelled batch axis, split over ``data``
            parallel.check_divisible("adapter batch size", batch_index.shape[0], mesh)
            batch = parallel.constrain_batch(data.take(batch_index), mesh)
        if draws is not None:  # the draws axis of the cached bank, split over ``data``
            parallel.check_divisible("draws per step", draw_index.shape[0], mesh)
            draw_batch = parallel.constrain_batch(draws.take(draw_index), mesh)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, scalars, batch, draw_batch)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm,
                   "param_norm": optax.tree.norm(new_state.params), "finite": finite}
        return new_state, metrics

    return parallel.state_enters_replicated(sharded_step, mesh)


def batch_rows(num_samples: int, batch_size: int, mesh: jax.sharding.Mesh | None = None) -> int:
    """The rows a step of :func:`train_adapter` computes for ``num_samples`` samples.

    ``batch_size``, or with fewer samples the real rows only, rounded up to a multiple
    of the mesh's ``data`` axis: every batch is then the whole sample set, and padding
    rows would add nothing to any loss (masked means) while costing as much as a real
    one.
    """
    if num_samples >= batch_size:
        return batch_size
    shards = parallel.data_size(mesh or parallel.data_mesh())
    return -(-num_samples // shards) * shards


def train_adapter(step: StepFn, state: AdapterTrainState, frozen: Params,
                  scalars: TransplantScalars, *, num_steps: int,
                  data: TransferData | None = None, num_samples: int = 0, batch_size: int = 32,
                  draws: ChainCache | RawDraws | None = None, draws_per_step: int = 8,
                  seed: int = 0, progress: bool | str = True,
                  log_every: int = 1, writer=None, what: str = "train adapter",
                  mesh: jax.sharding.Mesh | None = None,
                  stop_when: Callable[[Params], bool] | None = None, check_every: int = 0
                  ) -> tuple[AdapterTrainState, list[dict[str, float]]]:
    """Run ``num_steps`` steps of :func:`make_train_step`'s step with
    :func:`~nettransplant.training.loop.train_loop`.

    Batch ``i`` is the ``i``-th of the :class:`IndexStream` of ``seed`` (draws: of
    ``seed + 1``). With fewer samples than ``batch_size`` every batch is the whole
    sample set; it then holds the real rows only (rounded up to a multiple of
    the mesh's ``data`` axis) instead of ``batch_size`` rows with masked padding.

    Args:
      data: padded :class:`TransferData` (``num_samples`` real rows) or None.
      draws: the bank of cached draws, or None.
      progress: show a progress bar (a string sets its description).
      writer: a metric writer for the logged steps.
      mesh: the mesh ``step`` was made for (default: every device). The
        arguments are replicated on it once; the returned state is host-local.
      stop_when / check_every: after every ``check_every`` steps, end the training
        early when ``stop_when(params)`` is True (one device read per check).
    Returns:
      The final state and the logged metrics.
    Raises:
      NonFiniteError: at the first non-finite loss or gradient, carrying the
        last good state (non-finite updates are never applied).
    """
    if data is not None and data.size < batch_size:
        raise ValueError(
            f"data holds {data.size} rows, fewer than batch_size {batch_size}; "
            "pad it with make_transfer_data(..., pad_to=batch_size)")
    mesh = mesh or parallel.data_mesh()
    if data is not None:
        parallel.check_divisible(f"{what}: batch_size", batch_size, mesh)
    if draws is not None:
        parallel.check_divisible(f"{what}: draws_per_step",
                                 min(draws_per_step, draws.num_draws), mesh)
    if data is not None and 0 < num_samples < batch_size:
        batch_size = batch_rows(num_samples, batch_size, mesh)
        data = jax.tree.map(lambda a: a[:batch_size], data)
    batches = IndexStream(num_samples, batch_size, seed)
    draw_stream = (IndexStream(draws.num_draws, min(draws_per_step, draws.num_draws), seed + 1)
                   if draws is not None else None)
    # Once per run, not per step: the step reads its batch out of these replicas.
    frozen, scalars, data, draws, state = parallel.replicate(
        (frozen, scalars, data, draws, state), mesh)

    def step_args(_):
        batch_index = jnp.asarray(batches.next()) if data is not None else None
        draw_index = jnp.asarray(draw_stream.next()) if draws is not None else None
        return frozen, scalars, data, draws, batch_index, draw_index

    try:
        state, history = train_loop(
            step, state, step_args, num_steps=num_steps, log_every=log_every,
            progress=progress, writer=writer, what=what,
            checkpoint_every=check_every if stop_when is not None else 0,
            on_checkpoint=(lambda s, _: stop_when(parallel.local(s).params))
            if stop_when is not None else None)
    except NonFiniteError as e:
        e.state = parallel.local(e.state)
        raise
    return parallel.local(state), history
