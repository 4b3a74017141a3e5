"""The one training loop: a train state, the finite guard, batch index streams, and the loop.

Every learned thing in the project — adapters (:mod:`nettransplant.transplant.step`),
teachers (:mod:`nettransplant.training.teachers`), whole students
(:mod:`nettransplant.jacobian.train`) — is trained by :func:`train_loop`
with a jitted step ``step(state, *args) -> (state, metrics)`` whose update
goes through :func:`guarded_update`:

* a non-finite loss or gradient leaves the state unchanged (the update is
  not applied), so the caller always holds the last good state;
* the loop does not synchronise with the device every step: it reads the
  metrics back only at logged steps (every ``log_every``), checkpoints and the
  end, and raises :class:`NonFiniteError` naming the *first* non-finite step;
* metrics go to the returned history and, optionally, to a
  :class:`~nettransplant.runtime.metric_writers.MetricWriter`;
* ``on_checkpoint(state, history)`` runs every ``checkpoint_every`` steps, so a
  run can resume: the batch streams are pure functions of the step index.

:class:`Trainings` runs independent trainings in threads (small steps leave
cores idle while Python dispatches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.runtime.progress import progress_bar

Array = jax.Array
Params = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
    """``step`` counts applied (finite) updates; ``params`` are the learned ones only."""

    step: Array
    params: Params
    opt_state: optax.OptState

    def as_tree(self) -> dict[str, Any]:
        """The state as a plain dict (what checkpoints store)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any]) -> TrainState:
        return cls(tree["step"], tree["params"], tree["opt_state"])


def create_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state owning a copy of ``params`` (steps donate their state)."""
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


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


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient.

    Attributes:
      state: the state when the loop stopped; non-finite updates were never
        applied, so its parameters are finite (the last good state).
      step: the index of the first non-finite step.
      metrics: that step's metrics.
    """

    def __init__(self, message: str, state: TrainState, metrics: dict[str, float],
                 step: int = -1):
        super().__init__(message)
        self.state, self.metrics, self.step = state, metrics, step


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

    def skip(self, num_batches: int) -> None:
        """Advance by ``num_batches`` batches (replaying a stream up to a resumed step)."""
        for _ in range(num_batches):
            self.next()


StepFn = Callable[..., tuple[TrainState, Mapping[str, Any]]]


def _host_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items() if k != "finite"}


def train_loop(step_fn: StepFn, state: TrainState, step_args: Callable[[int], tuple], *,
               num_steps: int, start: int = 0, history: list[dict[str, float]] | None = None,
               log_every: int = 1, checkpoint_every: int = 0,
               on_checkpoint: Callable[[TrainState, list[dict[str, float]]], None]
               | None = None,
               progress: bool | str = True, writer=None, what: str = "training"
               ) -> tuple[TrainState, list[dict[str, float]]]:
    """Run steps ``start .. num_steps - 1``: ``state, metrics = step_fn(state, *step_args(i))``.

    Args:
      step_fn: a jitted step whose metrics hold ``loss`` and ``finite`` (a
        boolean: the update was applied; see :func:`guarded_update`).
      step_args: the step's other arguments for step ``i`` (batches, keys, …);
        called in order, once per step.
      start: the first step (resuming: ``int(state.step)`` of a saved state).
      history: metrics logged before ``start`` (resuming); extended in place.
      log_every: log steps ``i % log_every == 0`` and the last one; also how
        often the loop reads the device back to check for non-finite steps.
      checkpoint_every: call ``on_checkpoint(state, history)`` after every this
        many steps (not after the last: the caller saves the final state). When it
        returns True the training ends there (its step is logged, as a last step is).
      progress: show a progress bar (a string sets its description).
      writer: a :class:`~nettransplant.runtime.metric_writers.MetricWriter` that gets
        every logged step's metrics.
      what: names the training in errors ("teacher cat", "exp2 cat back-distill n=10").
    Returns:
      ``(state, history)``.
    Raises:
      NonFiniteError: at the first check after a non-finite step; ``state``
        holds only finite updates.
    """
    if num_steps < 0 or start < 0:
        raise ValueError(f"{what}: num_steps and start must be >= 0, got {num_steps}, {start}")
    log_every = max(1, int(log_every))
    history = [] if history is None else history
    desc = progress if isinstance(progress, str) else what
    bar = progress_bar(num_steps - start, desc, enabled=bool(progress), leave=False)
    pending: list[tuple[int, Any, Mapping[str, Any]]] = []  # (step, finite, metrics) unchecked

    def check() -> None:
        """Read back the unchecked steps' ``finite`` flags; raise at the first False."""
        if not pending:
            return
        flags = np.asarray(jax.device_get([f for _, f, _ in pending]), bool)
        if not flags.all():
            first = int(np.argmax(~flags))
            i, _, metrics = pending[first]
            values = _host_values(metrics)
            bad = sorted(k for k, v in values.items() if not math.isfinite(v)) or ["update"]
            pending.clear()
            raise NonFiniteError(
                f"{what}: non-finite {', '.join(bad)} at step {i}; the update was not applied "
                f"and the state holds {int(state.step)} finite updates", state, values, i)
        pending.clear()

    def log(i: int, metrics: Mapping[str, Any]) -> None:
        check()
        values = _host_values(metrics)
        if writer is not None:
            writer.write_scalars(i, values)
        values["step"] = i
        history.append(values)
        bar.set_postfix_str(f"loss={values['loss']:.4g}")

    try:
        for i in range(start, num_steps):
            state, metrics = step_fn(state, *step_args(i))
            pending.append((i, metrics["finite"], metrics))
            logged = i % log_every == 0 or i == num_steps - 1
            if logged:
                log(i, metrics)
            done = i + 1
            bar.update()
            if on_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 \
                    and done < num_steps:
                check()
                if on_checkpoint(state, history):  # the caller ends the training here
                    if not logged:
                        log(i, metrics)
                    break
        check()
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
    return state, history


class Trainings:
    """Independent trainings in threads, up to ``workers`` at once; each result is taken
    when the caller asks for it, in any order.

    Small steps leave the cores idle while Python dispatches, so a second training
    fills them. ``workers`` = 1 starts no thread: a job runs in the caller's thread
    when its result is asked for. A job's error is raised where its result is
    taken; :meth:`close` (also on leaving a ``with`` block) cancels the jobs not
    started and waits for the running ones. Jobs must not share mutable state
    unguarded.
    """

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, job: Callable[[], Any]) -> Callable[[], Any]:
        """Start ``job`` (with one worker: when asked); returns what gives its result."""
        if self.workers == 1:
            return job
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="training")
        return self._pool.submit(job).result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Trainings:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
