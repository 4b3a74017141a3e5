"""Pseudo-gradient draws, the cached frozen chains, the scalars α, β, λ and the objectives.

Eq. 2-4 of the paper::

    Loss(θ_h) = L_task(y_S, y*) + λ · ‖ α·D'_S − D'_T ‖²

``D'_T = chain_{g_T}(G_y')`` and ``G_h = chain_{g_S}(G_y')`` do not depend on
θ_h or on any image (design insight 1), so they are computed once per draw of
``(G_y', x_rand)`` into a :class:`ChainCache`; a step only runs the adapter's
chain ``D'_S = adapter_chain(θ_h, G_h)``.

Four objectives share one API (:func:`objective_terms`):

* ``direct-learn`` — the task loss only;
* ``distill`` — cross-entropy between ``y_S`` and the teacher's ``y_T``;
* ``back-distill`` — task loss + λ‖αD'_S − D'_T‖² (distillation only for 0 samples);
* ``jacobian`` — Srinivas & Fleuret: task loss + output matching + the
  per-example L2-normalised input-Jacobian loss with *real* gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from nettransplant.core import tasks
from nettransplant.transplant.wiring import Draws, Transplant, check_draws

Array = jax.Array
Method = Literal["direct-learn", "distill", "back-distill", "jacobian"]
METHODS: tuple[str, ...] = ("direct-learn", "distill", "back-distill", "jacobian")


# --------------------------------------------------------------------------- G_y', x_rand


def output_gradient_shape(transplant: Transplant, *, image_size: int,
                          score_size: int = 7) -> tuple[int, int, int]:
    """Shape of one ``G_y'``.

    Segmentation: the output, ``(H, W, num_classes)``. Classification: an
    enlarged ``(S, S, num_outputs)`` score map (S = 7 in the paper), which the
    fully convolutional task module back-propagates to an enlarged ``D'``.
    """
    return transplant.student_task_module.output_gradient_shape(image_size, score_size)


def sample_output_gradients(key: Array, num_draws: int, shape: tuple[int, ...], *,
                            first_index: int = 0,
                            draws: Draws = "randomised") -> tuple[Array, Array]:
    """Per-draw ``G_y'`` and per-draw keys of the ``x_rand`` masks.

    ``draws="randomised"``: ``G_y' ~ U[-1, 1]^shape``; ``"literal"`` (Exp. 1 as the
    paper writes it): ``G_y' = 1`` for every draw, so draws differ only by their
    masks. The mask keys are the same either way.

    Draw ``i`` depends only on ``(key, first_index + i)``, so a draw is the same
    however the draws are batched; student and teacher use the same draw.

    Returns:
      ``(G (N, *shape) float32, mask_keys (N,) keys)``.
    """
    check_draws(draws)
    index = jnp.arange(first_index, first_index + num_draws)
    draw_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    if draws == "literal":
        g = jnp.ones((num_draws, *shape), jnp.float32)
    else:
        g = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), shape,
                                                  jnp.float32, -1.0, 1.0))(draw_keys)
    mask_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(draw_keys)
    return g, mask_keys


# --------------------------------------------------------------------------- chain cache


@flax.struct.dataclass
class ChainCache:
    """The frozen modules' pseudo chains for a bank of draws (all leading axes ``N``).

    Attributes:
      student_task_gradient: ``G_h = chain_{g_S}(G_y')``, ``(N, h, w, M)``.
      teacher_gradient: ``D'_T = chain_{g_T}(G_y')``, ``(N, h, w, M)``.
      mask_keys: ``(N,)`` keys of the draws' ``x_rand`` (the adapter may use them).
    """

    student_task_gradient: Array
    teacher_gradient: Array
    mask_keys: Array

    @property
    def num_draws(self) -> int:
        return self.teacher_gradient.shape[0]

    def take(self, index: Array) -> ChainCache:
        return jax.tree.map(lambda a: a[index], self)


@partial(jax.jit, static_argnums=(0, 4))
def _chains(transplant: Transplant, frozen, g, mask_keys, shared: bool):
    d_t = transplant.teacher_gradient(frozen, g, mask_keys)
    if shared:  # one module with one set of parameters: the student's chain is the teacher's
        return d_t, d_t
    return transplant.student_task_gradient(frozen, g, mask_keys), d_t


def shares_task_module(transplant: Transplant, frozen: Mapping) -> bool:
    """Whether student and teacher task modules are one module with the same parameters.

    Exp. 1's case: ``G_h`` and ``D'_T`` are then one chain, computed once.
    """
    if transplant.student_task_module != transplant.teacher_task_module:
        return False
    s, t = frozen["student_task_module"], frozen["teacher_task_module"]
    if s is t:
        return True
    leaves_s, tree_s = jax.tree_util.tree_flatten(s)
    leaves_t, tree_t = jax.tree_util.tree_flatten(t)
    return tree_s == tree_t and all(a is b for a, b in zip(leaves_s, leaves_t, strict=True))


def build_chain_cache(transplant: Transplant, frozen: Mapping, key: Array, num_draws: int,
                      output_shape: tuple[int, ...], *, chunk: int = 16) -> ChainCache:
    """Sample ``num_draws`` draws (of ``transplant.draws``) and run both frozen task
    modules' chains once.

    When both are one module with the same parameters (:func:`shares_task_module`)
    its chain runs once and serves as both.

    Runs in chunks of ``chunk`` draws (one compiled shape; the last chunk is padded).
    """
    students, teachers, keys = [], [], []
    shared = shares_task_module(transplant, frozen)
    for start in range(0, num_draws, chunk):
        g, mask_keys = sample_output_gradients(key, chunk, output_shape, first_index=start,
                                               draws=transplant.draws)
        g_h, d_t = _chains(transplant, frozen, g, mask_keys, shared)
        n = min(chunk, num_draws - start)
        students.append(g_h[:n])
        teachers.append(d_t[:n])
        keys.append(mask_keys[:n])
    return ChainCache(jnp.concatenate(students), jnp.concatenate(teachers),
                      jnp.concatenate(keys))


# --------------------------------------------------------------------------- scalars


@flax.struct.dataclass
class TransplantScalars:
    """α, β, λ — fixed before training and stored with the adapter.

    ``beta``: re-scaling inside the adapter; ``alpha``: scale of ``D'_S`` in the
    loss; ``lam``: weight of the distillation term.
    """

    alpha: Array
    beta: Array
    lam: Array

    def as_dict(self) -> dict[str, float]:
        return {"alpha": float(self.alpha), "beta": float(self.beta), "lambda": float(self.lam)}


def mean_frobenius_norm(a: Array) -> Array:
    """``E_i ‖a_i‖_F`` over the leading axis."""
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)))


def estimate_beta(source_features: Array, target_features: Array) -> Array:
    """``β = E_{I∈I_S} ‖f_S(I)‖_F / E_{I∈I_T} ‖f(I)‖_F`` (unlabelled images suffice).

    Args:
      source_features: ``f_S(I)`` on images of the categories ``g_S`` serves.
      target_features: ``f(I)`` on images of the transplanted category.
    """
    denominator = mean_frobenius_norm(target_features)
    if not bool(denominator > 0):
        raise ValueError("cannot estimate beta: the target features are all zero")
    return mean_frobenius_norm(source_features) / denominator


def estimate_alpha(cache: ChainCache, beta: Array | float) -> Array:
    """``α = E ‖D'_T‖_F / (β · E ‖G_h‖_F)`` with ``G_h = chain_{g_S}(G_y')``.

    α compares the teacher's pseudo-gradient with the student's taken through
    the adapter's re-scaling layer (``x_out = β·x`` multiplies the chain by β),
    so β is counted once: when ``g_T(x) = g_S(c·x)`` and β = c, α = 1 and the
    adapter that reproduces the teacher (identity after β) has zero loss.
    """
    return mean_frobenius_norm(cache.teacher_gradient) / (
        jnp.asarray(beta, jnp.float32) * mean_frobenius_norm(cache.student_task_gradient))


def estimate_lambda(cache: ChainCache, lambda0: float) -> Array:
    """``λ = λ0 / E ‖D'_T‖²_F``.

    The paper writes ``λ = 10 / E[D'_T]`` (classification) or ``1 / E[D'_T]``
    (segmentation) without saying which mean. Dividing by the mean squared norm
    makes the distillation term of an adapter with ``D'_S = 0`` exactly ``λ0``
    (and about ``2 λ0`` for an uncorrelated random adapter), whatever the size
    of the maps, so ``λ0`` is comparable across tasks, widths and ``S``.
    """
    flat = cache.teacher_gradient.reshape(cache.num_draws, -1)
    return lambda0 / jnp.mean(jnp.sum(jnp.square(flat), axis=1))


def compute_scalars(cache: ChainCache, beta: Array | float, lambda0: float) -> TransplantScalars:
    return TransplantScalars(alpha=jnp.asarray(estimate_alpha(cache, beta), jnp.float32),
                             beta=jnp.asarray(beta, jnp.float32),
                             lam=jnp.asarray(estimate_lambda(cache, lambda0), jnp.float32))


# --------------------------------------------------------------------------- data


@flax.struct.dataclass
class TransferData:
    """Fixed images of a transplant run, stored as frozen features (padded to a fixed size).

    Attributes:
      features: ``x = f(I)``, ``(N, h, w, M)`` — ``f`` is frozen, so computed once.
      labels: ``(N,)`` class ids (classification) or ``(N, H, W)`` (segmentation).
      label_valid: ``(N,)`` 1 where the label may be used by the task loss.
      valid: ``(N,)`` 1 for real images, 0 for padding.
      teacher_outputs: ``y_T = g_T(x)``, frozen (``distill`` and ``jacobian``).
      jacobian_projection: per-image random output weights ``P`` (``jacobian``).
      teacher_jacobian: ``∇_x⟨P, g_T(x)⟩`` with real derivatives (``jacobian``).
    """

    features: Array
    labels: Array
    label_valid: Array
    valid: Array
    teacher_outputs: Array
    jacobian_projection: Array
    teacher_jacobian: Array

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def take(self, index: Array) -> TransferData:
        return jax.tree.map(lambda a: a[index], self)


@partial(jax.jit, static_argnums=0)
def _teacher_targets(transplant: Transplant, frozen, x, projection):
    y_t, vjp = jax.vjp(lambda v: transplant.teacher_output(frozen, v), x)
    return y_t, vjp(projection)[0]


def make_transfer_data(transplant: Transplant, frozen: Mapping, features: Array,
                       labels: Array, *, label_valid: Array | None = None,
                       key: Array, pad_to: int | None = None, chunk: int = 16) -> TransferData:
    """Cache the frozen quantities of a fixed image set (teacher outputs and Jacobians).

    Args:
      features: ``f(I)`` of the images, ``(N, h, w, M)``.
      labels: ``(N,)`` or ``(N, H, W)`` int labels.
      label_valid: ``(N,)``; default all 1 (every image labelled).
      key: seeds the per-image Jacobian projections.
      pad_to: pad to this many images (a fixed shape for every sample count).
    """
    n = features.shape[0]
    pad_to = max(pad_to or n, n, 1)
    label_valid = jnp.ones((n,), jnp.float32) if label_valid is None else label_valid
    out_shape = jax.eval_shape(lambda v: transplant.teacher_output(frozen, v),
                               jax.ShapeDtypeStruct((1, *features.shape[1:]), jnp.float32)).shape
    pad = pad_to - n

    def padded(a):
        return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

    projection = jax.random.uniform(key, (pad_to, *out_shape[1:]), jnp.float32, -1.0, 1.0)
    # The teacher runs on the real rows, in chunks of one shape (the last one padded by
    # at most chunk - 1 rows); the padding rows' targets are zeros (masked out of every
    # loss).
    features, labels, label_valid = padded(features), padded(labels), padded(label_valid)
    rows = -(-n // chunk) * chunk
    extra = max(rows - pad_to, 0)
    x_all = jnp.concatenate([features, jnp.zeros((extra, *features.shape[1:]))]) \
        if extra else features
    p_all = jnp.concatenate([projection, jnp.zeros((extra, *projection.shape[1:]))]) \
        if extra else projection
    outputs, jacobians = [], []
    for start in range(0, rows, chunk):
        y_t, j_t = _teacher_targets(transplant, frozen, x_all[start:start + chunk],
                                    p_all[start:start + chunk])
        outputs.append(y_t)
        jacobians.append(j_t)
    if not outputs:  # no real rows: targets of the right shapes, all padding
        y_t, j_t = jax.eval_shape(partial(_teacher_targets, transplant), frozen,
                                  features[:1], projection[:1])
        outputs.append(jnp.zeros((0, *y_t.shape[1:]), y_t.dtype))
        jacobians.append(jnp.zeros((0, *j_t.shape[1:]), j_t.dtype))
    outputs = [jnp.concatenate(outputs)[:n]]
    jacobians = [jnp.concatenate(jacobians)[:n]]
    valid = padded(jnp.ones((n,), jnp.float32))
    return TransferData(features, labels, label_valid.astype(jnp.float32), valid,
                        padded(jnp.concatenate(outputs)), projection,
                        padded(jnp.concatenate(jacobians)))


# --------------------------------------------------------------------------- loss terms


def back_distill_term(transplant: Transplant, adapter_params, draws: ChainCache,
                      scalars: TransplantScalars) -> Array:
    """``λ · E ‖α·D'_S − D'_T‖²_F`` over a batch of cached draws (Eq. 3-4)."""
    d_student = transplant.adapter_gradient(adapter_params, draws.student_task_gradient,
                                            scalars.beta, draws.mask_keys)
    diff = scalars.alpha * d_student - draws.teacher_gradient
    return scalars.lam * jnp.mean(jnp.sum(jnp.square(diff.reshape(diff.shape[0], -1)), axis=1))


def jacobian_term(transplant: Transplant, adapter_params, frozen, batch: TransferData,
                  beta: Array) -> Array:
    """Srinivas & Fleuret's loss on per-example L2-normalised input Jacobians.

    ``E_i ‖ J_S,i/‖J_S,i‖ − J_T,i/‖J_T,i‖ ‖²`` with ``J = ∇_x⟨P_i, y(x)⟩`` the real
    gradient of a random projection ``P_i`` of the output w.r.t. ``x`` (the
    teacher's is cached). Its gradient w.r.t. θ_h is double back-propagation.
    """
    def student(v):
        return transplant.student_output(adapter_params, frozen, v, beta)

    _, vjp = jax.vjp(student, batch.features)
    j_s = vjp(batch.jacobian_projection)[0]

    def normalised(j):
        # sqrt(‖j‖² + ε): finite gradient where a Jacobian is exactly 0 (padding
        # rows, or ReLUs that block everything), where ‖j‖ itself has none.
        flat = j.reshape(j.shape[0], -1)
        return flat / jnp.sqrt(jnp.sum(jnp.square(flat), axis=1, keepdims=True) + 1e-12)

    per_image = jnp.sum(jnp.square(normalised(j_s) - normalised(batch.teacher_jacobian)), axis=1)
    return tasks.masked_mean(per_image, batch.valid)


@flax.struct.dataclass
class ObjectiveWeights:
    """Weights of the loss terms (``lambda0`` enters through ``TransplantScalars.lam``)."""

    task: float = 1.0
    jacobian: float = 1.0
    output_matching: float = 1.0


def objective_terms(method: Method, transplant: Transplant, adapter_params, frozen,
                    scalars: TransplantScalars, batch: TransferData | None,
                    draws: ChainCache | None,
                    weights: ObjectiveWeights | None = None) -> dict[str, Array]:
    """The loss terms of ``method`` on one batch; ``sum(values)`` is the loss.

    Args:
      batch: labelled/unlabelled images (None for zero-sample back-distillation).
      draws: cached chains of a batch of ``G_y'`` draws (back-distill only).
    Returns:
      ``{"task": …, "back_distill": …, …}`` — only the terms ``method`` uses.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    weights = weights or ObjectiveWeights()
    terms: dict[str, Array] = {}
    if method == "back-distill":
        if draws is None:
            raise ValueError("back-distill needs cached pseudo-gradient draws")
        terms["back_distill"] = back_distill_term(transplant, adapter_params, draws, scalars)
        if batch is None:
            return terms
    if batch is None:
        raise ValueError(f"{method} needs a batch of images")
    y_s = transplant.student_output(adapter_params, frozen, batch.features, scalars.beta)
    if method in ("direct-learn", "back-distill", "jacobian"):
        terms["task"] = weights.task * transplant.task.loss(
            y_s, batch.labels, batch.valid * batch.label_valid)
    if method == "distill":
        terms["distill"] = transplant.task.distill_loss(y_s, batch.teacher_outputs, batch.valid)
    if method == "jacobian":
        terms["output_matching"] = weights.output_matching * transplant.task.distill_loss(
            y_s, batch.teacher_outputs, batch.valid)
        terms["jacobian"] = weights.jacobian * jacobian_term(
            transplant, adapter_params, frozen, batch, scalars.beta)
    return terms
