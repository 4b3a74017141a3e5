"""Exp. 1 as the paper writes it: ``draws="literal"`` (``G_y' = 1``, per-element ``x_rand``).

* The literal draws' ``G_y'`` are exactly ones, in the randomised draws' shape and
  dtype and with the same mask keys.
* A per-element mask has exactly ``round(0.2·H·W·C)`` positive entries, differs
  across channels, and keeps 20 % of the channels of a 1×1 fc map (a repeated
  mask there is all-off, and every draw of a 1×1 score map is dead).
* The pseudo chains with literal draws equal ``jax.linear_transpose`` of the
  surrogate forwards with the same masks, and a ReLU's masked gradient equals
  ``G ⊙ mask`` with masks built one image at a time.
* End to end: a literal Exp.-1 problem (``g_S = g_T``, β = 1, reorder + 1-conv
  3×3 adapter) has an exact closed form, the ideal adapter ``R⁻¹``, and a few
  back-distill steps from a random adapter stay finite and lower the loss.
* An unknown value is a one-line ValueError naming the field, in the engine,
  the settings and the main job's config; the config's field changes the
  fingerprints of Exp. 1's stored cells only, and its default none at all.

Setting: VGG-16 at width 1/8 (M = 8), 32×32 images, a 3×3 enlarged G_y' (D' maps
48×48×8) to keep compiles small.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from chain_assertions import assert_relatively_close
from test_fuzz import loose_config

from nettransplant import experiments
from nettransplant.configs import silhouettes
from nettransplant.core import layers as L
from nettransplant.core import modules as M
from nettransplant.core import ops
from nettransplant.core.adapter import Adapter
from nettransplant.experiments import cells
from nettransplant.experiments.runner import Runner
from nettransplant.net import ModuleRef, TransplantSettings, build_problem
from nettransplant.transplant import objectives as O
from nettransplant.transplant import problem
from nettransplant.transplant.step import raw_draws
from nettransplant.transplant.wiring import Transplant, split_params

WIDTH = 1 / 8
IMAGE = 32
CHANNELS = M.category_channels(WIDTH)  # M = 8
SCORE_SIZE = 3
NUM_DRAWS = 8
REORDER_SEED = 3
CHAIN_TOL = 1e-5  # as tests/test_modules.py: measured bit-identical on CPU
IDENTITY_TOL = 1e-5  # as tests/test_engine.py's Exp.-1 identities

CATEGORY = M.CategoryModule(width=WIDTH)
CLASSIFICATION = M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE)  # fc6: 1×1


def literal(num_convs: int = 1, kernel_size: int = 3, **kwargs) -> Transplant:
    """Exp. 1 wiring with the literal draws: the 2nd dummy at every task ReLU."""
    return Transplant(CATEGORY, Adapter(CHANNELS, num_convs, kernel_size, REORDER_SEED),
                      CLASSIFICATION, CLASSIFICATION, task_dummy_relu="random_mask",
                      draws="literal", **kwargs)


LITERAL = literal()


def random_params(tp: Transplant, seed: int) -> dict:
    """He-normal kernels and N(0, 0.1²) biases; the student task module is the teacher's."""
    shapes = jax.eval_shape(functools.partial(tp.init, image_size=IMAGE), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            std = math.sqrt(2 / math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    params["student_task_module"] = params["teacher_task_module"]
    return params


@functools.cache
def setup():
    params = random_params(LITERAL, seed=0)
    _, frozen = split_params(params)
    return params, frozen


# ================================================================= (a) G_y' = 1


def test_literal_output_gradients_are_exactly_ones_with_the_same_mask_keys():
    shape = O.output_gradient_shape(LITERAL, image_size=IMAGE, score_size=SCORE_SIZE)
    key = jax.random.key(4)
    g, keys = O.sample_output_gradients(key, NUM_DRAWS, shape, draws="literal")
    randomised, randomised_keys = O.sample_output_gradients(key, NUM_DRAWS, shape)
    chex.assert_equal_shape([g, randomised])
    assert g.dtype == randomised.dtype == jnp.float32
    np.testing.assert_array_equal(g, np.ones((NUM_DRAWS, *shape), np.float32))
    np.testing.assert_array_equal(jax.random.key_data(keys),
                                  jax.random.key_data(randomised_keys))
    # raw_draws (the naive step's) are the same draws.
    raw = raw_draws(key, NUM_DRAWS, shape, draws="literal")
    np.testing.assert_array_equal(raw.output_gradients, g)


# ================================================================= (b) per-element x_rand


@pytest.mark.parametrize("height, width, channels", [(1, 1, 64), (3, 5, 8), (7, 7, 16)])
def test_per_element_mask_has_exactly_the_positive_fraction_over_all_entries(
        height, width, channels):
    mask = np.asarray(ops.random_relu_mask(jax.random.key(1), height, width, 0.2, channels))
    chex.assert_shape(mask, (height, width, channels))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert mask.sum() == round(0.2 * height * width * channels)
    assert any(np.any(mask[..., c] != mask[..., 0]) for c in range(1, channels))
    assert mask.sum() > 0  # on a 1×1 fc map too: 13 of 64 channels


def test_per_element_masks_keep_a_1x1_score_map_alive_where_repeated_masks_block_it():
    # Score size 1: fc6…fc8 act on 1×1 maps, where a repeated 20 % mask is all-off.
    _, frozen = setup()
    shape = O.output_gradient_shape(LITERAL, image_size=IMAGE, score_size=1)
    assert shape == (1, 1, 1)
    key = jax.random.key(2)
    repeated = O.build_chain_cache(dataclasses.replace(LITERAL, draws="randomised"), frozen,
                                   key, 4, shape, chunk=4)
    per_element = O.build_chain_cache(LITERAL, frozen, key, 4, shape, chunk=4)
    assert not np.any(np.asarray(repeated.teacher_gradient))
    assert np.all(np.asarray(jnp.any(per_element.teacher_gradient.reshape(4, -1) != 0, axis=1)))


def test_the_literal_transplant_draws_per_element_masks_and_the_default_does_not():
    assert LITERAL.mask_layout == "per_element"
    assert dataclasses.replace(LITERAL, draws="randomised").mask_layout == "repeated"
    assert Transplant(CATEGORY, Adapter(CHANNELS), CLASSIFICATION,
                      CLASSIFICATION).draws == "randomised"


# ================================================================= (c) chains


def test_relu_pseudo_chain_masks_each_entry_with_the_per_image_mask():
    keys = jax.random.split(jax.random.key(3), 2)
    g = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 6)), jnp.float32)
    chain = L.backward_chain({}, g, (L.ReLU("relu6"),), derivatives="pseudo",
                             dummies={"relu6": "random_mask"}, mask_keys=keys,
                             mask_layout="per_element")
    masks = np.stack([np.asarray(ops.random_relu_mask(ops.relu_mask_key(k, "relu6"), 4, 4,
                                                      0.2, 6)) for k in keys])
    np.testing.assert_array_equal(chain, np.asarray(g) * masks)
    with pytest.raises(ValueError, match="mask_layout must be one of"):
        L.backward_chain({}, g, (L.ReLU("relu6"),), derivatives="pseudo",
                         dummies={"relu6": "random_mask"}, mask_keys=keys,
                         mask_layout="per_channel")


@functools.cache
def literal_chains():
    """The literal bank's chains and ``jax.linear_transpose`` of the surrogates, jitted once."""
    _, frozen = setup()
    shape = O.output_gradient_shape(LITERAL, image_size=IMAGE, score_size=SCORE_SIZE)
    cache = O.build_chain_cache(LITERAL, frozen, jax.random.key(1), 4, shape, chunk=4)
    raw = raw_draws(jax.random.key(1), 4, shape, draws="literal")
    side = CLASSIFICATION.enlarged_gradient_shape(SCORE_SIZE)
    x = jnp.zeros((4, *side, CHANNELS))

    @jax.jit
    def references(params, g, keys):
        def surrogate(v, layout):
            return CLASSIFICATION.surrogate(params, v, dummy_relu="random_mask",
                                            mask_keys=keys, mask_layout=layout)
        return tuple(jax.linear_transpose(functools.partial(surrogate, layout=layout), x)(g)[0]
                     for layout in ("per_element", "repeated"))

    per_element, repeated = references(frozen["teacher_task_module"], raw.output_gradients,
                                       raw.mask_keys)
    return cache, per_element, repeated


def test_literal_pseudo_chain_equals_linear_transpose_of_the_surrogate():
    cache, per_element, repeated = literal_chains()
    chex.assert_shape(cache.teacher_gradient, (4, *CLASSIFICATION.enlarged_gradient_shape(
        SCORE_SIZE), CHANNELS))
    assert_relatively_close(cache.teacher_gradient, per_element, CHAIN_TOL)
    # g_S = g_T: one chain serves both.
    np.testing.assert_array_equal(cache.student_task_gradient, cache.teacher_gradient)
    # The layout is what the chain used: the repeated masks' transpose is another map.
    assert np.abs(np.asarray(cache.teacher_gradient) - np.asarray(repeated)).max() > 1e-3 * \
        np.abs(np.asarray(repeated)).max()


# ================================================================= (d) end to end


def module_refs(params):
    return (ModuleRef(CATEGORY, params["category_module"]),
            ModuleRef(CLASSIFICATION, params["teacher_task_module"]))


def test_literal_exp1_problem_has_the_exact_closed_form_and_trains_finitely():
    params, _ = setup()
    category, own = module_refs(params)
    settings = TransplantSettings(protocol="exp1", draws="literal", score_size=SCORE_SIZE,
                                  num_draws=NUM_DRAWS, lambda0=10.0)
    prob = build_problem(category, own, own, LITERAL.adapter, settings=settings,
                         image_size=IMAGE, key=jax.random.key(5), beta=1.0)
    assert prob.transplant == LITERAL
    assert prob.live_draw_fraction == 1.0
    assert prob.cache.num_draws == NUM_DRAWS

    # Zero samples: the closed form is exact for one conv and recovers R⁻¹ (β = 1).
    warm, exact = problem.zero_sample_solution(prob, ridge=1e-6, num_draws=NUM_DRAWS)
    assert exact
    ideal = LITERAL.adapter.ideal_params(1.0)
    assert_relatively_close(warm["adapter_conv1"]["kernel"], ideal["adapter_conv1"]["kernel"],
                            IDENTITY_TOL)
    assert float(O.back_distill_term(LITERAL, warm, prob.cache, prob.scalars)) < 1e-8

    # A few back-distill steps from the random adapter: finite (a non-finite step raises
    # NonFiniteError), and the loss on the whole bank falls.
    steps = problem.StepCache(optax.adam(3e-3))
    trained, history, _ = problem.fit(prob, "back-distill", steps, data=None, num_samples=0,
                                      init=prob.adapter_init, num_steps=4, batch_size=4,
                                      draws_per_step=4, seed=0, log_every=1)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(trained))
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)

    def bank_loss(adapter_params):
        return float(O.back_distill_term(LITERAL, adapter_params, prob.cache, prob.scalars))

    assert bank_loss(trained) < bank_loss(prob.adapter_init)


# ================================================================= (e) validation


@pytest.mark.parametrize("make", [
    lambda: dataclasses.replace(LITERAL, draws="paper"),
    lambda: TransplantSettings(draws="paper"),
    lambda: O.sample_output_gradients(jax.random.key(0), 1, (1, 1, 1), draws="paper"),
], ids=["Transplant", "TransplantSettings", "sample_output_gradients"])
def test_unknown_draws_is_a_one_line_value_error_naming_the_field(make):
    with pytest.raises(ValueError, match=r"^draws must be one of 'randomised', 'literal', "
                                         r"got 'paper'$") as error:
        make()
    assert "\n" not in str(error.value)


def test_unknown_exp1_draws_in_the_config_is_refused_naming_the_field():
    # Other bad values (empty, None, numbers): tests/test_fuzz.py's choice fields.
    with pytest.raises(ValueError, match=r"^config\.transplant\.exp1_draws must be one of "
                                         r"'randomised', 'literal', got 'paper'$") as error:
        experiments.validate_config(loose_config(**{"transplant.exp1_draws": "paper"}))
    assert "\n" not in str(error.value)


def cell_fingerprints(config) -> dict[str, str]:
    """The main job's cell fingerprints of one target per experiment, under ``config``."""
    runner = Runner.__new__(Runner)
    teacher = types.SimpleNamespace(provenance={"params_sha256": "0" * 64})
    runner.config, runner.pad_to, runner.seed = config, 32, config.seed
    runner.benchmark = types.SimpleNamespace(version="v")
    runner.net = types.SimpleNamespace(category=lambda name: teacher)
    return {protocol: cells.fingerprint(runner._fingerprint(
        protocol, (1, 3), protocol, "cat", "dog.classification", "cat.classification"))
        for protocol in ("exp1", "exp2", "exp3")}


def test_exp1_draws_changes_only_exp1_cells_and_the_default_keeps_their_fingerprints():
    default = silhouettes.get_config()
    without = silhouettes.get_config()
    del without.transplant["exp1_draws"]  # the config before the field existed
    with_literal = silhouettes.get_config()
    with_literal.transplant.exp1_draws = "literal"
    before, now, changed = map(cell_fingerprints, (without, default, with_literal))
    assert now == before
    assert changed["exp1"] != now["exp1"]
    assert {k: v for k, v in changed.items() if k != "exp1"} == \
        {k: v for k, v in now.items() if k != "exp1"}


def test_both_exp1_draws_values_pass_the_config_checks():
    for value in ("randomised", "literal"):
        experiments.validate_config(loose_config(**{"transplant.exp1_draws": value}))
