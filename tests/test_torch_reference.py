"""The PyTorch reference steps (what a PyTorch user would write) agree with the library's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nettransplant.benchmarks import torch_reference as tr
from nettransplant.core.adapter import Adapter
from nettransplant.core.modules import CategoryModule, ClassificationTaskModule, category_channels
from nettransplant.training.loop import create_train_state
from nettransplant.transplant import objectives
from nettransplant.transplant.step import make_train_step, raw_draws
from nettransplant.transplant.wiring import Transplant, split_params

pytestmark = pytest.mark.torch

# S = 3: with S = 2 the random masks of so small maps can block every path (D'_T = 0).
WIDTH, IMAGE, SCORE, BATCH, DRAWS, LR = 0.0625, 32, 3, 4, 2, 1e-2


def random_params(transplant):
    """He-normal kernels and non-zero biases (``transplant.init`` would compile for seconds)."""
    shapes = jax.eval_shape(lambda k: transplant.init(k, IMAGE), jax.random.key(0))
    rng = np.random.default_rng(0)

    def leaf(s):
        std = np.sqrt(2 / np.prod(s.shape[:3])) if len(s.shape) == 4 else 0.1
        return jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32)

    return jax.tree.map(leaf, shapes)


@pytest.fixture(scope="module")
def problem():
    """Exp. 1's problem, tiny, with g_S ≠ g_T, β ≠ 1, biases and a 2-conv adapter (a ReLU
    inside)."""
    task_module = ClassificationTaskModule(width=WIDTH, input_size=IMAGE)
    transplant = Transplant(
        category_module=CategoryModule(width=WIDTH),
        adapter=Adapter(category_channels(WIDTH), 2, 3, reorder_seed=0),
        student_task_module=task_module, teacher_task_module=task_module,
        task_dummy_relu="random_mask", adapter_dummy_relu="identity")
    params = random_params(transplant)
    adapter_params, frozen = split_params(params)
    key = jax.random.key(1)
    shape = objectives.output_gradient_shape(transplant, image_size=IMAGE, score_size=SCORE)
    cache = objectives.build_chain_cache(transplant, frozen, key, DRAWS, shape, chunk=DRAWS)
    raw = raw_draws(key, DRAWS, shape)
    scalars = objectives.compute_scalars(cache, 0.7, 10.0)
    images = jax.random.uniform(jax.random.key(2), (BATCH, IMAGE, IMAGE, 3))
    labels = jnp.arange(BATCH) % 2
    data = objectives.make_transfer_data(transplant, frozen, transplant.features(params, images),
                                         labels, key=key)
    return dict(transplant=transplant, params=params, adapter_params=adapter_params,
                frozen=frozen, cache=cache, raw=raw, scalars=scalars, images=images,
                labels=labels, data=data)


def _close(actual, expected, what, rtol=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    assert np.max(np.abs(actual - expected)) <= rtol * scale, (
        f"{what}: max |Δ| {np.max(np.abs(actual - expected)):.3g} vs scale {scale:.3g}")


def test_the_torch_modules_compute_the_jax_features_outputs_and_teacher_jacobians(problem):
    p = problem
    torch_problem = tr.from_jax(p["transplant"], p["params"], p["scalars"], score_size=SCORE)
    data = tr.make_transfer_data(torch_problem, np.asarray(p["images"]), p["labels"],
                                 np.asarray(p["data"].jacobian_projection))
    for field in ("features", "teacher_outputs", "teacher_jacobian"):
        _close(data.__dict__[field].numpy().transpose(0, 2, 3, 1),
               getattr(p["data"], field), field)


@pytest.mark.parametrize("method, with_batch", [
    ("direct-learn", True), ("distill", True), ("back-distill", False),
    ("back-distill", True), ("jacobian", True)])
def test_one_step_matches_the_library_step(problem, method, with_batch):
    """Loss, each term, the adapter gradient and the Adam update of one step."""
    p = problem
    uses_draws = method == "back-distill"
    batch_index, draw_index = jnp.arange(BATCH), jnp.arange(DRAWS)
    data = p["data"] if with_batch else None
    cache = p["cache"] if uses_draws else None

    optimizer = optax.adam(LR)
    step = make_train_step(p["transplant"], method, optimizer)
    state, metrics = step(create_train_state(p["adapter_params"], optimizer), p["frozen"],
                          p["scalars"], data, cache, batch_index if with_batch else None,
                          draw_index if uses_draws else None)
    jax_terms = {k: metrics[k] for k in ("task", "distill", "back_distill", "jacobian",
                                         "output_matching") if k in metrics}
    # After one step Adam's first moment is (1 - b1) · the gradient.
    jax_grads = jax.tree.map(lambda m: m / 0.1, state.opt_state[0].mu)

    torch_problem = tr.from_jax(p["transplant"], p["params"], p["scalars"], score_size=SCORE)
    torch_step = tr.make_train_step(torch_problem, method, tr.adam(torch_problem, LR))
    torch_data = tr.data_from_jax(p["data"]) if with_batch else None
    draws = (tr.draws_from_jax(p["transplant"], torch_problem, p["raw"].output_gradients,
                               p["raw"].mask_keys) if uses_draws else None)
    torch_metrics = torch_step(torch_data, draws, np.arange(BATCH), np.arange(DRAWS))

    assert set(torch_metrics) == {"loss", *jax_terms}
    np.testing.assert_allclose(float(torch_metrics["loss"]), float(metrics["loss"]),
                               rtol=1e-4)
    for name, value in jax_terms.items():
        np.testing.assert_allclose(float(torch_metrics[name]), float(value), rtol=1e-4,
                                   err_msg=name)
    grads = tr.adapter_grads(torch_problem)
    updated = tr.adapter_params(torch_problem)
    for conv in jax_grads:
        for leaf in ("kernel", "bias"):
            _close(grads[conv][leaf], jax_grads[conv][leaf], f"grad {conv}/{leaf}")
            # Adam's first step moves each entry by ±lr (or 0): compare with lr's scale.
            np.testing.assert_allclose(updated[conv][leaf], state.params[conv][leaf],
                                       atol=LR * 1e-3, err_msg=f"updated {conv}/{leaf}")
