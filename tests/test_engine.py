"""The back-distillation engine proves the paper's claims (Eqs. 2-4, known answers).

* Exp. 1 has a known answer: with ``f`` and ``g_S = g_T`` from one net (β = 1), a
  reorder ``R`` and the adapter ``R⁻¹``, the back-distill loss is 0 and the
  transplant net reproduces the teacher.
* The scale toy ``g_T(x) = g_S(c·x)`` with β = c has a known answer too: α = 1,
  the functional match (``R⁻¹`` after β) has zero loss and the closed form
  recovers it (α counts β once).
* The single-conv adapter has a closed form: it is the least-squares
  solution of an explicitly built design matrix, the optimum Adam converges to,
  and it recovers the ideal adapter from a few draws.
* The gradient w.r.t. θ_h is ``jax.grad`` of an independent naive loss that
  recomputes the whole chain with ``jax.vjp``/``jax.linear_transpose`` of the
  surrogate forwards, and matches finite differences.
* Cached frozen chains give the same losses, gradients and parameters
  as a step that recomputes them.

Setting: VGG-16 at width 1/8 (``x`` has M = 8 channels), 32×32 images, the
enlarged S = 7 classification G_y' (D' maps are 112×112×8), banks of 16 draws.
Exp.-1 setups use the 2nd (random mask) dummy in the task modules; the training
setup adds a random mask at one of the adapter's ReLUs so that the adapter's
``x_rand`` keys are exercised too. Frozen parameters are random (He-normal
kernels, N(0, 0.1²) biases); "transfer" pairs a teacher ``g_T`` with a different
student ``g_S = g_T + noise``, so α ≠ 1 and no adapter is exact.
"""

from __future__ import annotations

import functools
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nettransplant.core import modules as M
from nettransplant.core.adapter import Adapter
from nettransplant.training.loop import IndexStream, NonFiniteError, create_train_state
from nettransplant.transplant import closed_form as C
from nettransplant.transplant import objectives as O
from nettransplant.transplant.step import (
    AdapterTrainState,
    make_train_step,
    raw_draws,
    train_adapter,
)
from nettransplant.transplant.wiring import Transplant, split_params

WIDTH = 1 / 8
IMAGE = 32
CHANNELS = M.category_channels(WIDTH)  # M = 8
BETA = 2.5  # the transfer setups' re-scaling
# Exp. 1 wires a teacher's own f and g: the features need no re-scaling (β = 1, as in
# the paper). β ≠ 1 with a known answer is the scale toy: g_T(x) = g_S(c·x), β = c.
EXP1_BETA = 1.0
LAMBDA0 = 10.0
NUM_DRAWS = 16
CHUNK = 8
# One draw batch for every step and every gradient check: one compiled shape.
DRAW_INDEX = jnp.array([3, 10, 5, 0, 15, 7, 8, 12])
REORDER_SEED = 3

CATEGORY = M.CategoryModule(width=WIDTH)
CLASSIFICATION = M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE)  # fc6: 1×1
SEGMENTATION = M.SegmentationTaskModule(width=WIDTH, input_size=IMAGE)


def transplant(kernel_size: int = 3, num_convs: int = 1, *,
               reorder_seed: int | None = REORDER_SEED,
               task_module=CLASSIFICATION, **kwargs) -> Transplant:
    """Exp. 1 wiring: ``f`` → adapter → the task module, 2nd dummy in the task modules."""
    kwargs.setdefault("task_dummy_relu",
                      "random_mask" if task_module is CLASSIFICATION else "identity")
    return Transplant(CATEGORY, Adapter(CHANNELS, num_convs, kernel_size, reorder_seed),
                      task_module, task_module, **kwargs)


EXP1 = transplant()  # 1-conv 3×3 adapter; builds every classification cache
EXP1_1X1 = transplant(1)
EXP1_DEEP = transplant(3, 3)
# The transplant the train steps and gradient checks run on.
TRAINED = transplant(3, 3, adapter_dummy_relu={"default": "identity",
                                               "adapter_relu2": "random_mask"})


# ----------------------------------------------------------------- tolerances (float32)

# Exp. 1 identities: 1/β = 0.4 is inexact in binary; measured |Δ| ~1e-6 relative.
IDENTITY_TOL = 1e-5
# Closed form vs lstsq on the design matrix / vs the known ideal kernel: measured ~1e-6.
SOLVE_TOL = 1e-5
# Closed form vs 300 Adam steps (cosine-decayed to 0): measured loss equal, kernel ~2e-6
# relative (after 200 steps still ~8e-5: the quadratic has flat directions).
ADAM_LOSS_TOL, ADAM_KERNEL_TOL = 1e-5, 1e-4
# Library gradient vs the naive vjp-of-surrogate gradient: measured identical jitted,
# 2e-7 un-jitted. Cached vs recomputed chains: measured bit-identical.
GRAD_TOL = 1e-5
# Central differences in float64, eps = 1e-5: truncation O(eps²), measured ~1e-8 (in
# float32 no eps gets below ~1e-3: the loss is a degree-6 polynomial of the kernels).
FD_EPS, FD_TOL = 1e-5, 1e-6


def assert_close(actual, expected, tol: float) -> None:
    """``max |actual - expected| <= tol · max |expected|`` leaf by leaf (exact if it is 0)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        chex.assert_equal_shape([a, e])
        scale = float(np.abs(e).max())
        if scale == 0:  # e.g. bias gradients: biases never enter D'
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale)


def assert_trees_equal(a, b) -> None:
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


# ----------------------------------------------------------------- setups (built once)


def random_params(tp: Transplant, seed: int) -> dict:
    """He-normal kernels and N(0, 0.1²) biases in the shapes ``tp.init`` declares."""
    shapes = jax.eval_shape(functools.partial(tp.init, image_size=IMAGE), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            std = math.sqrt(2 / math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def images(seed: int, batch: int = 8) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, IMAGE, IMAGE, 3))


def zero_kernels(adapter_params):
    return jax.tree.map(jnp.zeros_like, adapter_params)


@functools.cache
def exp1():
    """Exp. 1: ``g_S = g_T`` (the teacher's own task module), 16 cached draws."""
    params = random_params(EXP1, seed=0)
    params["student_task_module"] = params["teacher_task_module"]
    adapter, frozen = split_params(params)
    shape = O.output_gradient_shape(EXP1, image_size=IMAGE)
    cache = O.build_chain_cache(EXP1, frozen, jax.random.key(1), NUM_DRAWS, shape, chunk=CHUNK)
    return types.SimpleNamespace(params=params, adapter=adapter, frozen=frozen, shape=shape,
                                 cache=cache,
                                 scalars=O.compute_scalars(cache, EXP1_BETA, LAMBDA0))


def scale_first_conv(task_params, c: float):
    """``g(c·x)`` as parameters: the task module's first conv (conv2_1) kernel × c."""
    first = task_params["conv2_1"]
    return {**task_params, "conv2_1": {**first, "kernel": first["kernel"] * c}}


@functools.cache
def transfer():
    """A generic student ``g_S = g_T + noise``: the same draws, α ≠ 1, no exact adapter."""
    setup = exp1()
    other = random_params(EXP1, seed=1)["student_task_module"]
    student = jax.tree.map(lambda t, o: t + 0.5 * o, setup.frozen["teacher_task_module"], other)
    frozen = {**setup.frozen, "student_task_module": student}
    # The chains depend on the frozen params only (passed as jit arguments): EXP1's
    # compiled chains serve this bank too.
    cache = O.build_chain_cache(EXP1, frozen, jax.random.key(1), NUM_DRAWS, setup.shape,
                                chunk=CHUNK)
    return types.SimpleNamespace(frozen=frozen, cache=cache, shape=setup.shape,
                                 scalars=O.compute_scalars(cache, BETA, LAMBDA0))


def recording(inner: optax.GradientTransformation, traces: list):
    """``inner`` that also keeps the last gradient in its state and counts its traces."""

    def init(params):
        return (jax.tree.map(jnp.zeros_like, params), inner.init(params))

    def update(grads, state, params=None):
        traces.append(1)  # Python side effect: runs once per trace of the step
        updates, inner_state = inner.update(grads, state[1], params)
        return updates, (grads, inner_state)

    return optax.GradientTransformation(init, update)


def recorded_gradient(state: AdapterTrainState):
    return state.opt_state[0]


def with_learning_rate(state: AdapterTrainState, lr: float) -> AdapterTrainState:
    grads, adam = state.opt_state
    old = adam.hyperparams["learning_rate"]
    adam = adam._replace(hyperparams={**adam.hyperparams,
                                      "learning_rate": jnp.asarray(lr, old.dtype)})
    return state.replace(opt_state=(grads, adam))


@functools.cache
def training():
    """The cached and the naive back-distill steps of TRAINED (Adam, lr injectable)."""
    adapter = TRAINED.adapter.init(jax.random.key(7),
                                   jnp.zeros((1, IMAGE // 2, IMAGE // 2, CHANNELS)))["params"]
    traces = {"cached": [], "recomputed": []}

    def optimizer(name):
        return recording(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), traces[name])

    cached_opt, naive_opt = optimizer("cached"), optimizer("recomputed")
    return types.SimpleNamespace(
        adapter=adapter, traces=traces, optimizer=cached_opt, naive_optimizer=naive_opt,
        step=make_train_step(TRAINED, "back-distill", cached_opt),
        naive_step=make_train_step(TRAINED, "back-distill", naive_opt,
                                   recompute_chains=True))


def fresh_state(setup=None, params=None):
    setup = setup or training()
    return create_train_state(setup.adapter if params is None else params, setup.optimizer)


def naive_back_distill_loss(adapter_params, frozen, output_gradients, mask_keys, scalars):
    """``λ E‖α D'_S − D'_T‖²`` with every chain recomputed by JAX from the surrogates.

    ``D'_S = vjp(g_S.surrogate ∘ h.surrogate)(G_y')`` and
    ``D'_T = linear_transpose(g_T.surrogate)(G_y')``, the same ``x_rand`` keys for
    both: nothing of the library's explicit chains or cache is used.
    """
    side = CLASSIFICATION.enlarged_gradient_shape(output_gradients.shape[1])
    x = jnp.zeros((output_gradients.shape[0], *side, CHANNELS))

    def student(v):
        h = TRAINED.adapter.surrogate(adapter_params, v, beta=scalars.beta,
                                      dummy_relu=TRAINED.adapter_dummy_relu, mask_keys=mask_keys)
        return TRAINED.student_task_module.surrogate(
            frozen["student_task_module"], h, dummy_relu=TRAINED.task_dummy_relu,
            mask_keys=mask_keys)

    def teacher(v):
        return TRAINED.teacher_task_module.surrogate(
            frozen["teacher_task_module"], v, dummy_relu=TRAINED.task_dummy_relu,
            mask_keys=mask_keys)

    d_student = jax.vjp(student, x)[1](output_gradients)[0]
    d_teacher = jax.linear_transpose(teacher, x)(output_gradients)[0]
    diff = scalars.alpha * d_student - d_teacher
    return scalars.lam * jnp.mean(jnp.sum(jnp.square(diff), axis=(1, 2, 3)))


@functools.cache
def naive_reference():
    """Naive loss and gradient (jitted once) on the transfer bank's DRAW_INDEX draws."""
    setup = transfer()
    draws = raw_draws(jax.random.key(1), NUM_DRAWS, setup.shape).take(DRAW_INDEX)
    return jax.jit(jax.value_and_grad(naive_back_distill_loss))(
        training().adapter, setup.frozen, draws.output_gradients, draws.mask_keys,
        setup.scalars)


SEG_SCALE = 0.5


@functools.cache
def segmentation():
    """Exp. 3 wiring (FCN-8s task module, 1st dummy everywhere, 1×1 adapter) on the scale
    toy: ``g_T(x) = g_S(c·x)`` with c = β = 0.5, so the functional match is ``R⁻¹``."""
    tp = transplant(1, task_module=SEGMENTATION)
    params = random_params(tp, seed=3)
    params["teacher_task_module"] = scale_first_conv(params["student_task_module"], SEG_SCALE)
    adapter, frozen = split_params(params)
    shape = O.output_gradient_shape(tp, image_size=IMAGE)
    cache = O.build_chain_cache(tp, frozen, jax.random.key(2), CHUNK, shape, chunk=CHUNK)
    return types.SimpleNamespace(tp=tp, adapter=adapter, frozen=frozen, shape=shape, cache=cache,
                                 scalars=O.compute_scalars(cache, SEG_SCALE, 1.0))


# ================================================================= assembly errors


@pytest.mark.parametrize("pieces, named", [
    ({"adapter": Adapter(4)}, r"the adapter takes 4"),
    ({"student_task_module": M.ClassificationTaskModule(width=1 / 16, input_size=IMAGE)},
     r"the student_task_module takes 4"),
    ({"teacher_task_module": M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE,
                                                        in_channels=16)},
     r"the teacher_task_module takes 16"),
])
def test_channel_mismatch_is_a_value_error_naming_the_pieces(pieces, named):
    kwargs = {"category_module": CATEGORY, "adapter": Adapter(CHANNELS),
              "student_task_module": CLASSIFICATION, "teacher_task_module": CLASSIFICATION,
              **pieces}
    with pytest.raises(ValueError, match=r"channel mismatch: the category module outputs 8 "
                                         r"channels but .*" + named):
        Transplant(**kwargs)


def test_student_and_teacher_must_solve_the_same_task_with_the_same_outputs():
    with pytest.raises(ValueError, match="same task.*ClassificationTaskModule.*"
                                         "SegmentationTaskModule"):
        Transplant(CATEGORY, Adapter(CHANNELS), CLASSIFICATION, SEGMENTATION)
    three = M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE, num_outputs=3)
    with pytest.raises(ValueError, match="same outputs, got 1 and 3"):
        Transplant(CATEGORY, Adapter(CHANNELS), CLASSIFICATION, three)


@pytest.mark.parametrize("dummies, message", [
    ({"task_dummy_relu": {"relu9_1": "random_mask"}}, r"\['relu9_1'\] that are not ReLU"),
    ({"task_dummy_relu": {"relu2_1": "random_mask"}}, r"no dummy for ReLU layers .*relu2_2"),
    ({"task_dummy_relu": "sigmoid"}, r"must be one of .*'sigmoid'"),
    ({"adapter_dummy_relu": {"default": "identity", "adapter_relu2": "random_mask"}},
     r"\['adapter_relu2'\] that are not ReLU layers of the Adapter"),
])
def test_bad_dummy_map_fails_when_the_pieces_are_put_together(dummies, message):
    with pytest.raises(ValueError, match=message):
        Transplant(CATEGORY, Adapter(CHANNELS), CLASSIFICATION, CLASSIFICATION, **dummies)


def test_transplant_with_a_per_layer_dummy_map_is_a_jit_static_argument():
    # Exp. 2 chooses dummies per layer; the jitted chains take the transplant as static.
    exp2 = {"default": "identity", "relu2_1": "random_mask"}
    tp = transplant(1, task_dummy_relu=exp2, adapter_dummy_relu={"adapter_relu1": "identity"})
    same = transplant(1, task_dummy_relu=dict(reversed(exp2.items())),
                      adapter_dummy_relu={"adapter_relu1": "identity"})
    assert tp == same and hash(tp) == hash(same)  # one compiled chain for equal transplants
    assert float(jax.jit(lambda t, v: v + 1, static_argnums=0)(tp, 1.0)) == 2.0


def test_adapter_rejects_bad_configurations():
    for kwargs in ({"channels": 0}, {"channels": 8, "num_convs": 0},
                   {"channels": 8, "kernel_size": 5}):
        with pytest.raises(ValueError, match="Adapter"):
            Adapter(**kwargs)


def test_check_params_lists_mis_shaped_missing_and_unexpected_keys():
    params = exp1().params
    EXP1.check_params(params, IMAGE)  # what tp.init declares fits

    narrow_task = M.ClassificationTaskModule(width=1 / 16, input_size=IMAGE)
    narrow = Transplant(M.CategoryModule(width=1 / 16), Adapter(4), narrow_task, narrow_task)
    narrow_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
        functools.partial(narrow.init, image_size=IMAGE), jax.random.key(0)))
    with pytest.raises(ValueError) as error:
        EXP1.check_params(narrow_params, IMAGE)
    message = str(error.value)
    for key, have, want in [
            ("['category_module']['conv1_1']['kernel']", (3, 3, 3, 4), (3, 3, 3, 8)),
            ("['adapter']['adapter_conv1']['kernel']", (3, 3, 4, 4), (3, 3, 8, 8)),
            ("['teacher_task_module']['fc8']['kernel']", (1, 1, 256, 1), (1, 1, 512, 1))]:
        assert f"{key} has shape {have}, expected {want}" in message, key
    # fc8's bias has one output at any width: it is not listed.
    assert "['student_task_module']['fc8']['bias']" not in message

    broken = {**params, "adapter": {"adapter_conv2": params["adapter"]["adapter_conv1"]}}
    with pytest.raises(ValueError, match=r"(?s)missing \['adapter'\]\['adapter_conv1'\]"
                                         r"\['bias'\].*unexpected \['adapter'\]"
                                         r"\['adapter_conv2'\]\['bias'\]"):
        EXP1.check_params(broken, IMAGE)


def test_split_params_names_the_missing_pieces():
    adapter, frozen = split_params(exp1().params)
    assert sorted(frozen) == ["category_module", "student_task_module", "teacher_task_module"]
    assert adapter is exp1().params["adapter"]
    with pytest.raises(ValueError, match=r"lack \['teacher_task_module'\]"):
        split_params({k: v for k, v in exp1().params.items() if k != "teacher_task_module"})


# ================================================================= scalars α, β, λ


def constant_maps(values, shape=(2, 2, 1)):
    """One map per value, filled with it: ``‖map‖_F = |value| · sqrt(prod(shape))``."""
    return jnp.stack([jnp.full(shape, v, jnp.float32) for v in values])


def test_beta_is_the_ratio_of_mean_frobenius_norms():
    # 2×2×1 maps: ‖c‖_F = 2|c|. Source norms 2, 4 (mean 3); target norms 1, 2 (mean 1.5).
    source, target = constant_maps([1.0, -2.0]), constant_maps([0.5, 1.0])
    np.testing.assert_allclose(O.mean_frobenius_norm(source), 3.0, rtol=1e-7)
    np.testing.assert_allclose(O.estimate_beta(source, target), 2.0, rtol=1e-7)
    with pytest.raises(ValueError, match="target features are all zero"):
        O.estimate_beta(source, jnp.zeros_like(target))


def test_alpha_and_lambda_have_their_closed_forms_on_tiny_banks():
    # Teacher norms 2, 6 (mean 4, mean square 20); student norms 1, 1 (mean 1).
    cache = O.ChainCache(student_task_gradient=constant_maps([0.5, -0.5]),
                         teacher_gradient=constant_maps([1.0, 3.0]),
                         mask_keys=jax.random.split(jax.random.key(0), 2))
    # α = E‖D'_T‖ / (β·E‖G_h‖): the student's chain includes the re-scaling layer.
    scalars = O.compute_scalars(cache, beta=1.6, lambda0=10.0)
    np.testing.assert_allclose(scalars.alpha, 4.0 / 1.6, rtol=1e-6)
    np.testing.assert_allclose(scalars.lam, 10.0 / 20.0, rtol=1e-6)
    assert scalars.as_dict() == pytest.approx({"alpha": 2.5, "beta": 1.6, "lambda": 0.5})


def test_alpha_is_one_when_the_student_is_the_teacher():
    assert float(exp1().scalars.alpha) == 1.0
    cache = transfer().cache
    expected = (np.linalg.norm(np.asarray(cache.teacher_gradient).reshape(NUM_DRAWS, -1), axis=1)
                .mean() / np.linalg.norm(np.asarray(cache.student_task_gradient)
                                         .reshape(NUM_DRAWS, -1), axis=1).mean()) / BETA
    np.testing.assert_allclose(transfer().scalars.alpha, expected, rtol=1e-5)
    assert abs(float(transfer().scalars.alpha) - 1.0) > 0.1


def test_a_shared_task_module_runs_its_chain_once_with_the_same_cache():
    setup = exp1()
    assert O.shares_task_module(EXP1, setup.frozen)
    copied = {**setup.frozen, "student_task_module": jax.tree.map(
        jnp.array, setup.frozen["teacher_task_module"])}  # equal values, other buffers
    assert not O.shares_task_module(EXP1, copied)
    assert not O.shares_task_module(EXP1, transfer().frozen)
    separate = O.build_chain_cache(EXP1, copied, jax.random.key(1), NUM_DRAWS, setup.shape,
                                   chunk=CHUNK)
    for field in ("student_task_gradient", "teacher_gradient"):
        np.testing.assert_allclose(np.asarray(getattr(setup.cache, field)),
                                   np.asarray(getattr(separate, field)), rtol=1e-6, atol=1e-12,
                                   err_msg=field)
    np.testing.assert_array_equal(jax.random.key_data(setup.cache.mask_keys),
                                  jax.random.key_data(separate.mask_keys))


@pytest.mark.parametrize("setup", ["exp1", "transfer", "segmentation"])
def test_distill_term_of_a_zero_adapter_is_lambda0(setup):
    # λ = λ0 / E‖D'_T‖²: with D'_S = 0 the term is λ·E‖D'_T‖² = λ0 exactly.
    s = {"exp1": exp1, "transfer": transfer, "segmentation": segmentation}[setup]()
    tp = s.tp if setup == "segmentation" else EXP1
    adapter = zero_kernels(s.adapter if setup == "segmentation" else exp1().adapter)
    lambda0 = 1.0 if setup == "segmentation" else LAMBDA0
    np.testing.assert_allclose(O.back_distill_term(tp, adapter, s.cache, s.scalars), lambda0,
                               rtol=1e-5)


# ================================================================= G_y' draws


def test_output_gradients_are_seeded_uniform_in_minus_one_one():
    shape = exp1().shape
    g, keys = O.sample_output_gradients(jax.random.key(4), 64, shape)
    chex.assert_shape(g, (64, *shape))
    chex.assert_type(g, jnp.float32)
    assert keys.shape == (64,) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    values = np.asarray(g).ravel()  # 3136 values
    assert values.min() >= -1.0 and values.max() <= 1.0
    assert values.min() < -0.99 and values.max() > 0.99
    assert abs(values.mean()) < 0.05  # std of the mean: 0.010
    assert abs(values.var() - 1 / 3) < 0.03
    # Each tenth of [-1, 1] holds ~10 % of the values.
    counts = np.histogram(values, bins=10, range=(-1, 1))[0] / values.size
    assert np.all(np.abs(counts - 0.1) < 0.03), counts
    again, again_keys = O.sample_output_gradients(jax.random.key(4), 64, shape)
    np.testing.assert_array_equal(g, again)
    np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(again_keys))
    other, _ = O.sample_output_gradients(jax.random.key(5), 64, shape)
    assert not np.any(np.asarray(other) == np.asarray(g))


def test_output_gradient_draw_depends_only_on_its_index():
    key, shape = jax.random.key(4), exp1().shape
    g, keys = O.sample_output_gradients(key, 16, shape)
    part, part_keys = O.sample_output_gradients(key, 8, shape, first_index=4)
    np.testing.assert_array_equal(part, g[4:12])
    np.testing.assert_array_equal(jax.random.key_data(part_keys),
                                  jax.random.key_data(keys[4:12]))
    # Draws are distinct, and raw_draws are the draws build_chain_cache caches.
    assert not np.array_equal(g[0], g[1])
    raw = raw_draws(key, 16, shape)
    np.testing.assert_array_equal(raw.output_gradients, g)


def test_output_gradient_shape_is_the_score_map_or_the_output():
    assert O.output_gradient_shape(EXP1, image_size=IMAGE) == (7, 7, 1)
    assert O.output_gradient_shape(EXP1, image_size=IMAGE, score_size=3) == (3, 3, 1)
    three = M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE, num_outputs=3)
    tp = Transplant(CATEGORY, Adapter(CHANNELS), three, three)
    assert O.output_gradient_shape(tp, image_size=IMAGE) == (7, 7, 3)
    assert O.output_gradient_shape(segmentation().tp, image_size=IMAGE) == (IMAGE, IMAGE, 2)
    assert O.output_gradient_shape(segmentation().tp, image_size=64) == (64, 64, 2)


def test_chain_cache_holds_enlarged_maps_at_the_adapter():
    cache = exp1().cache
    side = CLASSIFICATION.enlarged_gradient_shape(7)
    assert side == (112, 112)
    chex.assert_shape([cache.student_task_gradient, cache.teacher_gradient],
                      (NUM_DRAWS, *side, CHANNELS))
    assert cache.num_draws == NUM_DRAWS and cache.mask_keys.shape == (NUM_DRAWS,)
    # g_S = g_T: the student's G_h is the teacher's D'_T, draw by draw.
    np.testing.assert_array_equal(cache.student_task_gradient, cache.teacher_gradient)
    # fc6 is 1×1 at 32² input, so the x_rand masks of relu7, relu6 and relu5_3 can
    # block a whole draw (about 1 in 3 here; fc6 is 7×7 in the paper's VGG-16).
    nonzero = np.asarray(jnp.abs(cache.teacher_gradient).max(axis=(1, 2, 3))) > 0
    assert nonzero.sum() >= NUM_DRAWS // 2, nonzero


# ================================================================= Exp. 1: known answer


@pytest.mark.parametrize("tp", [EXP1, EXP1_1X1, EXP1_DEEP], ids=["3x3", "1x1", "3conv"])
def test_ideal_adapter_has_zero_back_distill_loss(tp):
    s = exp1()
    loss = O.back_distill_term(tp, tp.adapter.ideal_params(EXP1_BETA), s.cache, s.scalars)
    assert float(loss) < 1e-10 * LAMBDA0, float(loss)
    # Control: without undoing the reorder the loss is of order λ0.
    no_reorder = Adapter(CHANNELS, tp.adapter.num_convs, tp.adapter.kernel_size)
    loss = O.back_distill_term(tp, no_reorder.ideal_params(EXP1_BETA), s.cache, s.scalars)
    assert float(loss) > 0.5 * LAMBDA0


@pytest.mark.parametrize("tp", [EXP1, EXP1_DEEP], ids=["1conv", "3conv"])
def test_ideal_adapter_reproduces_the_teachers_outputs(tp):
    s = exp1()
    x = tp.features(s.params, images(5))
    # pool1 of a ReLU net: x >= 0, with exact zeros that the adapter's ReLU must pass.
    assert float(x.min()) == 0.0 and float(jnp.mean(x == 0)) > 0.01
    ideal = tp.adapter.ideal_params(EXP1_BETA)
    h, _ = tp.adapter.apply({"params": ideal}, x, beta=EXP1_BETA)
    assert_close(h, x, IDENTITY_TOL)
    y_student = tp.student_output(ideal, s.frozen, x, EXP1_BETA)
    y_teacher = tp.teacher_output(s.frozen, x)
    chex.assert_shape(y_teacher, (8, 1, 1, 1))
    assert float(jnp.std(y_teacher)) > 0  # the outputs tell the images apart
    assert_close(y_student, y_teacher, IDENTITY_TOL)


def test_segmentation_transplant_caches_adapter_sized_maps_and_its_ideal_adapter_is_exact():
    s = segmentation()
    assert s.shape == (IMAGE, IMAGE, 2)
    chex.assert_shape([s.cache.student_task_gradient, s.cache.teacher_gradient],
                      (CHUNK, IMAGE // 2, IMAGE // 2, CHANNELS))
    np.testing.assert_allclose(s.scalars.alpha, 1.0, rtol=1e-6)  # D'_T = c·G_h, β = c
    ideal = s.tp.adapter.ideal_params(1.0)  # R⁻¹: undo the reorder, keep the scale c
    assert float(O.back_distill_term(s.tp, ideal, s.cache, s.scalars)) < 1e-10
    assert float(O.back_distill_term(s.tp, s.adapter, s.cache, s.scalars)) > 0.1
    x = s.tp.features(s.frozen, images(6, batch=2))
    y_teacher = s.tp.teacher_output(s.frozen, x)
    chex.assert_shape(y_teacher, (2, IMAGE, IMAGE, 2))
    assert_close(s.tp.student_output(ideal, s.frozen, x, SEG_SCALE), y_teacher, IDENTITY_TOL)


# ================================================================= closed form


SCALE = 4.0


@functools.cache
def scale_toy():
    """``g_T(x) = g_S(c·x)`` (c = 4): the student task module sees features c times smaller
    than the teacher's, so β = c and the functional match is the adapter ``R⁻¹`` after β."""
    setup = exp1()
    student = setup.frozen["teacher_task_module"]
    frozen = {**setup.frozen, "student_task_module": student,
              "teacher_task_module": scale_first_conv(student, SCALE)}
    cache = O.build_chain_cache(EXP1_1X1, frozen, jax.random.key(1), NUM_DRAWS, setup.shape,
                                chunk=CHUNK)
    return types.SimpleNamespace(frozen=frozen, cache=cache, params=setup.params,
                                 scalars=O.compute_scalars(cache, SCALE, LAMBDA0))


def test_scale_toy_functional_match_has_zero_loss_and_the_closed_form_recovers_it():
    s, tp = scale_toy(), EXP1_1X1
    # α over a student chain that includes the re-scaling layer: E‖c·G_h‖ / (β·E‖G_h‖) = 1.
    np.testing.assert_allclose(s.scalars.alpha, 1.0, rtol=1e-5)
    match = tp.adapter.ideal_params(1.0)  # undo the reorder; β supplies the scale c
    assert float(O.back_distill_term(tp, match, s.cache, s.scalars)) < 1e-10 * LAMBDA0
    # Counting β twice (α = E‖D'_T‖ / E‖G_h‖ = c) would make the functional match costly
    # and move the optimum to R⁻¹/c, whose outputs are g_S(x), not g_T(x) = g_S(c·x).
    twice = s.scalars.replace(alpha=jnp.float32(SCALE))
    assert float(O.back_distill_term(tp, match, s.cache, twice)) > 0.5 * LAMBDA0
    solution = C.solve_single_conv_adapter(tp, s.cache, s.scalars, num_draws=4)
    np.testing.assert_allclose(solution["adapter_conv1"]["kernel"],
                               match["adapter_conv1"]["kernel"], rtol=0, atol=SOLVE_TOL)
    x = tp.features(s.params, images(5))
    assert_close(tp.student_output(solution, s.frozen, x, SCALE),
                 tp.teacher_output(s.frozen, x), 10 * IDENTITY_TOL)




@pytest.mark.parametrize("kernel_size, reorder_seed",
                         [(3, REORDER_SEED), (1, REORDER_SEED), (1, None)])
def test_closed_form_recovers_the_ideal_adapter_from_four_draws(kernel_size, reorder_seed):
    # Of draws 0-3, x_rand blocks 0 and 3: two draws give 2·112² equations per input
    # channel for k²M <= 72 unknowns.
    tp = transplant(kernel_size, reorder_seed=reorder_seed)
    s = exp1()
    solution = C.solve_single_conv_adapter(tp, s.cache, s.scalars, num_draws=4)
    ideal = tp.adapter.ideal_params(EXP1_BETA)
    chex.assert_trees_all_equal_shapes_and_dtypes(solution, ideal)
    np.testing.assert_allclose(solution["adapter_conv1"]["kernel"],
                               ideal["adapter_conv1"]["kernel"], rtol=0, atol=SOLVE_TOL / EXP1_BETA)
    np.testing.assert_array_equal(solution["adapter_conv1"]["bias"], 0.0)
    assert float(O.back_distill_term(tp, solution, s.cache, s.scalars)) < 1e-8 * LAMBDA0


def adapter_with_kernel(kernel):
    return {"adapter_conv1": {"kernel": kernel, "bias": jnp.zeros((CHANNELS,), jnp.float32)}}


def test_closed_form_is_the_least_squares_solution_of_the_design_matrix():
    # Independent computation: the design matrix is the Jacobian of α·D'_S w.r.t. the
    # kernel (D'_S is linear in it), solved by numpy's SVD-based lstsq in float64.
    s, n = transfer(), 4
    draws = s.cache.take(jnp.arange(n))

    def alpha_d_student(kernel):
        return s.scalars.alpha * EXP1_1X1.adapter_gradient(
            adapter_with_kernel(kernel), draws.student_task_gradient, s.scalars.beta,
            draws.mask_keys)

    design = jax.jacfwd(alpha_d_student)(jnp.zeros((1, 1, CHANNELS, CHANNELS)))
    design = np.asarray(design, np.float64).reshape(-1, CHANNELS * CHANNELS)
    target = np.asarray(draws.teacher_gradient, np.float64).ravel()
    expected, *_ = np.linalg.lstsq(design, target, rcond=None)
    solution = C.solve_single_conv_adapter(EXP1_1X1, s.cache, s.scalars, num_draws=n)
    assert_close(solution["adapter_conv1"]["kernel"],
                 expected.reshape(1, 1, CHANNELS, CHANNELS), SOLVE_TOL)


def test_closed_form_3x3_is_a_stationary_point_and_a_minimum():
    # The loss is a convex quadratic in the kernel: zero gradient means the optimum.
    s = transfer()
    solution = C.solve_single_conv_adapter(EXP1, s.cache, s.scalars)

    def loss(kernel):
        return O.back_distill_term(EXP1, adapter_with_kernel(kernel), s.cache, s.scalars)

    kernel = solution["adapter_conv1"]["kernel"]
    scale = float(jnp.abs(jax.grad(loss)(jnp.zeros_like(kernel))).max())
    assert float(jnp.abs(jax.grad(loss)(kernel)).max()) < 1e-4 * scale
    best = float(loss(kernel))
    assert best < 0.9 * LAMBDA0  # the student is related to the teacher
    rng = np.random.default_rng(0)
    for _ in range(3):
        step = jnp.asarray(rng.normal(0, 1e-2 * float(jnp.abs(kernel).max()), kernel.shape),
                           jnp.float32)
        assert float(loss(kernel + step)) > best


def test_closed_form_matches_the_optimum_adam_converges_to():
    s = transfer()
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, 300))
    step = make_train_step(EXP1_1X1, "back-distill", optimizer)
    start = adapter_with_kernel(jnp.zeros((1, 1, CHANNELS, CHANNELS)))
    state, history = train_adapter(step, create_train_state(start, optimizer), s.frozen,
                                   s.scalars, num_steps=300, draws=s.cache,
                                   draws_per_step=NUM_DRAWS, progress=False, log_every=50)
    assert history[0]["loss"] == pytest.approx(LAMBDA0, rel=1e-5)
    solution = C.solve_single_conv_adapter(EXP1_1X1, s.cache, s.scalars)
    best = float(O.back_distill_term(EXP1_1X1, solution, s.cache, s.scalars))
    adam = float(O.back_distill_term(EXP1_1X1, state.params, s.cache, s.scalars))
    assert best < 0.99 * LAMBDA0
    assert best <= adam * (1 + ADAM_LOSS_TOL)
    assert adam <= best * (1 + ADAM_LOSS_TOL)
    assert_close(state.params["adapter_conv1"]["kernel"], solution["adapter_conv1"]["kernel"],
                 ADAM_KERNEL_TOL)


def test_closed_form_num_draws_uses_the_first_draws_only():
    s = transfer()
    first = C.solve_single_conv_adapter(EXP1_1X1, s.cache, s.scalars, num_draws=4)
    alone = C.solve_single_conv_adapter(EXP1_1X1, s.cache.take(jnp.arange(4)), s.scalars)
    assert_close(first, alone, 1e-6)
    every = C.solve_single_conv_adapter(EXP1_1X1, s.cache, s.scalars)
    assert float(jnp.abs(every["adapter_conv1"]["kernel"]
                         - first["adapter_conv1"]["kernel"]).max()) > 1e-3
    for bad in (0, NUM_DRAWS + 1):
        with pytest.raises(ValueError, match=r"num_draws must be in \[1, 16\]"):
            C.solve_single_conv_adapter(EXP1_1X1, s.cache, s.scalars, num_draws=bad)


def test_closed_form_refuses_multi_conv_and_non_identity_adapters():
    s = exp1()
    with pytest.raises(ValueError, match="single-conv adapters, this one has 3"):
        C.solve_single_conv_adapter(EXP1_DEEP, s.cache, s.scalars)
    masked = transplant(adapter_dummy_relu="random_mask")
    with pytest.raises(ValueError, match="identity dummy"):
        C.solve_single_conv_adapter(masked, s.cache, s.scalars)


def test_warm_start_embeds_the_single_conv_optimum_in_a_deep_adapter():
    # Independent check: the 3-conv warm start and the 1-conv closed form agree on the
    # forward map (real ReLUs), on D'_S and on the zero-sample loss.
    s = transfer()
    deep = C.warm_start_adapter(EXP1_DEEP, s.cache, s.scalars)
    single = C.solve_single_conv_adapter(EXP1, s.cache, s.scalars)
    assert sorted(deep) == ["adapter_conv1", "adapter_conv2", "adapter_conv3"]
    chex.assert_trees_all_equal(deep["adapter_conv1"], single["adapter_conv1"])
    x = EXP1.features(s.frozen, images(7, batch=2))
    assert_close(EXP1_DEEP.student_output(deep, s.frozen, x, s.scalars.beta),
                 EXP1.student_output(single, s.frozen, x, s.scalars.beta), 1e-5)
    g = s.cache.student_task_gradient[:2]
    assert_close(EXP1_DEEP.adapter_gradient(deep, g, s.scalars.beta, s.cache.mask_keys[:2]),
                 EXP1.adapter_gradient(single, g, s.scalars.beta, s.cache.mask_keys[:2]), 1e-6)
    assert float(O.back_distill_term(EXP1_DEEP, deep, s.cache, s.scalars)) == pytest.approx(
        float(O.back_distill_term(EXP1, single, s.cache, s.scalars)), rel=1e-5)
    # For a single-conv adapter the warm start is the closed form itself.
    chex.assert_trees_all_equal(C.warm_start_adapter(EXP1, s.cache, s.scalars), single)


# ================================================================= gradient of the loss


def library_back_distill(adapter_params, draws, scalars):
    return O.back_distill_term(TRAINED, adapter_params, draws, scalars)


class BackDistillGradientTest(chex.TestCase):
    """∂Loss/∂θ_h (back-back-propagation) against an independent naive implementation."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_equals_grad_of_the_naive_full_chain(self):
        s = transfer()
        loss, grads = self.variant(jax.value_and_grad(library_back_distill))(
            training().adapter, s.cache.take(DRAW_INDEX), s.scalars)
        naive_loss, naive_grads = naive_reference()
        np.testing.assert_allclose(loss, naive_loss, rtol=GRAD_TOL)
        assert float(optax.tree.norm(naive_grads)) > 0
        assert_close(grads, naive_grads, GRAD_TOL)
        # Biases never enter D': their gradient is exactly 0.
        for layer in grads.values():
            np.testing.assert_array_equal(layer["bias"], 0.0)

    def test_gradient_matches_central_finite_differences_in_float64(self):
        s, adapter = transfer(), training().adapter  # built in float32
        with jax.enable_x64(True):
            def to64(tree):
                return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                                    if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

            params = to64(adapter)
            # Two draws that reach x (draws 0, 3, 11, 14, 15 are blocked by x_rand).
            draws, scalars = to64(s.cache.take(jnp.array([10, 5]))), to64(s.scalars)
            loss = jax.jit(lambda p: library_back_distill(p, draws, scalars))
            grads = jax.grad(library_back_distill)(params, draws, scalars)
            chex.assert_type(jax.tree.leaves(grads), jnp.float64)
            rng = np.random.default_rng(0)
            for _ in range(3):
                direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
                expected = tree_dot(grads, direction)
                central = central_difference(loss, params, direction, FD_EPS)
                assert abs(central - expected) <= FD_TOL * abs(expected), (central, expected)


def tree_dot(a, b) -> float:
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def central_difference(fn, params, direction, eps: float) -> float:
    """``(fn(p + eps·v) − fn(p − eps·v)) / 2 eps``."""
    def at(sign):
        return fn(jax.tree.map(lambda p, v: p + sign * eps * v, params, direction))
    return float(at(1.0) - at(-1.0)) / (2 * eps)


# ================================================================= train steps


def test_cached_and_recomputed_chains_give_identical_losses_gradients_and_params():
    setup, s = training(), transfer()
    raw = raw_draws(jax.random.key(1), NUM_DRAWS, s.shape)
    cached = fresh_state()
    recomputed = create_train_state(setup.adapter, setup.naive_optimizer)
    indices = [DRAW_INDEX, DRAW_INDEX[::-1] + 0, (DRAW_INDEX + 5) % NUM_DRAWS]
    for i, index in enumerate(indices):
        cached, m_cached = setup.step(cached, s.frozen, s.scalars, None, s.cache, None, index)
        recomputed, m_recomputed = setup.naive_step(recomputed, s.frozen, s.scalars, None, raw,
                                                    None, index)
        assert set(m_cached) == {"loss", "back_distill", "grad_norm", "param_norm", "finite"}
        assert bool(m_cached["finite"]) and bool(m_recomputed["finite"])
        m_cached.pop("finite"), m_recomputed.pop("finite")
        assert_close(m_cached, m_recomputed, 1e-6)
        assert_close(recorded_gradient(cached), recorded_gradient(recomputed), 1e-6)
        if i == 0:  # the step's gradient is the naive full-chain gradient
            naive_loss, naive_grads = naive_reference()
            np.testing.assert_allclose(m_cached["loss"], naive_loss, rtol=GRAD_TOL)
            assert_close(recorded_gradient(cached), naive_grads, GRAD_TOL)
    assert int(cached.step) == int(recomputed.step) == len(indices)
    assert_close(cached.params, recomputed.params, 1e-6)
    assert not np.allclose(cached.params["adapter_conv1"]["kernel"],
                           setup.adapter["adapter_conv1"]["kernel"])


def test_train_step_does_not_retrace_across_calls():
    setup = training()
    for s in (exp1(), transfer(), exp1()):
        state = fresh_state()
        for index in (DRAW_INDEX, DRAW_INDEX[::-1] + 0):
            state, _ = setup.step(state, s.frozen, s.scalars, None, s.cache, None, index)
    # Every use of the cached step in this module (other tests included) shares one trace.
    assert len(setup.traces["cached"]) == 1


@functools.cache
def padded_samples():
    """Five labelled images of the Exp.-1 net padded to a batch of eight (masked rows)."""
    s = exp1()
    x = TRAINED.features(s.params, images(6, batch=5))
    return O.make_transfer_data(TRAINED, s.frozen, x, jnp.array([0, 1, 1, 0, 1]),
                                key=jax.random.key(4), pad_to=8)


def test_a_second_cell_of_equal_shapes_does_not_retrace(monkeypatch):
    # Two cells (runs) on two problems of one shape, labelled and zero-sample: the
    # step is traced once for each kind, however many steps and cells run.
    chex.clear_trace_counter()
    monkeypatch.setattr("nettransplant.transplant.step.objective_terms",
                        chex.assert_max_traces(O.objective_terms, n=2))
    optimizer = optax.adam(1e-2)
    step = make_train_step(TRAINED, "back-distill", optimizer)
    for s in (exp1(), transfer()):
        for data in (padded_samples(), None):
            train_adapter(step, create_train_state(training().adapter, optimizer), s.frozen,
                          s.scalars, num_steps=3, data=data, num_samples=5, batch_size=8,
                          draws=s.cache, progress=False)


def test_fewer_samples_than_a_batch_train_on_the_real_rows_as_the_padded_batch_does():
    # train_adapter drops the masked padding rows of a batch (they weigh 0 in every
    # loss); the run equals steps on the padded batch. SGD: parameters compare like
    # gradients (float32 sums in another order).
    s, data, optimizer = exp1(), padded_samples(), optax.sgd(0.1)
    step = make_train_step(TRAINED, "back-distill", optimizer)
    state, history = train_adapter(
        step, create_train_state(training().adapter, optimizer), s.frozen, s.scalars,
        num_steps=3, data=data, num_samples=5, batch_size=8, draws=s.cache, seed=2,
        progress=False)
    padded = create_train_state(training().adapter, optimizer)
    draws = IndexStream(NUM_DRAWS, 8, seed=3)
    for i in range(3):
        padded, metrics = step(padded, s.frozen, s.scalars, data, s.cache, jnp.arange(8),
                               jnp.asarray(draws.next()))
        np.testing.assert_allclose(history[i]["loss"], metrics["loss"], rtol=1e-6)
        np.testing.assert_allclose(history[i]["task"], metrics["task"], rtol=1e-6)
    assert history[0]["task"] > 0 and int(state.step) == 3
    assert_close(state.params, padded.params, 1e-6)


def full_bank_loss(params, setup) -> float:
    return float(O.back_distill_term(TRAINED, params, setup.cache, setup.scalars))


def test_back_distill_training_from_a_random_adapter_decreases_the_loss():
    s = exp1()  # Exp. 1, zero samples: the distillation term alone
    before = full_bank_loss(training().adapter, s)
    state, history = train_adapter(training().step, fresh_state(), s.frozen, s.scalars,
                                   num_steps=30, draws=s.cache, progress=False)
    assert len(history) == 30 and int(state.step) == 30
    after = full_bank_loss(state.params, s)
    assert after < 0.3 * before, (before, after)


def test_same_seed_gives_bit_identical_params():
    s = exp1()

    def run(seed):
        return train_adapter(training().step, fresh_state(), s.frozen, s.scalars, num_steps=4,
                             draws=s.cache, seed=seed, progress=False)[0].params

    first = run(0)
    assert_trees_equal(first, run(0))
    other = run(1)  # another draw order
    assert not np.array_equal(first["adapter_conv1"]["kernel"], other["adapter_conv1"]["kernel"])


def snapshot(state):
    return jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("broken", ["nan lambda", "inf params"])
def test_non_finite_loss_leaves_the_state_unchanged(broken):
    setup, s = training(), exp1()
    scalars = s.scalars
    if broken == "nan lambda":
        state, _ = setup.step(fresh_state(), s.frozen, scalars, None, s.cache, None, DRAW_INDEX)
        assert int(state.step) == 1  # one good update first: a non-trivial optimizer state
        scalars = scalars.replace(lam=jnp.full_like(scalars.lam, jnp.nan))
    else:
        state = fresh_state(params=jax.tree.map(
            lambda a: a.at[(0,) * a.ndim].set(jnp.inf), setup.adapter))
    before = snapshot(state)
    after, metrics = setup.step(state, s.frozen, scalars, None, s.cache, None, DRAW_INDEX)
    assert not bool(metrics["finite"])
    assert not math.isfinite(float(metrics["loss"]))
    assert_trees_equal(snapshot(after), before)


def test_train_adapter_raises_non_finite_error_carrying_the_last_good_state():
    # A huge learning rate: the first update is finite (kernels ~1e30), the second
    # step's loss overflows.
    setup, s = training(), exp1()

    def huge_lr_state():
        return with_learning_rate(fresh_state(), 1e30)

    with pytest.raises(NonFiniteError, match="non-finite .*loss.* at step 1") as error:
        train_adapter(setup.step, huge_lr_state(), s.frozen, s.scalars, num_steps=5,
                      draws=s.cache, progress=False)
    last_good = error.value.state
    assert int(last_good.step) == 1
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(last_good.params))
    assert float(jnp.abs(last_good.params["adapter_conv1"]["kernel"]).max()) > 1e29
    assert not math.isfinite(error.value.metrics["loss"])
    # It is exactly the state after the one good step.
    replay, _ = train_adapter(setup.step, huge_lr_state(), s.frozen, s.scalars, num_steps=1,
                              draws=s.cache, progress=False)
    assert_trees_equal(snapshot(last_good), snapshot(replay))


# ================================================================= the four objectives


@functools.cache
def transfer_data():
    """Eight labelled images of the Exp.-1 net, features shifted to be strictly positive.

    The real Jacobian of the adapter's ReLU is 0 where ``x == 0`` (pool1 outputs exact
    zeros), so only for ``x > 0`` is the ideal adapter's input Jacobian the teacher's.
    """
    s = exp1()
    x = TRAINED.features(s.params, images(5)) + 0.05
    return O.make_transfer_data(TRAINED, s.frozen, x, jnp.array([0, 1] * 4),
                                key=jax.random.key(9))


@pytest.mark.parametrize("method, with_batch, terms", [
    ("direct-learn", True, {"task"}),
    ("distill", True, {"distill"}),
    ("back-distill", True, {"back_distill", "task"}),
    ("back-distill", False, {"back_distill"}),
    ("jacobian", True, {"task", "output_matching", "jacobian"}),
])
def test_each_method_has_its_loss_terms(method, with_batch, terms):
    s = exp1()
    batch = transfer_data() if with_batch else None
    draws = s.cache.take(DRAW_INDEX) if method == "back-distill" else None
    values = O.objective_terms(method, TRAINED, training().adapter, s.frozen, s.scalars, batch,
                               draws)
    assert set(values) == terms
    for name, value in values.items():
        assert value.shape == () and math.isfinite(float(value)) and float(value) > 0, name


def test_back_distill_step_with_samples_adds_the_task_loss():
    s, data = exp1(), transfer_data()
    optimizer = optax.adam(1e-2)
    step = make_train_step(TRAINED, "back-distill", optimizer)
    expected = O.objective_terms("back-distill", TRAINED, training().adapter, s.frozen,
                                 s.scalars, data.take(jnp.arange(4)), s.cache.take(DRAW_INDEX))
    state, metrics = step(create_train_state(training().adapter, optimizer), s.frozen,
                          s.scalars, data, s.cache, jnp.arange(4), DRAW_INDEX)
    assert bool(metrics["finite"]) and int(state.step) == 1
    for name in ("task", "back_distill"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["task"] + metrics["back_distill"],
                               rtol=1e-6)


def test_unknown_method_and_missing_inputs_are_value_errors():
    s = exp1()
    args = (TRAINED, training().adapter, s.frozen, s.scalars)
    with pytest.raises(ValueError, match="unknown method 'backdistill'; choose one of"):
        O.objective_terms("backdistill", *args, transfer_data(), None)
    with pytest.raises(ValueError, match="back-distill needs cached pseudo-gradient draws"):
        O.objective_terms("back-distill", *args, None, None)
    with pytest.raises(ValueError, match="distill needs a batch of images"):
        O.objective_terms("distill", *args, None, None)


def test_jacobian_term_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    s, data = exp1(), transfer_data()
    assert float(data.features.min()) > 0

    def jacobian(adapter_params):
        return float(O.jacobian_term(TRAINED, adapter_params, s.frozen, data, s.scalars.beta))

    assert jacobian(TRAINED.adapter.ideal_params(EXP1_BETA)) < 1e-10
    assert jacobian(training().adapter) > 0.1
    no_reorder = Adapter(CHANNELS, 3, 3)
    assert jacobian(no_reorder.ideal_params(EXP1_BETA)) > 0.1
