"""One transplant problem and its runs: the unit the paper's experiments are made of.

A :class:`TransplantProblem` fixes everything that does not change between
methods and sample counts: the wiring (target category module → adapter →
student task module, with the target's teacher task module as the reference),
the frozen parameters, α/β/λ, the cached bank of pseudo-gradient draws
(dead draws dropped), the test set as frozen features, and the adapter's
random initialisation. :func:`fit` learns one adapter with one method from N
labelled samples; :func:`evaluate` scores it on the test set.

Which ReLU dummies the pseudo chains use follows the paper's experiments
(Sec. 4): :func:`task_dummies`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.core import evaluation, tasks
from nettransplant.core.layers import DummySpec
from nettransplant.core.modules import CategoryModule
from nettransplant.runtime import parallel
from nettransplant.training.loop import create_train_state
from nettransplant.transplant import closed_form, objectives
from nettransplant.transplant import runs as runs_lib
from nettransplant.transplant.step import AdapterTrainState, StepFn, make_train_step, train_adapter
from nettransplant.transplant.wiring import TaskModule, Transplant

Array = jax.Array
Params = Mapping[str, Any]

CLASSIFICATION_METHODS = ("back-distill", "direct-learn", "jacobian")
SEGMENTATION_METHODS = ("back-distill", "direct-learn", "distill", "jacobian")


def task_dummies(protocol: str, module: TaskModule) -> DummySpec:
    """The task modules' ReLU dummies of an experiment (paper Sec. 4).

    ``"exp1"``: the 2nd dummy (random ``x_rand`` mask) everywhere; ``"exp2"``:
    the 1st (identity) everywhere but the lowest ReLU of the task module, which
    takes the 2nd; ``"exp3"``: the 1st everywhere. The adapter always uses the
    1st. Table 4 uses Exp. 2's (classification) and Exp. 3's (segmentation).
    """
    if protocol == "exp1":
        return "random_mask"
    if protocol == "exp2":
        return {"default": "identity", module.relu_names()[0]: "random_mask"}
    if protocol == "exp3":
        return "identity"
    raise ValueError(f"unknown protocol {protocol!r}; expected 'exp1', 'exp2' or 'exp3'")


def methods_for(task: tasks.Task) -> tuple[str, ...]:
    """The paper's methods for a task: ``distill`` only for segmentation (Sec. 4)."""
    return SEGMENTATION_METHODS if task == tasks.SEGMENTATION else CLASSIFICATION_METHODS


def random_adapter(transplant: Transplant, key: Array) -> Params:
    """The adapter's seeded random initialisation (its convs' initialisers, zero biases);
    independent of the feature maps' spatial size."""
    return _init_adapter(transplant.adapter, key)


@partial(jax.jit, static_argnums=0)
def _init_adapter(adapter, key):  # one compiled initialiser per adapter, not one per op
    return adapter.init(key, jnp.zeros((1, 1, 1, adapter.channels)))["params"]


# Rows per call of the problem's forward passes (features, predictions, teacher targets):
# every set of images, sample sets and test sets alike, runs through one compiled shape.
CHUNK = 16


def identity_adapter(transplant: Transplant) -> Params:
    """Every conv the identity (centre tap ``I``), every bias 0: the adapter passes its
    reordered, re-scaled input ``β·x[perm]`` through (its ReLUs keep the non-negative
    features). Without a reorder this is the exact inverse of the re-scaling up to β."""
    return transplant.adapter.clone(reorder_seed=None).ideal_params(1.0)


def perturbed_adapter(transplant: Transplant, centre: Params, key: Array,
                      scale: float) -> Params:
    """``centre + scale · random_adapter(transplant, key)``, parameter by parameter: a
    seeded draw around a chosen adapter (the identity, or the closed-form warm start)."""
    draw = random_adapter(transplant, key)
    return jax.tree_util.tree_map(lambda c, d: jnp.asarray(c) + scale * d, centre, draw)


def drop_dead_draws(cache: objectives.ChainCache, num_draws: int) -> objectives.ChainCache:
    """Keep ``num_draws`` draws whose teacher pseudo-gradient is not identically zero.

    On small maps a random ``x_rand`` mask can block every path (``D'_T = 0``);
    such a draw carries no information and dilutes α and λ. Live draws are
    repeated in order if fewer than ``num_draws`` survive, so the bank keeps
    one shape.
    """
    norms = np.asarray(jnp.sum(jnp.abs(cache.teacher_gradient.reshape(cache.num_draws, -1)),
                               axis=1))
    live = np.flatnonzero(norms > 0)
    if live.size == 0:
        raise ValueError(f"all {cache.num_draws} pseudo-gradient draws are zero: the task "
                         "module's dummy masks block every path; use a larger score_size or a "
                         "larger positive_fraction")
    return cache.take(jnp.asarray(live[np.arange(num_draws) % live.size]))


@dataclasses.dataclass
class TransplantProblem:
    """Everything fixed for one transplant, shared by its methods and sample counts.

    Attributes:
      transplant: the wiring (static).
      frozen: ``category_module`` (the target's ``f``), ``student_task_module``
        (``g_S``) and ``teacher_task_module`` (``g_T``) parameters.
      scalars: α, β, λ.
      cache: the bank of draws (``G_h``, ``D'_T``), dead draws dropped.
      adapter_init: the seeded random adapter every trained method starts from.
      test_features: ``f(I)`` of the test images (None: no test set).
      test_targets: test labels ``(N,)`` or masks ``(N, H, W)`` (None: no test set).
      live_draw_fraction: the share of sampled draws with ``D'_T ≠ 0``.
    """

    transplant: Transplant
    frozen: Params
    scalars: objectives.TransplantScalars
    cache: objectives.ChainCache
    adapter_init: Params
    test_features: Array | None
    test_targets: np.ndarray | None
    live_draw_fraction: float

    @property
    def task(self) -> tasks.Task:
        return self.transplant.task


def features(category_module: CategoryModule, category_params: Params,
             images: np.ndarray) -> Array:
    """``f(I)`` of normalised images, in chunks of :data:`CHUNK`."""
    return evaluation.batched_apply(
        lambda im: _features(category_module, category_params, im), images, CHUNK,
        one_shape=True)


@partial(jax.jit, static_argnums=0)
def _features(category_module, category_params, images):
    return category_module.apply({"params": category_params}, images)[0]


def make_problem(transplant: Transplant, frozen: Params, *, key: Array, beta: float,
                 lambda0: float, num_draws: int, image_size: int, score_size: int,
                 test_images: np.ndarray | None = None, test_targets: np.ndarray | None = None
                 ) -> TransplantProblem:
    """Sample and cache the draws, fix α/β/λ, and store the test set as features.

    Args:
      key: seeds the draws (oversampled 1.5× so dropping dead ones keeps ``num_draws``
        distinct draws in the common case) and the adapter initialisation.
      beta: the re-scaling (1 when ``f`` is the teacher's own).
      test_images: normalised test images ``(N, H, W, 3)`` with their ``test_targets``
        (labels or masks), or None: :func:`evaluate` then has nothing to score.
    """
    k_draws, k_init = jax.random.split(key)
    shape = objectives.output_gradient_shape(transplant, image_size=image_size,
                                             score_size=score_size)
    sampled = objectives.build_chain_cache(transplant, frozen, k_draws,
                                           (3 * num_draws + 1) // 2, shape)
    live = float(np.mean(np.asarray(jnp.any(
        sampled.teacher_gradient.reshape(sampled.num_draws, -1) != 0, axis=1))))
    cache = drop_dead_draws(sampled, num_draws)
    scalars = objectives.compute_scalars(cache, beta, lambda0)
    adapter_init = random_adapter(transplant, k_init)
    test_x = test_y = None
    if test_images is not None:
        test_x = features(transplant.category_module, frozen["category_module"], test_images)
        test_y = np.asarray(test_targets)
    return TransplantProblem(transplant, frozen, scalars, cache, adapter_init, test_x, test_y,
                             live)


def zero_sample_solution(problem: TransplantProblem, *, ridge: float, num_draws: int,
                         mesh: jax.sharding.Mesh | None = None) -> tuple[Params, bool]:
    """Back-distillation's starting point and whether it is the exact zero-sample optimum.

    Single-conv adapters: the closed form (exact). Deeper adapters: the closed
    form in the first conv and identities after it (``closed_form.warm_start_adapter``),
    which gradient descent then refines. The normal equations are summed over
    draws split across ``mesh`` (default: every device).
    """
    params = closed_form.warm_start_adapter(
        problem.transplant, problem.cache, problem.scalars, ridge=ridge,
        num_draws=min(num_draws, problem.cache.num_draws), mesh=mesh)
    return params, problem.transplant.adapter.num_convs == 1


def transfer_data(problem: TransplantProblem, images: np.ndarray, targets: np.ndarray, *,
                  key: Array, pad_to: int) -> objectives.TransferData:
    """The labelled samples of a run as frozen features, teacher outputs and Jacobians."""
    x = features(problem.transplant.category_module, problem.frozen["category_module"],
                 images)
    return objectives.make_transfer_data(problem.transplant, problem.frozen, x,
                                         jnp.asarray(targets), key=key, pad_to=pad_to,
                                         chunk=CHUNK)


def adam(learning_rate: float) -> optax.GradientTransformation:
    """Adam whose rate lives in its state (``optax.inject_hyperparams``): states made
    with :func:`with_learning_rate` at other rates run through the same compiled step."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def with_learning_rate(state: AdapterTrainState, learning_rate: float
                       ) -> AdapterTrainState:
    """``state`` with its optimiser's injected rate set to ``learning_rate`` (a state of
    :func:`adam`; the rate is data, so the step does not recompile)."""
    hyper = getattr(state.opt_state, "hyperparams", None)
    if hyper is None or "learning_rate" not in hyper:
        raise ValueError("the optimiser's rate is not injected: make it with problem.adam()")
    hyper = {**hyper, "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


class StepCache:
    """One jitted train step per (transplant, method): problems of one shape share it.

    ``mesh``: the devices the steps run on, data parallel (default: every device).
    With an optimiser of :func:`adam`, runs at other rates share the step too
    (:func:`with_learning_rate`). Threads may share one cache.
    """

    def __init__(self, optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh | None = None,
                 weights: objectives.ObjectiveWeights | None = None):
        self.optimizer = optimizer
        self.mesh = mesh or parallel.data_mesh()
        self.weights = weights  # the loss terms' weights (default: all 1)
        self._steps: dict[tuple, StepFn] = {}
        self._lock = threading.Lock()

    def __call__(self, transplant: Transplant, method: str) -> StepFn:
        key = (transplant, method)
        with self._lock:
            if key not in self._steps:
                self._steps[key] = make_train_step(
                    transplant, method, self.optimizer, weights=self.weights, mesh=self.mesh)
            return self._steps[key]

    def runs(self, transplant: Transplant, method: str):
        """The step of many runs at once (:func:`nettransplant.transplant.runs.make_runs_step`)."""
        key = (transplant, method, "runs")
        with self._lock:
            if key not in self._steps:
                self._steps[key] = runs_lib.make_runs_step(
                    transplant, method, self.optimizer, weights=self.weights)
            return self._steps[key]


def fit(problem: TransplantProblem, method: str, steps: StepCache, *,
        data: objectives.TransferData | None, num_samples: int, init: Params,
        num_steps: int, batch_size: int, draws_per_step: int, seed: int,
        log_every: int = 10, progress: bool | str = False, writer=None,
        what: str = "train adapter", stop_when: Callable[[Params], bool] | None = None,
        check_every: int = 0) -> tuple[Params, list[dict[str, float]], int]:
    """Learn the adapter with ``method`` from ``num_samples`` labelled samples.

    Zero-sample back-distillation passes ``data=None``. ``writer``: a metric writer
    for the logged steps; ``what``: the training's name in errors; ``stop_when`` /
    ``check_every``: after every ``check_every`` steps, end early when
    ``stop_when(params)`` is True. Returns the adapter parameters, the logged
    training metrics and the number of steps run.

    Raises:
      NonFiniteError: at the first non-finite loss or gradient (carrying the last
        good state).
    """
    if num_samples == 0 and method != "back-distill":
        raise ValueError(f"{method} needs labelled samples; only back-distill runs with 0")
    draws = problem.cache if method == "back-distill" else None
    state = create_train_state(init, steps.optimizer)
    state, history = train_adapter(
        steps(problem.transplant, method), state, problem.frozen, problem.scalars,
        num_steps=num_steps, data=data if num_samples else None, num_samples=num_samples,
        batch_size=batch_size, draws=draws, draws_per_step=draws_per_step, seed=seed,
        progress=progress, log_every=log_every, writer=writer, what=what, mesh=steps.mesh,
        stop_when=stop_when, check_every=check_every)
    return state.params, history, int(state.step)


@partial(jax.jit, static_argnums=0)
def _student_predictions(transplant: Transplant, adapter_params, frozen, beta, x):
    return transplant.task.predict(transplant.student_output(adapter_params, frozen, x, beta))


def _predict(problem: TransplantProblem, adapter_params: Params, features: Array
             ) -> np.ndarray:
    return evaluation.batched_apply(
        lambda x: _student_predictions(problem.transplant, adapter_params, problem.frozen,
                                       problem.scalars.beta, x), features, CHUNK,
        one_shape=True)


# A classification run fits its labelled samples at most this train error (%), a
# segmentation run at most FIT_MARGIN points of pixel accuracy below its teacher's on
# the same samples (teacher_fit).
FIT_ERROR = 10.0
FIT_MARGIN = 2.0


def fits_samples(task_name: str, train_fit: float, reference: float | None = None) -> bool:
    """Whether a run fitted its own labelled samples: classification at most
    :data:`FIT_ERROR` % train error (:func:`training_fit`); segmentation at most
    :data:`FIT_MARGIN` points of pixel accuracy below ``reference``, the teacher's on the
    same samples (:func:`teacher_fit`: the network the target's task module comes from
    fits them that well; distillation, which fits the teacher's outputs, cannot beat it)."""
    if task_name == "segmentation":
        if reference is None:
            raise ValueError("a segmentation run's fit needs its reference (teacher_fit)")
        return train_fit >= reference - FIT_MARGIN
    return train_fit <= FIT_ERROR


@partial(jax.jit, static_argnums=0)
def _teacher_predictions(transplant: Transplant, frozen, x):
    return transplant.task.predict(transplant.teacher_output(frozen, x))


def teacher_fit(problem: TransplantProblem, data: objectives.TransferData,
                num_samples: int) -> float:
    """The teacher's metric on a run's own ``num_samples`` labelled samples: how well the
    network the target's task module comes from fits them (``y_T = g_T(x)``; error % or
    pixel accuracy %), the reference a segmentation run's :func:`training_fit` is held
    to."""
    return _metric_on_samples(
        problem, lambda x: _teacher_predictions(problem.transplant, problem.frozen, x), data,
        num_samples)


def score(problem: TransplantProblem, adapter_params: Params, features: Array,
          targets: Array) -> float:
    """Classification error (%) or segmentation pixel accuracy (%) of the transplant net
    on frozen features ``x = f(I)`` and their labels (``(N,)`` or ``(N, H, W)``)."""
    return problem.task.metric(_predict(problem, adapter_params, features), targets)


def evaluate(problem: TransplantProblem, adapter_params: Params) -> float:
    """Test classification error (%) or segmentation pixel accuracy (%)."""
    if problem.test_features is None:
        raise ValueError("this transplant problem was made without a test set")
    return score(problem, adapter_params, problem.test_features, problem.test_targets)


def training_fit(problem: TransplantProblem, adapter_params: Params,
                 data: objectives.TransferData, num_samples: int) -> float:
    """The same metric on the run's own ``num_samples`` labelled samples: how well the
    adapter fits what it was trained on. Only the real rows are computed (one compiled
    shape per sample count)."""
    return _metric_on_samples(problem, lambda x: _student_predictions(
        problem.transplant, adapter_params, problem.frozen, problem.scalars.beta, x),
        data, num_samples)


def _metric_on_samples(problem: TransplantProblem, predict, data: objectives.TransferData,
                       num_samples: int) -> float:
    """The task's metric of ``predict`` on the first ``num_samples`` rows of ``data``."""
    if not 0 < num_samples <= data.size:
        raise ValueError(f"num_samples must be in [1, {data.size}], got {num_samples}")
    predictions = evaluation.batched_apply(predict, data.features[:num_samples], CHUNK,
                                           one_shape=True)
    return problem.task.metric(predictions, np.asarray(data.labels)[:num_samples])


@partial(jax.jit, static_argnums=(0, 5))
def _hidden(transplant: Transplant, adapter_params, frozen, beta, x, layer):
    h, _ = transplant.adapter.apply({"params": adapter_params}, x, beta=beta)
    _, inter = transplant.student_task_module.apply(
        {"params": frozen["student_task_module"]}, h)
    return inter[layer].reshape(x.shape[0], -1)


def hidden_features(problem: TransplantProblem, adapter_params: Params,
                    layer: str = "relu7") -> np.ndarray:
    """The student's top hidden features (default ``relu7``) on the test images, ``(N, D)``."""
    return np.asarray(evaluation.batched_apply(
        lambda x: _hidden(problem.transplant, adapter_params, problem.frozen,
                          problem.scalars.beta, x, layer), problem.test_features, CHUNK,
        one_shape=True))
