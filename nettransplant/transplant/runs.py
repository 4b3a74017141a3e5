"""A runs axis: independent adapter trainings of one problem and method as one computation.

The runs of a transplant problem (its sample counts, restarts, seeds) share the
frozen modules, the bank of draws and every shape but the number of labelled
samples. :func:`make_runs_step` maps one train step over a leading *runs* axis
(``jax.vmap``) of the states, scalars, labelled data and batch indices, and
:func:`train_runs` drives it with the semantics of
:func:`nettransplant.training.loop.train_loop` for every run:

* each run draws the batches :func:`nettransplant.transplant.step.train_adapter` would draw
  for it; a run with fewer samples than a batch sees its whole sample set padded
  with masked rows (every loss is a masked mean, so the loss is the one of its real
  rows);
* a run's non-finite step is found at its next logged step, as the loop finds
  it, and the run stops there with its last good state (its error is returned,
  not raised: the other runs go on);
* a run ends early when its ``stop_when(params)`` holds at a check
  (every ``check_every`` steps), as ``train_adapter``'s early end;
* runs that ended keep their state (``jnp.where(active, new, old)``) while the
  others train, and the loop stops once every run has ended.

Where the hardware has room (a GPU or TPU, where one run of this size fills a
sliver of the device) this turns R small steps into one; the runs axis can be
spread over a ``runs`` mesh axis (independent runs need no all-reduce). On a
CPU that one small run already keeps busy it is slower than running them one
after another (``nettransplant benchmark`` measures both).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nettransplant.training.loop import (
    IndexStream,
    NonFiniteError,
    TrainState,
    _host_values,
    guarded_update,
)
from nettransplant.transplant.objectives import ChainCache, Method, ObjectiveWeights, TransferData
from nettransplant.transplant.step import objective_loss
from nettransplant.transplant.wiring import Transplant

Array = jax.Array
RUNS_AXIS = "runs"
# How a job trains a problem's runs (config.transplant.runs_axis): "batched" on a runs
# axis, "one_at_a_time", or "auto" (nettransplant.experiments.cell_training.batched_runs).
MODES = ("auto", "batched", "one_at_a_time")


def make_runs_step(transplant: Transplant, method: Method,
                   optimizer: optax.GradientTransformation, *,
                   weights: ObjectiveWeights | None = None) -> Callable:
    """A jitted ``step(states, frozen, scalars, data, draws, batch_index, draw_index, active)``.

    ``states``, ``scalars``, ``data``, ``batch_index`` ``(R, B)``, ``draw_index``
    ``(R, B_d)`` and ``active`` ``(R,)`` carry a leading runs axis; ``frozen`` and
    the bank ``draws`` are shared. A run with ``active`` False keeps its state.
    Returns ``(states, metrics)`` with ``(R,)`` metrics (``finite`` among them).
    """
    loss_fn = objective_loss(transplant, method, weights)

    def one_run(state: TrainState, frozen, scalars, data, draws, batch_index, draw_index,
                active):
        batch = data.take(batch_index) if data is not None else None
        draw_batch = draws.take(draw_index) if draws is not None else None
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, scalars, batch, draw_batch)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer)
        new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state,
                                 state)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm,
                   "param_norm": optax.tree.norm(new_state.params), "finite": finite}
        return new_state, metrics

    batched = jax.vmap(one_run, in_axes=(0, None, 0, 0, None, 0, 0, 0))
    return jax.jit(batched, donate_argnums=0)


@dataclasses.dataclass
class Run:
    """One training of :func:`train_runs`: what :func:`nettransplant.transplant.step.train_adapter`
    takes for it.

    Attributes:
      state: the start (its optimiser state may carry its own injected rate).
      scalars: α, β, λ of this run.
      data: its padded labelled data (every run's padded to one size), or None.
      num_samples: its real rows.
      seed: its batch stream's seed (the draws': ``seed + 1``).
      num_steps: its budget.
      stop_when: ``params -> bool``, checked every ``check_every`` steps (None: never).
      writer: a metric writer for its logged steps, or None.
      what: its name in errors.
    """

    state: TrainState
    scalars: Any
    data: TransferData | None
    num_samples: int
    seed: int
    num_steps: int
    stop_when: Callable[[Any], bool] | None = None
    writer: Any = None
    what: str = "run"


@dataclasses.dataclass
class RunResult:
    """A run's final state (its last good one if it diverged), its logged metrics, its
    error (None: it finished), and the steps it ran."""

    state: TrainState
    history: list[dict[str, float]]
    error: NonFiniteError | None
    steps: int


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _row(tree: Any, r: int) -> Any:
    return jax.tree.map(lambda a: a[r], tree)


def runs_mesh(devices: Sequence | None = None) -> Mesh | None:
    """A mesh of this process's devices (default: every local one) on one ``runs`` axis;
    None with one device (nothing to spread)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) < 2:
        return None
    return Mesh(np.array(devices), (RUNS_AXIS,))


def runs_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """The runs axis split over ``mesh``'s :data:`RUNS_AXIS` (None: not split)."""
    if mesh is None or RUNS_AXIS not in mesh.axis_names or mesh.shape[RUNS_AXIS] == 1:
        return None
    return NamedSharding(mesh, PartitionSpec(RUNS_AXIS))


def train_runs(step: Callable, runs: Sequence[Run], frozen, *, batch_size: int,
               draws: ChainCache | None = None, draws_per_step: int = 8,
               log_every: int = 1, check_every: int = 0,
               mesh: Mesh | None = None) -> list[RunResult]:
    """Train ``runs`` at once with :func:`make_runs_step`'s ``step``.

    Args:
      batch_size: labelled rows per step of every run (fewer samples: padded rows).
      draws: the shared bank (back-distill), or None.
      log_every / check_every: as :func:`nettransplant.transplant.step.train_adapter`.
      mesh: a mesh with a ``runs`` axis to spread the runs over (default: one
        device); runs that never train fill its last devices.
    Returns:
      One :class:`RunResult` per run, in order.
    """
    if not runs:
        return []
    requested = len(runs)
    sharding = runs_sharding(mesh)
    if sharding is not None and requested % mesh.shape[RUNS_AXIS]:
        # Fill the last devices with copies of the first run that never train.
        fill = mesh.shape[RUNS_AXIS] - requested % mesh.shape[RUNS_AXIS]
        runs = [*runs, *[dataclasses.replace(runs[0], num_steps=0, stop_when=None,
                                             writer=None)] * fill]
    n_runs = len(runs)
    labelled = runs[0].data is not None
    if any((r.data is not None) != labelled for r in runs):
        raise ValueError("either every run has labelled data or none has")
    log_every = max(1, int(log_every))
    batches = [IndexStream(r.num_samples, batch_size, r.seed) if labelled else None
               for r in runs]
    draw_streams = [IndexStream(draws.num_draws, min(draws_per_step, draws.num_draws),
                                r.seed + 1) if draws is not None else None for r in runs]

    # Every argument enters with one sharding whatever it had (arrays that went through
    # a data-parallel step carry that mesh's): one compiled step for every call.
    if sharding is None:
        device = jax.local_devices()[0]
        sharding = shared = jax.sharding.SingleDeviceSharding(device)
    else:
        shared = NamedSharding(mesh, PartitionSpec())

    def put(tree):
        return jax.device_put(tree, sharding)

    frozen, draws = jax.device_put((frozen, draws), shared)

    states = put(_stack([r.state for r in runs]))
    scalars = put(_stack([r.scalars for r in runs]))
    data = put(_stack([r.data for r in runs])) if labelled else None
    budgets = np.array([r.num_steps for r in runs])
    active = np.ones(n_runs, bool)
    histories: list[list[dict[str, float]]] = [[] for _ in runs]
    errors: list[NonFiniteError | None] = [None] * n_runs
    steps_run = np.zeros(n_runs, int)
    pending: list[tuple[int, Array, Any, np.ndarray]] = []  # (step, finite, metrics, ran)

    def check(which: np.ndarray) -> None:
        """Stop the runs of ``which`` that had a non-finite step since their last check."""
        if not pending or not which.any():
            return
        flags = np.asarray(jax.device_get([f for _, f, _, _ in pending]), bool)
        ran = np.stack([m for *_, m in pending])
        bad = ran & ~flags & which[None, :]
        for r in np.flatnonzero(bad.any(axis=0)):
            first = int(np.argmax(bad[:, r]))
            i, _, metrics, _ = pending[first]
            values = {k: float(np.asarray(v)[r]) for k, v in metrics.items() if k != "finite"}
            names = sorted(k for k, v in values.items() if not math.isfinite(v)) or ["update"]
            state = jax.device_get(_row(states, r))
            errors[r] = NonFiniteError(
                f"{runs[r].what}: non-finite {', '.join(names)} at step {i}; the update was "
                f"not applied and the state holds {int(state.step)} finite updates",
                state, values, i)
            active[r] = False
        # Every run of ``which`` is checked up to now: forget its flags.
        for _, _, _, m in pending:
            m &= ~which
        pending[:] = [p for p in pending if p[3].any()]

    def log(i: int, metrics, which: np.ndarray) -> None:
        check(which)
        which = which & active
        if not which.any():
            return
        host = {k: np.asarray(v) for k, v in metrics.items() if k != "finite"}
        for r in np.flatnonzero(which):
            values = _host_values({k: v[r] for k, v in host.items()})
            if runs[r].writer is not None:
                runs[r].writer.write_scalars(i, values)
            values["step"] = i
            histories[r].append(values)

    for i in range(int(budgets.max())):
        running = active & (i < budgets)
        if not running.any():
            break
        batch_index = (jnp.asarray(np.stack([b.next() for b in batches])) if labelled
                       else None)
        draw_index = (jnp.asarray(np.stack([d.next() for d in draw_streams]))
                      if draws is not None else None)
        states, metrics = step(states, frozen, scalars, data, draws, put(batch_index),
                               put(draw_index), put(jnp.asarray(running)))
        steps_run += running
        pending.append((i, metrics["finite"], metrics, running.copy()))
        logged = running & ((i % log_every == 0) | (i == budgets - 1))
        if logged.any():
            log(i, metrics, logged)
        done = i + 1
        if check_every and done % check_every == 0:
            checking = active & (done < budgets) & np.array(
                [r.stop_when is not None for r in runs])
            check(checking)
            checking &= active
            for r in np.flatnonzero(checking):
                if runs[r].stop_when(jax.device_get(_row(states, r)).params):
                    if not logged[r]:
                        log(i, metrics, np.arange(n_runs) == r)
                    active[r] = False
    check(active.copy())
    for r in range(n_runs):
        if runs[r].writer is not None:
            runs[r].writer.flush()
    final = jax.device_get(states)
    return [RunResult(errors[r].state if errors[r] is not None else _row(final, r),
                      histories[r], errors[r], int(steps_run[r])) for r in range(requested)]
