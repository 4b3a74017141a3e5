"""Losses of knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018).

Every function is pure: networks enter as functions ``images -> logits`` (with
their parameters bound by the caller, or passed through), batches as arrays.

* :func:`input_gradients` — ``∇ₓ y_i(x)`` for selected outputs ``i``, one VJP per
  selected output (the full Jacobian is never formed unless every output is
  selected);
* :func:`jacobian_matching_loss` — the squared distance between per-example
  L2-normalised input gradients, ``‖∇ₓT_i/‖∇ₓT_i‖₂ − ∇ₓS_i/‖∇ₓS_i‖₂‖²``;
* :func:`output_matching_loss` — temperature-softened distillation ``τ²·KL``;
* :func:`noisy_output_matching_loss` — output matching on ``x + ξ``, ``ξ ~ N(0, σ²I)``;
* :func:`attention_maps` / :func:`attention_transfer_loss` — channel-mean of
  squared activations, flattened and L2-normalised, squared difference;
* :func:`lwf_loss` — learning without forgetting: cross-entropy on the new
  task's labels + distillation of the teacher's old-task responses;
* :func:`first_order_noise_matching` / :func:`monte_carlo_noise_matching` — the
  two sides of the equivalence that motivates the Jacobian loss:
  ``E_ξ[(T(x+ξ) − S(x+ξ))²] ≈ (T(x) − S(x))² + σ²‖∇T(x) − ∇S(x)‖²``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LogitsFn = Callable[[Array], Array]
Selection = Literal["top", "label", "all"]
SELECTIONS: tuple[str, ...] = ("top", "label", "all")

# sqrt(‖g‖² + ε): a finite gradient where an input gradient is exactly 0 (a
# ReLU net that blocks everything), where ‖g‖ itself has none.
NORM_EPSILON = 1e-12


def selected_outputs(teacher_logits: Array, labels: Array | None, selection: Selection) -> Array:
    """Indices of the outputs whose input gradients are matched.

    Args:
      teacher_logits: ``(B, K)``.
      labels: ``(B,)`` int ground-truth classes (needed for ``"label"``).
      selection: ``"top"`` (the teacher's top class), ``"label"`` (the
        ground-truth class) or ``"all"`` (every output).
    Returns:
      ``(B, n)`` int32 indices: ``n = 1`` for ``"top"``/``"label"``, ``K`` for ``"all"``.
    """
    chex.assert_rank(teacher_logits, 2)
    batch, classes = teacher_logits.shape
    if selection == "top":
        return jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)[:, None]
    if selection == "label":
        if labels is None:
            raise ValueError("selection 'label' needs the ground-truth labels")
        chex.assert_shape(labels, (batch,))
        return labels.astype(jnp.int32)[:, None]
    if selection == "all":
        return jnp.broadcast_to(jnp.arange(classes, dtype=jnp.int32), (batch, classes))
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def input_gradients(logits_fn: LogitsFn, images: Array, outputs: Array, *,
                    has_aux: bool = False) -> tuple:
    """``∇ₓ y_i(x)`` per example for the selected outputs, by one VJP per selected output.

    The network is linearised once (``jax.vjp``); each selected output ``j``
    costs one backward pass with the cotangent ``onehot(outputs[:, j])`` — the
    per-example gradient of ``y_{outputs[b, j]}`` w.r.t. image ``b`` (examples
    are independent, so one batched VJP gives all of them).

    Args:
      logits_fn: ``(B, *input) -> (B, K)`` (or ``-> ((B, K), aux)`` with
        ``has_aux``), examples processed independently.
      images: ``(B, *input)``.
      outputs: ``(B, n)`` int indices (see :func:`selected_outputs`).
      has_aux: ``logits_fn`` also returns auxiliary outputs (e.g. other heads,
        intermediates), passed through.
    Returns:
      ``(logits (B, K), gradients (B, n, *input))``, plus ``aux`` with ``has_aux``.
    """
    if has_aux:
        logits, vjp, aux = jax.vjp(logits_fn, images, has_aux=True)
    else:
        logits, vjp = jax.vjp(logits_fn, images)
    chex.assert_rank(logits, 2)
    chex.assert_equal_shape_prefix([logits, outputs], 1)
    classes = logits.shape[-1]
    grads = jnp.stack([vjp(jax.nn.one_hot(outputs[:, j], classes, dtype=logits.dtype))[0]
                       for j in range(outputs.shape[1])], axis=1)
    return (logits, grads, aux) if has_aux else (logits, grads)


def normalise_per_example(gradients: Array) -> Array:
    """``g / ‖g‖₂`` per example and selected output.

    Args:
      gradients: ``(B, n, *input)``.
    Returns:
      ``(B, n, D)`` with ``D = prod(input)``, each row of unit norm (0 stays ~0).
    """
    flat = gradients.reshape(gradients.shape[0], gradients.shape[1], -1)
    return flat / jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1, keepdims=True) + NORM_EPSILON)


def jacobian_distance(student_gradients: Array, teacher_gradients: Array) -> Array:
    """Per-example ``Σ_i ‖∇ₓT_i/‖∇ₓT_i‖₂ − ∇ₓS_i/‖∇ₓS_i‖₂‖²`` over the selected outputs ``i``.

    Args:
      student_gradients, teacher_gradients: ``(B, n, *input)`` (or already
        normalised ``(B, n, D)``; normalising twice changes nothing).
    Returns:
      ``(B,)``, each in ``[0, 4n]``.
    """
    student = normalise_per_example(student_gradients)
    teacher = normalise_per_example(teacher_gradients)
    chex.assert_equal_shape([student, teacher])
    diff = student - teacher
    return jnp.sum(jnp.square(diff), axis=(1, 2))


def jacobian_matching_loss(student_fn: LogitsFn, images: Array, outputs: Array,
                           teacher_gradients: Array, *, has_aux: bool = False) -> tuple:
    """Mean over the batch of :func:`jacobian_distance` to fixed teacher gradients.

    The teacher's gradients are targets (no gradient flows into them); the
    student's are computed here by :func:`input_gradients`, so the gradient of
    this loss w.r.t. the student's parameters is double back-propagation.

    Args:
      student_fn: ``(B, *input) -> (B, K)`` (``-> ((B, K), aux)`` with ``has_aux``).
      images: ``(B, *input)``.
      outputs: ``(B, n)`` selected outputs (from the teacher: :func:`selected_outputs`).
      teacher_gradients: ``(B, n, *input)`` or normalised ``(B, n, D)``.
    Returns:
      ``(loss (), student_logits (B, K))``, plus ``aux`` with ``has_aux``.
    """
    logits, grads, *aux = input_gradients(student_fn, images, outputs, has_aux=has_aux)
    loss = jnp.mean(jacobian_distance(grads, jax.lax.stop_gradient(teacher_gradients)))
    return (loss, logits, aux[0]) if has_aux else (loss, logits)


def output_matching_loss(student_logits: Array, teacher_logits: Array,
                         temperature: float = 1.0) -> Array:
    """Distillation: ``τ² · mean_b KL(softmax(t_b/τ) ‖ softmax(s_b/τ))``.

    Zero iff the softened distributions agree; the ``τ²`` keeps gradient
    magnitudes comparable across temperatures.

    Args:
      student_logits, teacher_logits: ``(B, K)``; the teacher's are targets.
    Returns:
      ``()``.
    """
    chex.assert_equal_shape([student_logits, teacher_logits])
    target = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_target = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(target * (log_target - log_student), axis=-1)
    return temperature ** 2 * jnp.mean(kl)


def gaussian_noise(key: Array, images: Array, sigma: float | Array) -> Array:
    """``x + ξ`` with ``ξ ~ N(0, σ²I)`` of the images' shape."""
    return images + sigma * jax.random.normal(key, images.shape, images.dtype)


def noisy_output_matching_loss(student_fn: LogitsFn, teacher_fn: LogitsFn, images: Array,
                               key: Array, sigma: float | Array,
                               temperature: float = 1.0) -> tuple[Array, Array]:
    """Distillation with input noise: :func:`output_matching_loss` on ``x + ξ``.

    Both nets see the same noisy copy ``x + ξ``, ``ξ ~ N(0, σ²I)``; to first
    order in σ its expectation is output matching plus ``σ²`` × a Jacobian
    matching term (:func:`first_order_noise_matching`).

    Returns:
      ``(loss (), student_logits on the noisy copies (B, K))``.
    """
    noisy = gaussian_noise(key, images, sigma)
    student_logits = student_fn(noisy)
    teacher_logits = jax.lax.stop_gradient(teacher_fn(noisy))
    return output_matching_loss(student_logits, teacher_logits, temperature), student_logits


def attention_maps(activations: Array) -> Array:
    """Attention map of a feature map: channel-mean of squared activations, L2-normalised.

    Args:
      activations: ``(B, H, W, C)``.
    Returns:
      ``(B, H·W)``, ``q_b = vec(mean_c a²) / ‖vec(mean_c a²)‖₂``.
    """
    chex.assert_rank(activations, 4)
    energy = jnp.mean(jnp.square(activations), axis=-1).reshape(activations.shape[0], -1)
    return energy / jnp.sqrt(jnp.sum(jnp.square(energy), axis=-1, keepdims=True)
                             + NORM_EPSILON)


def attention_transfer_loss(student_intermediates: Mapping[str, Array],
                            teacher_intermediates: Mapping[str, Array],
                            layers: Sequence[str]) -> Array:
    """``Σ_layers mean_b ‖q_S − q_T‖²`` with ``q`` = :func:`attention_maps`.

    Student and teacher maps at a named layer must share their spatial size;
    channel counts may differ (the channel mean removes them).

    Args:
      student_intermediates, teacher_intermediates: ``{name: (B, H, W, C)}``
        (the teacher's may already be maps ``(B, H·W)``).
      layers: the names to match.
    Returns:
      ``()``.
    """
    total = jnp.zeros((), jnp.float32)
    for name in layers:
        q_s = attention_maps(student_intermediates[name])
        teacher = jax.lax.stop_gradient(teacher_intermediates[name])
        q_t = teacher if teacher.ndim == 2 else attention_maps(teacher)
        chex.assert_equal_shape([q_s, q_t])
        total = total + jnp.mean(jnp.sum(jnp.square(q_s - q_t), axis=-1))
    return total


def lwf_loss(new_logits: Array, labels: Array, old_logits: Array, teacher_old_logits: Array,
             *, temperature: float, old_weight: float) -> dict[str, Array]:
    """Learning without forgetting (Li & Hoiem) on new-task data.

    ``CE(new_logits, labels) + old_weight · τ²·KL(softmax(T_old/τ) ‖ softmax(S_old/τ))``:
    the student fits the new task's labels with its new head while its old head
    mimics the teacher's responses on the same (new-task) images.

    Args:
      new_logits: ``(B, K_new)`` student's new head.
      labels: ``(B,)`` int new-task labels.
      old_logits: ``(B, K_old)`` student's old head.
      teacher_old_logits: ``(B, K_old)`` the teacher's responses (targets).
    Returns:
      ``{"task": (), "lwf": ()}`` — the two weighted terms; their sum is the loss.
    """
    chex.assert_rank(new_logits, 2)
    chex.assert_shape(labels, (new_logits.shape[0],))
    task = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(new_logits, labels))
    return {"task": task,
            "lwf": old_weight * output_matching_loss(old_logits, teacher_old_logits, temperature)}


def classification_loss(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy: ``logits (B, K)``, int ``labels (B,)`` → ``()``."""
    chex.assert_shape(labels, (logits.shape[0],))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# --------------------------------------------------------------------------- the equivalence


ScalarFn = Callable[[Array], Array]


def first_order_noise_matching(teacher_fn: ScalarFn, student_fn: ScalarFn, x: Array,
                               sigma: float | Array) -> Array:
    """``(T(x) − S(x))² + σ²‖∇ₓT(x) − ∇ₓS(x)‖²`` for scalar-output nets at one input.

    This is ``E_ξ[(T(x+ξ) − S(x+ξ))²]``, ``ξ ~ N(0, σ²I)``, for the nets
    linearised at ``x``; for the nets themselves the two differ by
    ``σ²·d(x)·Δd(x) + O(σ⁴)`` with ``d = T − S`` (the second-order Taylor term
    pairs with ``d(x)``), so the gap is ``O(σ⁴)`` where the outputs match.

    Args:
      teacher_fn, student_fn: ``(*input) -> ()``.
      x: ``(*input)``.
    Returns:
      ``()``.
    """
    def difference(v):
        return teacher_fn(v) - student_fn(v)

    d, grad = jax.value_and_grad(difference)(x)
    return jnp.square(d) + sigma ** 2 * jnp.sum(jnp.square(grad))


def monte_carlo_noise_matching(teacher_fn: ScalarFn, student_fn: ScalarFn, x: Array,
                               sigma: float | Array, key: Array,
                               num_samples: int) -> tuple[Array, Array]:
    """Monte-Carlo ``E_ξ[(T(x+ξ) − S(x+ξ))²]`` with ``num_samples`` draws of ``ξ ~ N(0, σ²I)``.

    Returns:
      ``(estimate (), standard error ())``.
    """
    xi = sigma * jax.random.normal(key, (num_samples, *x.shape), x.dtype)
    values = jax.vmap(lambda e: jnp.square(teacher_fn(x + e) - student_fn(x + e)))(xi)
    return jnp.mean(values), jnp.std(values) / jnp.sqrt(num_samples)
