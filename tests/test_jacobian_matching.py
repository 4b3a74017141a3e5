"""Knowledge transfer with Jacobian matching: losses, the noise equivalence, the step, the runs."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nettransplant.configs import jacobian_matching as jm_config
from nettransplant.core import layers as L
from nettransplant.jacobian import experiments, losses
from nettransplant.jacobian.models import ConvClassifier
from nettransplant.jacobian.train import fit, make_train_step
from nettransplant.training.loop import NonFiniteError, create_train_state


def tiny_classifier(heads=(("logits", 3),), channels=4, hidden=6) -> ConvClassifier:
    trunk = (L.Conv("conv1_1", channels), L.ReLU("relu1_1"), L.MaxPool("pool1"),
             L.Conv("fc", hidden, kernel_size=3, padding="VALID"), L.ReLU("relu_fc"))
    return ConvClassifier(trunk=trunk, heads=heads, image_size=6, in_channels=2)


def images(key, batch=5):
    return jax.random.normal(key, (batch, 6, 6, 2))


def full_jacobians(model, params, x):
    """Independent: every example's full Jacobian ``(B, K, *input)`` by ``jax.jacrev``."""
    @jax.jit
    def jacobians(p, images):
        return jax.vmap(jax.jacrev(lambda v: model.logits(p, v[None], "logits")[0]))(images)

    return np.asarray(jacobians(params, x))


# --------------------------------------------------------------------------- losses


def test_input_gradients_of_selected_outputs_are_rows_of_the_full_jacobian():
    model = tiny_classifier()
    params = model.init(jax.random.key(0))
    x = images(jax.random.key(1))
    outputs = jnp.array([[0, 2], [1, 1], [2, 0], [0, 1], [2, 2]], jnp.int32)

    @jax.jit
    def gradients(p, images, selected):  # parameters as arguments
        return losses.input_gradients(lambda v: model.logits(p, v, "logits"), images, selected)

    logits, grads = gradients(params, x, outputs)
    full = full_jacobians(model, params, x)
    expected = np.stack([full[b, outputs[b]] for b in range(x.shape[0])])
    chex.assert_shape(grads, (5, 2, 6, 6, 2))
    chex.assert_trees_all_close(grads, expected, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(logits, model.logits(params, x, "logits"), atol=1e-6)


def test_jacobian_matching_loss_equals_normalised_jacrev_distance():
    teacher, student = tiny_classifier(channels=5), tiny_classifier(channels=3)
    pt, ps = teacher.init(jax.random.key(0)), student.init(jax.random.key(1))
    x = images(jax.random.key(2))
    t_logits = teacher.logits(pt, x, "logits")

    jt, js = full_jacobians(teacher, pt, x), full_jacobians(student, ps, x)

    @jax.jit
    def loss_fn(params, images, outputs, teacher_rows):  # parameters as arguments
        return losses.jacobian_matching_loss(lambda v: student.logits(params, v, "logits"),
                                             images, outputs, teacher_rows)[0]

    labels = jnp.array([0, 1, 2, 1, 0])
    for selection in ("top", "label", "all"):
        outputs = np.asarray(losses.selected_outputs(t_logits, labels, selection))
        teacher_rows = np.stack([jt[b, outputs[b]] for b in range(len(outputs))])
        loss = loss_fn(ps, x, outputs, teacher_rows)
        expected = 0.0
        for b in range(x.shape[0]):
            for i in outputs[b]:
                a, s = jt[b, i].ravel(), js[b, i].ravel()
                expected += np.sum((a / np.linalg.norm(a) - s / np.linalg.norm(s)) ** 2)
        np.testing.assert_allclose(float(loss), expected / x.shape[0], rtol=1e-4)


def test_selected_outputs_are_top_class_label_or_all():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    labels = jnp.array([2, 1])
    np.testing.assert_array_equal(losses.selected_outputs(logits, labels, "top"), [[1], [0]])
    np.testing.assert_array_equal(losses.selected_outputs(logits, labels, "label"), [[2], [1]])
    np.testing.assert_array_equal(losses.selected_outputs(logits, None, "all"),
                                  [[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="selection"):
        losses.selected_outputs(logits, labels, "bottom")


def test_jacobian_distance_is_scale_invariant_and_four_for_opposite_gradients():
    g = jax.random.normal(jax.random.key(0), (3, 1, 4, 4, 1))
    np.testing.assert_allclose(losses.jacobian_distance(7.0 * g, g), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.jacobian_distance(-g, 0.5 * g), 4.0, rtol=1e-5)


def test_jacobian_loss_has_a_finite_gradient_where_a_jacobian_is_zero():
    def dead(params, v):  # a ReLU that blocks everything: zero input gradient
        return jax.nn.relu(-jnp.abs(params) * jnp.sum(v, axis=(1, 2, 3)))[:, None] \
            * jnp.ones((1, 2))

    x = images(jax.random.key(0), 2)
    target = jnp.ones((2, 1, 6 * 6 * 2))
    outputs = jnp.zeros((2, 1), jnp.int32)
    grad = jax.grad(lambda p: losses.jacobian_matching_loss(
        lambda v: dead(p, v), x, outputs, target)[0])(jnp.float32(1.0))
    assert np.isfinite(grad)


def test_output_matching_is_zero_at_the_teacher_and_tau_squared_kl_otherwise():
    t = jnp.array([[1.0, 2.0, 0.5]])
    s = jnp.array([[0.0, 1.0, 1.0]])
    assert float(losses.output_matching_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    tau = 2.0
    p, q = np.exp(t[0] / tau) / np.exp(t[0] / tau).sum(), np.exp(s[0] / tau) / np.exp(
        s[0] / tau).sum()
    expected = tau ** 2 * np.sum(p * np.log(p / q))
    assert float(losses.output_matching_loss(s, t, tau)) == pytest.approx(expected, rel=1e-5)


def test_noisy_output_matching_is_output_matching_on_the_same_noisy_copy():
    teacher, student = tiny_classifier(channels=5), tiny_classifier(channels=3)
    pt, ps = teacher.init(jax.random.key(0)), student.init(jax.random.key(1))
    x, key = images(jax.random.key(2)), jax.random.key(3)
    loss, _ = losses.noisy_output_matching_loss(
        lambda v: student.logits(ps, v, "logits"), lambda v: teacher.logits(pt, v, "logits"),
        x, key, 0.5, 2.0)
    noisy = x + 0.5 * jax.random.normal(key, x.shape)
    expected = losses.output_matching_loss(student.logits(ps, noisy, "logits"),
                                           teacher.logits(pt, noisy, "logits"), 2.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    clean, _ = losses.noisy_output_matching_loss(
        lambda v: student.logits(ps, v, "logits"), lambda v: teacher.logits(pt, v, "logits"),
        x, key, 0.0, 2.0)
    np.testing.assert_allclose(clean, losses.output_matching_loss(
        student.logits(ps, x, "logits"), teacher.logits(pt, x, "logits"), 2.0), rtol=1e-6)


def test_attention_transfer_matches_a_numpy_reimplementation():
    rng = np.random.default_rng(0)
    student = {"pool1": rng.normal(size=(2, 3, 3, 4)), "pool2": rng.normal(size=(2, 2, 2, 4))}
    teacher = {"pool1": rng.normal(size=(2, 3, 3, 7)), "pool2": rng.normal(size=(2, 2, 2, 9))}

    def attention(a):
        q = (a ** 2).mean(axis=-1).reshape(len(a), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    expected = sum(np.mean(np.sum((attention(student[k]) - attention(teacher[k])) ** 2, axis=1))
                   for k in ("pool1", "pool2"))
    as_jax = {k: jnp.asarray(v, jnp.float32) for k, v in student.items()}
    got = losses.attention_transfer_loss(
        as_jax, {k: jnp.asarray(v, jnp.float32) for k, v in teacher.items()}, ("pool1", "pool2"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    maps = {k: losses.attention_maps(jnp.asarray(v, jnp.float32)) for k, v in teacher.items()}
    np.testing.assert_allclose(losses.attention_transfer_loss(as_jax, maps, ("pool1", "pool2")),
                               expected, rtol=1e-5)


def test_lwf_is_new_task_cross_entropy_plus_softened_old_head_distillation():
    new = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    old = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    teacher_old = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    terms = losses.lwf_loss(new, labels, old, teacher_old, temperature=2.0, old_weight=0.5)
    ce = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0))])
    assert float(terms["task"]) == pytest.approx(ce, rel=1e-5)
    expected_old = 0.5 * float(losses.output_matching_loss(old, teacher_old, 2.0))
    assert float(terms["lwf"]) == pytest.approx(expected_old, rel=1e-6)
    same = losses.lwf_loss(new, labels, teacher_old, teacher_old, temperature=2.0,
                           old_weight=1.0)
    assert float(same["lwf"]) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- the equivalence


def smooth_net(key, dim=2, hidden=8):
    """A scalar tanh net ``R^dim -> R`` (float64 parameters)."""
    k1, k2, k3 = jax.random.split(key, 3)
    w1 = jax.random.normal(k1, (dim, hidden), jnp.float64)
    b1 = jax.random.normal(k2, (hidden,), jnp.float64)
    w2 = jax.random.normal(k3, (hidden,), jnp.float64) / np.sqrt(hidden)

    def net(x):
        return jnp.tanh(x @ w1 + b1) @ w2

    return net


def gauss_hermite_expectation(fn, x, sigma, points=40):
    """``E_ξ[fn(x + ξ)]``, ``ξ ~ N(0, σ²I)`` in 2-D, by tensor Gauss–Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-t²/2)
    weights = weights / weights.sum()
    t1, t2 = np.meshgrid(nodes, nodes, indexing="ij")
    xi = sigma * np.stack([t1.ravel(), t2.ravel()], axis=1)
    w = np.outer(weights, weights).ravel()
    return float(np.sum(w * np.asarray(jax.vmap(fn)(x + jnp.asarray(xi)))))


def gaps(teacher, student, x, sigmas):
    def squared(v):
        return jnp.square(teacher(v) - student(v))

    return np.array([gauss_hermite_expectation(squared, x, s)
                     - float(losses.first_order_noise_matching(teacher, student, x, s))
                     for s in sigmas])


SIGMAS = np.array([0.08, 0.04, 0.02, 0.01])


def test_noise_matching_equals_output_plus_jacobian_matching_to_first_order():
    with jax.enable_x64(True):
        teacher, student = smooth_net(jax.random.key(0)), smooth_net(jax.random.key(1))
        x = jnp.array([0.3, -0.2], jnp.float64)
        gap = gaps(teacher, student, x, SIGMAS)
        # The first-order expansion leaves σ²·d(x)·Δd(x) + O(σ⁴), d = T − S.
        def d(v):
            return teacher(v) - student(v)

        second_order = float(d(x) * jnp.trace(jax.hessian(d)(x)))
        assert abs(second_order) > 1e-2  # a generic point: outputs differ, curvature too
        np.testing.assert_allclose(gap / SIGMAS ** 2, second_order, rtol=0.02)
        # ... so the relative gap vanishes like σ²: noise matching ≈ outputs + σ²·Jacobians.
        total = gap + np.array([float(losses.first_order_noise_matching(teacher, student, x, s))
                                for s in SIGMAS])
        relative = np.abs(gap) / total
        assert np.all(relative[1:] < relative[:-1] / 3) and relative[-1] < 1e-3


def test_noise_matching_gap_is_fourth_order_where_outputs_match():
    with jax.enable_x64(True):
        teacher, raw = smooth_net(jax.random.key(0)), smooth_net(jax.random.key(1))
        x = jnp.array([0.3, -0.2], jnp.float64)
        offset = teacher(x) - raw(x)

        def student(v):  # matches the teacher's output at x, not its gradient
            return raw(v) + offset

        gap = gaps(teacher, student, x, SIGMAS)
        assert np.all(np.abs(gap / SIGMAS ** 2) < 0.05)  # gap / σ² → 0
        order = np.diff(np.log(np.abs(gap))) / np.diff(np.log(SIGMAS))
        np.testing.assert_allclose(order, 4.0, atol=0.25)  # gap ∝ σ⁴


def test_monte_carlo_noise_matching_converges_to_the_exact_expectation():
    with jax.enable_x64(True):
        teacher, student = smooth_net(jax.random.key(0)), smooth_net(jax.random.key(1))
        x, sigma = jnp.array([0.3, -0.2], jnp.float64), 0.3
        exact = gauss_hermite_expectation(lambda v: jnp.square(teacher(v) - student(v)), x,
                                          sigma)
        errors = []
        for n in (1_000, 100_000):
            estimate, se = losses.monte_carlo_noise_matching(teacher, student, x, sigma,
                                                             jax.random.key(7), n)
            assert abs(float(estimate) - exact) < 4 * float(se)
            errors.append(float(se))
        assert errors[1] < errors[0] / 5  # the standard error shrinks like 1/√n


# --------------------------------------------------------------------------- the train step


def test_whole_student_step_compiles_once_for_every_sample_count():
    model = tiny_classifier()
    optimizer = optax.adam(1e-2)
    base = experiments.supervised_loss(model, "logits")
    traced = chex.assert_max_traces(base, n=1)
    step = make_train_step(traced, optimizer)
    rng = np.random.default_rng(0)
    for n in (2, 5, 40):  # smaller than, and larger than, a batch
        data = {"images": rng.normal(size=(n, 6, 6, 2)).astype(np.float32),
                "labels": rng.integers(0, 3, n).astype(np.int32)}
        state = create_train_state(model.init(jax.random.key(n)), optimizer)
        state, history = fit(step, state, None, data, batch_size=8, num_steps=12, seed=0,
                             log_every=5)
        assert int(state.step) == 12
        assert {"loss", "task", "grad_norm", "param_norm"} <= set(history[-1])
        assert history[-1]["loss"] < history[0]["loss"]
    chex.clear_trace_counter()


def test_whole_student_step_learns_every_parameter_and_refuses_non_finite_losses():
    model = tiny_classifier()
    optimizer = optax.sgd(0.1)
    params = model.init(jax.random.key(0))

    def loss_fn(p, frozen, batch, key):
        logits = model.logits(p, batch["images"], "logits")
        loss = losses.classification_loss(logits, batch["labels"]) * frozen["scale"]
        return loss, {"task": loss}

    step = make_train_step(loss_fn, optimizer)
    rng = np.random.default_rng(0)
    data = {"images": rng.normal(size=(8, 6, 6, 2)).astype(np.float32),
            "labels": rng.integers(0, 3, 8).astype(np.int32)}
    state, _ = fit(step, create_train_state(params, optimizer), {"scale": jnp.float32(1.0)},
                   data, batch_size=8, num_steps=2, seed=0)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params)
    assert all(v > 0 for v in jax.tree.leaves(moved))  # trunk and head both learn
    before = jax.tree.map(np.asarray, state.params)
    with pytest.raises(NonFiniteError) as err:
        fit(step, state, {"scale": jnp.float32(np.nan)}, data, batch_size=8, num_steps=3,
            seed=0)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, err.value.state.params), before)


# --------------------------------------------------------------------------- the experiments


def test_quick_experiment_writes_every_table_row(tmp_path):
    config = jm_config.get_config("quick")
    results = experiments.run(config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["claims"] == results["claims"]
    assert set(saved["distillation"]) == set(experiments.DISTILLATION_METHODS)
    counts = [experiments.count_label(n) for n in config.distillation.samples_per_class]
    for method in experiments.DISTILLATION_METHODS:
        assert list(saved["distillation"][method]) == counts
        for values in saved["robustness"]["students"][method].values():
            assert len(values) == len(config.robustness.sigmas)
    table = saved["transfer"]["table"]
    assert list(table) == list(experiments.TRANSFER_METHODS)
    for cells in table.values():
        assert list(cells) == ["25", "50", "all"]
        assert all(0.0 <= v <= 100.0 for v in cells.values())
    markdown = (tmp_path / "results.md").read_text()
    for method in experiments.TRANSFER_METHODS:
        assert f"| {method} |" in markdown
    assert "47.31" in markdown  # the paper's LwF + attention + Jacobians at 25 per class
    assert (tmp_path / "accuracy_vs_samples.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_noise.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
