"""Modules: the explicit chains prove themselves against JAX (real and pseudo derivatives).

* With real derivatives (ReLU masks of the actual activations, arg-max routing,
  dropout masks) the explicit chain equals ``jax.vjp`` of the real forward (Eq. 4a).
* With pseudo derivatives it equals ``jax.vjp`` and ``jax.linear_transpose`` of
  the linearised surrogate (Eq. 4b), so ``D'`` is a fixed linear map of ``G_y'``:
  independent of the image, of the biases and of the point it is evaluated at.

Equivalence tests run on width 1/16 modules with 32×32 images (``x`` is 16×16),
random kernels *and* biases (and random, non-bilinear up-sampling kernels, so
that a flipped kernel could not hide), jitted and un-jitted. Full-width VGG-16 /
FCN-8s at 224² are checked for shapes with ``jax.eval_shape``.
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chain_assertions import assert_relatively_close

from nettransplant.core import layers as L
from nettransplant.core import modules as M

# float32 with Precision.HIGHEST. The explicit chains lower to the same XLA ops
# as JAX's transposes; measured on CPU: bit-identical, jitted and un-jitted. The
# margin is for other backends' fusion choices.
CHAIN_TOL = 1e-5

WIDTH = 1 / 16  # conv channels 4-8-16-32-32, fc6/fc7 256 wide
IMAGE = 32
BATCH = 2
X_SHAPE = (BATCH, IMAGE // 2, IMAGE // 2, M.category_channels(WIDTH))
IMAGES_SHAPE = (BATCH, IMAGE, IMAGE, 3)

CATEGORY = M.CategoryModule(width=WIDTH)
CLASSIFICATION = M.ClassificationTaskModule(width=WIDTH, input_size=IMAGE)  # fc6: 1×1
SEGMENTATION = M.SegmentationTaskModule(width=WIDTH, input_size=IMAGE)
TEACHER = M.make_teacher(width=WIDTH, input_size=IMAGE)

# Exp. 2: the 1st dummy everywhere except the task module's lowest ReLU.
EXP2_DUMMIES = {"default": "identity", "relu2_1": "random_mask"}


assert_close = functools.partial(assert_relatively_close, tol=CHAIN_TOL)


def uniform(seed: int, shape) -> jax.Array:
    """``G_y'``-like maps: uniform in [-1, 1]."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def mask_keys(seed: int, batch: int = BATCH) -> jax.Array:
    return jax.random.split(jax.random.key(seed), batch)


def random_params(module, input_shape, seed: int, *, zero_biases: bool = False):
    """He-normal kernels and N(0, 0.1²) biases in the shapes ``module.init`` declares."""
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(input_shape, jnp.float32))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(0, math.sqrt(2 / fan_in), leaf.shape), jnp.float32)
        scale = 0.0 if zero_biases else 0.1
        return jnp.asarray(rng.normal(0, scale, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def params_of(name: str):
    module, shape = {
        "category": (CATEGORY, IMAGES_SHAPE), "classification": (CLASSIFICATION, X_SHAPE),
        "segmentation": (SEGMENTATION, X_SHAPE), "teacher": (TEACHER, IMAGES_SHAPE),
    }[name]
    return random_params(module, shape, seed=len(name))


# ----------------------------------------------------------------- jittable chains


def real_chain_and_vjp(module, params, inputs, g, dropout_key):
    """Explicit chain with real derivatives and ``jax.vjp``, in training and evaluation mode."""
    results = []
    for train in (True, False):
        def forward(z, train=train):
            return module.apply({"params": params}, z, train=train,
                                rngs={"dropout": dropout_key})
        _, vjp, intermediates = jax.vjp(forward, inputs, has_aux=True)
        results.append((module.real_gradient(params, g, intermediates), vjp(g)[0]))
    return results


def pseudo_chain_vjp_and_transpose(module, dummy_specs, params, inputs, g, keys):
    """For each dummy spec: the explicit pseudo chain, the vjp and the linear transpose of the
    surrogate, and the surrogate at ``inputs``, ``-2 · inputs`` and 0 (to check linearity)."""
    results = []
    for spec in dummy_specs:
        def surrogate(z, spec=spec):
            return module.surrogate(params, z, dummy_relu=spec, mask_keys=keys)
        explicit = module.pseudo_gradient(params, g, dummy_relu=spec, mask_keys=keys)
        results.append((explicit, jax.vjp(surrogate, inputs)[1](g)[0],
                        jax.linear_transpose(surrogate, inputs)(g)[0],
                        (surrogate(inputs), surrogate(-2 * inputs),
                         surrogate(jnp.zeros_like(inputs)))))
    return results


def assert_linear(values) -> None:
    """The surrogate is linear (no bias, no ReLU): ``s(-2x) = -2 s(x)`` and ``s(0) = 0``."""
    at_x, at_minus_2x, at_zero = values
    assert_close(at_minus_2x, -2 * at_x)
    assert not np.any(np.asarray(at_zero))


def output_shape(module, params, inputs_shape):
    out = jax.eval_shape(lambda z: module.apply({"params": params}, z)[0],
                         jax.ShapeDtypeStruct(inputs_shape, jnp.float32))
    return out.shape


class ModuleChainTest(chex.TestCase):
    """Eq. 4a and 4b for the category, classification and segmentation modules."""

    def check_real_chain(self, module, name, inputs_shape):
        params = params_of(name)
        inputs = uniform(1, inputs_shape)
        g = uniform(2, output_shape(module, params, inputs_shape))
        chain = self.variant(functools.partial(real_chain_and_vjp, module))
        for explicit, reference in chain(params, inputs, g, jax.random.key(3)):
            chex.assert_shape(explicit, inputs_shape)
            assert_close(explicit, reference)

    def check_pseudo_chain(self, module, name, inputs_shape, dummy_specs):
        params = params_of(name)
        g = uniform(2, output_shape(module, params, inputs_shape))
        keys = mask_keys(4)
        chain = self.variant(functools.partial(pseudo_chain_vjp_and_transpose, module,
                                               dummy_specs))
        for explicit, reference, transpose, values in chain(params, uniform(1, inputs_shape),
                                                            g, keys):
            chex.assert_shape(explicit, inputs_shape)
            assert_close(explicit, reference)
            assert_close(explicit, transpose)
            assert_linear(values)

    @chex.variants(with_jit=True, without_jit=True)
    def test_category_module_chain_with_real_derivatives_equals_vjp(self):
        self.check_real_chain(CATEGORY, "category", IMAGES_SHAPE)

    @chex.variants(with_jit=True, without_jit=True)
    def test_category_module_chain_with_real_derivatives_equals_vjp_on_black_background(self):
        # Silhouettes on black with freshly initialised (zero) biases: conv outputs are
        # exactly 0, ReLU derivatives there must be 0 and all-zero pool windows tie.
        params = random_params(CATEGORY, IMAGES_SHAPE, seed=5, zero_biases=True)
        images = uniform(1, IMAGES_SHAPE).at[:, :, :12].set(0.0)
        g = uniform(2, X_SHAPE)
        (explicit, reference), _ = self.variant(functools.partial(
            real_chain_and_vjp, CATEGORY))(params, images, g, jax.random.key(3))
        assert_close(explicit, reference)
        # Far inside the black region no gradient reaches the image.
        assert not np.any(np.asarray(explicit)[:, :, :8])

    @chex.variants(with_jit=True, without_jit=True)
    def test_category_module_pseudo_chain_equals_vjp_and_linear_transpose_of_surrogate(self):
        self.check_pseudo_chain(CATEGORY, "category", IMAGES_SHAPE, (
            "identity", "random_mask", {"default": "identity", "relu1_2": "random_mask"}))

    @chex.variants(with_jit=True, without_jit=True)
    def test_classification_module_chain_with_real_derivatives_equals_vjp(self):
        # Training mode covers the dropout masks of drop6/drop7; evaluation mode too.
        self.check_real_chain(CLASSIFICATION, "classification", X_SHAPE)

    @chex.variants(with_jit=True, without_jit=True)
    def test_classification_module_pseudo_chain_equals_vjp_and_linear_transpose_of_surrogate(
            self):
        # At the training size fc6…fc8 act on 1×1 maps, where a 20 % x_rand has no
        # positive entry; random_mask everywhere is covered on enlarged maps below.
        self.check_pseudo_chain(CLASSIFICATION, "classification", X_SHAPE,
                                ("identity", EXP2_DUMMIES))

    @chex.variants(with_jit=True, without_jit=True)
    def test_segmentation_module_chain_with_real_derivatives_equals_vjp(self):
        self.check_real_chain(SEGMENTATION, "segmentation", X_SHAPE)

    @chex.variants(with_jit=True, without_jit=True)
    def test_segmentation_module_pseudo_chain_equals_vjp_and_linear_transpose_of_surrogate(self):
        self.check_pseudo_chain(SEGMENTATION, "segmentation", X_SHAPE,
                                ("identity", "random_mask", EXP2_DUMMIES))


# ----------------------------------------------------------------- enlarged classification maps

ENLARGED = M.ClassificationTaskModule(width=WIDTH, input_size=64, fc6_kernel=2)
SCORE_SIZE = 7  # S


class EnlargedClassificationMapTest(chex.TestCase):

    @chex.variants(with_jit=True)
    def test_enlarged_pseudo_chain_equals_linear_transpose_of_surrogate(self):
        # An S×S×1 G_y' back-propagates to a 16·(S + fc6_kernel − 1) map, larger than x.
        side = ENLARGED.enlarged_gradient_shape(SCORE_SIZE)
        assert side == (16 * (SCORE_SIZE + 2 - 1),) * 2 == (128, 128)
        params = random_params(ENLARGED, (BATCH, 32, 32, X_SHAPE[-1]), seed=6)
        # The same G_y' for both images: only their x_rand masks tell them apart.
        g = jnp.tile(uniform(7, (1, SCORE_SIZE, SCORE_SIZE, 1)), (BATCH, 1, 1, 1))
        specs = ("identity", "random_mask", EXP2_DUMMIES)
        chain = self.variant(functools.partial(pseudo_chain_vjp_and_transpose, ENLARGED, specs))
        enlarged_x = uniform(1, (BATCH, *side, X_SHAPE[-1]))
        results = chain(params, enlarged_x, g, mask_keys(8))
        for spec, (explicit, reference, transpose, values) in zip(specs, results):
            chex.assert_shape(explicit, (BATCH, *side, X_SHAPE[-1]))
            assert_close(explicit, reference)
            assert_close(explicit, transpose)
            assert_linear(values)
            # Equal up to rounding: XLA may sum the two rows of a batch in other orders.
            same_per_image = np.allclose(explicit[0], explicit[1], rtol=1e-5, atol=1e-6)
            assert same_per_image == (spec == "identity"), spec

    def test_enlarged_gradient_shape_is_what_the_surrogate_admits(self):
        for module in (CLASSIFICATION, ENLARGED):
            side = module.enlarged_gradient_shape(SCORE_SIZE)
            smallest = 16 * module.fc6_size()  # the training size: one score
            params = init_shape(module, (1, smallest, smallest, X_SHAPE[-1]))["params"]
            x = jax.ShapeDtypeStruct((1, *side, X_SHAPE[-1]), jnp.float32)
            scores = jax.eval_shape(lambda p, z, m=module: m.surrogate(p, z), params, x)
            chex.assert_shape(scores, (1, SCORE_SIZE, SCORE_SIZE, 1))


# ----------------------------------------------------------------- teacher (Fig. 4a)


def teacher_real_chain_and_vjp(params, images, g, dropout_key):
    """Category chain of (classification chain + segmentation chain), and ``jax.vjp``."""
    def forward(images):
        return TEACHER.apply({"params": params}, images, train=True,
                             rngs={"dropout": dropout_key})
    _, vjp, inter = jax.vjp(forward, images, has_aux=True)
    g_x = (TEACHER.classification_module.real_gradient(
               params["classification_module"], g["classification"],
               inter["classification_module"])
           + TEACHER.segmentation_module.real_gradient(
               params["segmentation_module"], g["segmentation"], inter["segmentation_module"]))
    chain = TEACHER.category_module.real_gradient(params["category_module"], g_x,
                                                  inter["category_module"])
    return chain, vjp(g)[0]


def teacher_pseudo_chain_and_transpose(params, images, g, keys):
    """Exp.-1-like dummies: identity in ``f``, Exp. 2's map in ``g_cls``, 2nd dummy in ``g_seg``."""
    f, g_cls, g_seg = (TEACHER.category_module, TEACHER.classification_module,
                       TEACHER.segmentation_module)
    p_f, p_cls, p_seg = (params["category_module"], params["classification_module"],
                         params["segmentation_module"])

    def surrogate(images):
        x = f.surrogate(p_f, images)
        return {"classification": g_cls.surrogate(p_cls, x, dummy_relu=EXP2_DUMMIES,
                                                  mask_keys=keys),
                "segmentation": g_seg.surrogate(p_seg, x, dummy_relu="random_mask",
                                                mask_keys=keys)}

    d_x = (g_cls.pseudo_gradient(p_cls, g["classification"], dummy_relu=EXP2_DUMMIES,
                                 mask_keys=keys)
           + g_seg.pseudo_gradient(p_seg, g["segmentation"], dummy_relu="random_mask",
                                   mask_keys=keys))
    explicit = f.pseudo_gradient(p_f, d_x)
    return explicit, jax.linear_transpose(surrogate, images)(g)[0]


class TeacherTest(chex.TestCase):

    def teacher_gradients(self):
        params = params_of("teacher")
        shapes = jax.eval_shape(lambda z: TEACHER.apply({"params": params}, z)[0],
                                jax.ShapeDtypeStruct(IMAGES_SHAPE, jnp.float32))
        g = {name: uniform(i, s.shape) for i, (name, s) in enumerate(sorted(shapes.items()))}
        return params, g

    @chex.variants(with_jit=True, without_jit=True)
    def test_teacher_chain_with_real_derivatives_equals_vjp(self):
        params, g = self.teacher_gradients()
        explicit, reference = self.variant(teacher_real_chain_and_vjp)(
            params, uniform(1, IMAGES_SHAPE), g, jax.random.key(3))
        chex.assert_shape(explicit, IMAGES_SHAPE)
        assert_close(explicit, reference)

    @chex.variants(with_jit=True)
    def test_teacher_pseudo_chain_equals_linear_transpose_of_surrogate(self):
        params, g = self.teacher_gradients()
        explicit, transpose = self.variant(teacher_pseudo_chain_and_transpose)(
            params, jnp.zeros(IMAGES_SHAPE), g, mask_keys(4))
        chex.assert_shape(explicit, IMAGES_SHAPE)
        assert_close(explicit, transpose)


# ----------------------------------------------------------------- D' is a fixed linear map


def perturb(tree, rng, scale, leaf_name):
    def change(path, leaf):
        if path[-1].key != leaf_name:
            return leaf
        return leaf + jnp.asarray(rng.normal(0, scale, leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(change, tree)


INDEPENDENCE_CASES = {
    "classification": (CLASSIFICATION, EXP2_DUMMIES),
    "segmentation": (SEGMENTATION, "random_mask"),
}


@functools.cache
def independence_fn(name):
    """Jitted once per module: D', vjp of the surrogate at a point, real D at that point."""
    module, spec = INDEPENDENCE_CASES[name]
    traces = []

    @jax.jit
    def fn(params, x, g, keys):
        traces.append(name)
        def surrogate(z):
            return module.surrogate(params, z, dummy_relu=spec, mask_keys=keys)
        pseudo = module.pseudo_gradient(params, g, dummy_relu=spec, mask_keys=keys)
        _, inter = module.apply({"params": params}, x)
        return pseudo, jax.vjp(surrogate, x)[1](g)[0], module.real_gradient(params, g, inter)

    params = params_of(name)
    g = uniform(2, output_shape(module, params, X_SHAPE))
    baseline = fn(params, uniform(1, X_SHAPE), g, mask_keys(4))
    return fn, params, g, baseline, traces


@pytest.mark.parametrize("name", sorted(INDEPENDENCE_CASES))
@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), bias_scale=st.floats(0.01, 10.0),
                  feature_scale=st.floats(0.01, 100.0))
def test_pseudo_gradient_ignores_biases_and_input_features(name, seed, bias_scale,
                                                           feature_scale):
    # Insight 1: D' depends on the kernels, G_y' and x_rand only, so it can be cached.
    fn, params, g, (pseudo, surrogate_vjp, real), traces = independence_fn(name)
    rng = np.random.default_rng(seed)
    other_params = perturb(params, rng, bias_scale, "bias")
    other_x = jnp.asarray(rng.normal(0, feature_scale, X_SHAPE), jnp.float32)
    other_pseudo, other_surrogate_vjp, other_real = fn(other_params, other_x, g, mask_keys(4))
    chex.assert_trees_all_equal(other_pseudo, pseudo)
    chex.assert_trees_all_equal(other_surrogate_vjp, surrogate_vjp)
    assert_close(pseudo, surrogate_vjp)
    # The real gradient D (Eq. 4a) does move with the features and biases.
    assert not np.allclose(other_real, real)
    # Parameters are jit arguments: new values reuse the one compilation.
    assert len(traces) == 1


def test_student_and_teacher_pseudo_chains_see_the_same_x_rand():
    # g_S and g_T share layer names, so the same per-image keys give the same masks:
    # with g_S's kernels a scaled copy of g_T's, D'_S is exactly that scale times D'_T.
    teacher = params_of("classification")
    student = dict(teacher)
    student["conv2_1"] = {**teacher["conv2_1"], "kernel": -0.5 * teacher["conv2_1"]["kernel"]}
    student["fc8"] = {"kernel": 3.0 * teacher["fc8"]["kernel"],
                      "bias": teacher["fc8"]["bias"] + 1.0}
    g = uniform(2, (BATCH, 1, 1, 1))
    chain = jax.jit(functools.partial(CLASSIFICATION.pseudo_gradient, dummy_relu=EXP2_DUMMIES))
    d_teacher = chain(teacher, g, mask_keys=mask_keys(4))
    d_student = chain(student, g, mask_keys=mask_keys(4))
    assert_close(d_student, -1.5 * d_teacher)
    # Other keys draw another x_rand: the chains are no longer proportional.
    d_other = chain(student, g, mask_keys=mask_keys(5))
    assert not np.allclose(d_other, -1.5 * d_teacher, atol=1e-3)


# ----------------------------------------------------------------- layer stacks at odd sizes

ODD_STACK = (
    L.Conv("conv_a", 6, 7, "SAME"), L.ReLU("relu_a"), L.MaxPool("pool_a"),
    L.Conv("conv_b", 5, 3, "VALID"), L.ReLU("relu_b"), L.Dropout("drop_b", 0.5),
    L.Conv("conv_c", 4, 1, ((1, 0), (0, 2))), L.MaxPool("pool_c", 3),
)


def stack_params(seed):
    rng = np.random.default_rng(seed)
    params, c = {}, 3
    for layer in ODD_STACK:
        if isinstance(layer, L.Conv):
            k = layer.kernel_size
            params[layer.name] = {
                "kernel": jnp.asarray(rng.normal(0, 0.3, (k, k, c, layer.features)), jnp.float32),
                "bias": jnp.asarray(rng.normal(0, 0.1, (layer.features,)), jnp.float32)}
            c = layer.features
    return params


def test_stack_chain_with_real_derivatives_equals_vjp_when_pools_drop_rows():
    # 19×23 input: both pools drop trailing rows/columns; kernels 7/3/1, SAME/VALID/explicit.
    params, x = stack_params(0), uniform(1, (2, 19, 23, 3))

    @jax.jit
    def both(params, x, g, key):
        _, vjp, inter = jax.vjp(lambda z: L.forward(params, z, ODD_STACK, dropout_key=key),
                                x, has_aux=True)
        chain = L.backward_chain(params, g, ODD_STACK, derivatives="real", intermediates=inter)
        return chain, vjp(g)[0]

    y, _ = L.forward(params, x, ODD_STACK)
    explicit, reference = both(params, x, uniform(2, y.shape), jax.random.key(3))
    assert_close(explicit, reference)


def test_stack_pseudo_chain_ignores_dropout_and_equals_linear_transpose():
    params, x = stack_params(0), jnp.zeros((2, 20, 24, 3))
    dummies = {"relu_a": "random_mask", "relu_b": "identity"}
    keys = mask_keys(4)

    @jax.jit
    def both(params, x, g):
        def surrogate(z):
            return L.surrogate_forward(params, z, ODD_STACK, dummies, mask_keys=keys)
        chain = L.backward_chain(params, g, ODD_STACK, derivatives="pseudo", dummies=dummies,
                                 mask_keys=keys)
        return chain, jax.linear_transpose(surrogate, x)(g)[0]

    g = uniform(2, L.surrogate_forward(params, x, ODD_STACK, dummies, mask_keys=keys).shape)
    explicit, transpose = both(params, x, g)
    assert_close(explicit, transpose)


# ----------------------------------------------------------------- full-width shapes at 224²


def shapes_of(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def param_count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


FULL = 224
FULL_IMAGES = jax.ShapeDtypeStruct((1, FULL, FULL, 3), jnp.float32)
FULL_X = jax.ShapeDtypeStruct((1, FULL // 2, FULL // 2, 64), jnp.float32)


def test_full_width_vgg16_shapes_at_224():
    category, classification = M.CategoryModule(), M.ClassificationTaskModule()
    p_f = jax.eval_shape(category.init, jax.random.key(0), FULL_IMAGES)["params"]
    p_g = jax.eval_shape(classification.init, jax.random.key(0), FULL_X)["params"]
    assert shapes_of(p_f) == {
        "conv1_1": {"kernel": (3, 3, 3, 64), "bias": (64,)},
        "conv1_2": {"kernel": (3, 3, 64, 64), "bias": (64,)}}
    assert shapes_of(p_g)["conv5_3"]["kernel"] == (3, 3, 512, 512)
    assert shapes_of(p_g)["fc6"]["kernel"] == (7, 7, 512, 4096)
    assert shapes_of(p_g)["fc7"]["kernel"] == (1, 1, 4096, 4096)
    assert shapes_of(p_g)["fc8"]["kernel"] == (1, 1, 4096, 1)
    # torchvision's VGG-16 has 138,357,544 parameters with 1000 outputs; here fc8 has 1.
    assert param_count(p_f) + param_count(p_g) == 138_357_544 - 4096 * 999 - 999
    x, inter_f = jax.eval_shape(lambda p, i: category.apply({"params": p}, i), p_f, FULL_IMAGES)
    chex.assert_shape(x, FULL_X.shape)
    chex.assert_shape(inter_f["relu1_2"], (1, FULL, FULL, 64))
    y, inter_g = jax.eval_shape(lambda p, z: classification.apply({"params": p}, z), p_g, x)
    chex.assert_shape(y, (1, 1, 1, 1))
    chex.assert_shape(inter_g["pool5"], (1, 7, 7, 512))
    chex.assert_shape(inter_g["fc7"], (1, 1, 1, 4096))
    # Enlarged maps: S = 7 → D' of 16 · (7 + 7 − 1) = 208, larger than x's 112.
    assert classification.enlarged_gradient_shape(7) == (208, 208)
    d = jax.eval_shape(
        lambda p, g, k: classification.pseudo_gradient(p, g, dummy_relu="random_mask",
                                                       mask_keys=k),
        p_g, jax.ShapeDtypeStruct((1, 7, 7, 1), jnp.float32), mask_keys(0, 1))
    chex.assert_shape(d, (1, 208, 208, 64))


def test_full_width_fcn8s_shapes_at_224():
    segmentation = M.SegmentationTaskModule()
    p = jax.eval_shape(segmentation.init, jax.random.key(0), FULL_X)["params"]
    shapes = shapes_of(p)
    assert shapes["fc6"]["kernel"] == (7, 7, 512, 4096)
    assert shapes["score_fr"]["kernel"] == (1, 1, 4096, 2)
    assert shapes["score_pool4"]["kernel"] == (1, 1, 512, 2)
    assert shapes["score_pool3"]["kernel"] == (1, 1, 256, 2)
    assert shapes["upscore2"] == {"kernel": (4, 4, 2, 2)}
    assert shapes["upscore_pool4"] == {"kernel": (4, 4, 2, 2)}
    assert shapes["upscore8"] == {"kernel": (16, 16, 2, 2)}
    y, inter = jax.eval_shape(lambda p, z: segmentation.apply({"params": p}, z), p, FULL_X)
    chex.assert_shape(y, (1, FULL, FULL, 2))
    chex.assert_shape(inter["pool3"], (1, 28, 28, 256))
    chex.assert_shape(inter["pool4"], (1, 14, 14, 512))
    chex.assert_shape(inter["fuse_pool4"], (1, 14, 14, 2))
    chex.assert_shape(inter["fuse_pool3"], (1, 28, 28, 2))
    d = jax.eval_shape(lambda p, g: segmentation.pseudo_gradient(p, g), p,
                       jax.ShapeDtypeStruct((1, FULL, FULL, 2), jnp.float32))
    chex.assert_shape(d, FULL_X.shape)


def test_full_width_teacher_shapes_at_224():
    teacher = M.make_teacher()
    p = jax.eval_shape(teacher.init, jax.random.key(0), FULL_IMAGES)["params"]
    assert set(p) == {"category_module", "classification_module", "segmentation_module"}
    outputs, inter = jax.eval_shape(lambda p, i: teacher.apply({"params": p}, i), p,
                                    FULL_IMAGES)
    chex.assert_shape(outputs["classification"], (1, 1, 1, 1))
    chex.assert_shape(outputs["segmentation"], (1, FULL, FULL, 2))
    chex.assert_shape(inter["category_module"]["pool1"], FULL_X.shape)


def test_full_width_category_module_forward_at_224():
    # x = pool1(relu(conv1_2(relu(conv1_1(I))))), checked against numpy.
    category = M.CategoryModule()
    params = random_params(category, FULL_IMAGES.shape, seed=9)
    images = uniform(1, FULL_IMAGES.shape)
    x, _ = jax.jit(category.apply)({"params": params}, images)
    chex.assert_shape(x, FULL_X.shape)

    def conv_relu(h, p):
        k, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
        hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = b + sum(hp[:, a: a + FULL, c: c + FULL] @ k[a, c]
                      for a in range(3) for c in range(3))
        return np.maximum(out, 0)

    h = conv_relu(conv_relu(np.asarray(images, np.float64), params["conv1_1"]),
                  params["conv1_2"])
    expected = h.reshape(1, FULL // 2, 2, FULL // 2, 2, 64).max(axis=(2, 4))
    assert_close(x, expected)


# ----------------------------------------------------------------- bad input


SMALL = 1 / 8  # x has 8 channels


def init_shape(module, shape, dtype=jnp.float32):
    return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("module, shape, dtype, message", [
    (M.CategoryModule(width=SMALL), (2, 32, 32, 3), jnp.int32, "floating-point"),
    (M.CategoryModule(width=SMALL), (32, 32, 3), jnp.float32, r"\(batch, height, width, 3\)"),
    (M.CategoryModule(width=SMALL), (2, 32, 32, 1), jnp.float32, r"\(batch, height, width, 3\)"),
    (M.ClassificationTaskModule(width=SMALL, input_size=32), (2, 16, 16, 5), jnp.float32,
     r"\(batch, height, width, 8\)"),
    (M.ClassificationTaskModule(width=SMALL, input_size=32), (16, 16, 8), jnp.float32,
     r"\(batch, height, width, 8\)"),
    (M.ClassificationTaskModule(width=SMALL, input_size=32), (2, 16, 16, 8), jnp.uint8,
     "floating-point"),
    (M.ClassificationTaskModule(width=SMALL, input_size=64), (2, 16, 16, 8), jnp.float32,
     "at least 32×32"),
    (M.SegmentationTaskModule(width=SMALL, input_size=32), (2, 16, 16, 5), jnp.float32,
     r"\(batch, height, width, 8\)"),
    (M.SegmentationTaskModule(width=SMALL, input_size=32), (2, 20, 16, 8), jnp.float32,
     "multiples of 16"),
    (M.make_teacher(width=SMALL, input_size=32), (2, 32, 32, 4), jnp.float32,
     r"\(batch, height, width, 3\)"),
], ids=["int_images", "3d_images", "gray_images", "5_channels", "3d_features", "uint8_features",
        "too_small_for_fc6", "segmentation_5_channels", "not_multiple_of_16", "teacher_rgba"])
def test_bad_input_raises_naming_the_expected_shape(module, shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        init_shape(module, shape, dtype)


def test_bad_output_gradient_raises_naming_the_expected_shape():
    module = M.ClassificationTaskModule(width=SMALL, input_size=32)
    with pytest.raises(ValueError, match=r"output gradients of shape \(batch, height, width, 1\)"):
        module.pseudo_gradient({}, jnp.zeros((2, 1, 1, 3)))
    with pytest.raises(ValueError, match=r"\(batch, height, width, 2\)"):
        M.SegmentationTaskModule(width=SMALL).real_gradient({}, jnp.zeros((2, 32, 32)), {})
    with pytest.raises(ValueError, match="floating-point"):
        module.pseudo_gradient({}, jnp.zeros((2, 1, 1, 1), jnp.int32))


@pytest.mark.parametrize("spec, message", [
    ("zero", r"ReLU layer 'relu2_1' must be one of"),
    ({"default": "identity", "relu2_1": "sigmoid"}, r"ReLU layer 'relu2_1' must be one of"),
    ({"default": "identity", "relu9_9": "random_mask"}, r"relu9_9"),
    ({"default": "identity", "relu1_1": "random_mask"}, r"relu1_1"),
    ({"relu2_1": "random_mask"}, r"no dummy for ReLU layers \['relu2_2'"),
])
def test_bad_dummy_relu_raises_naming_the_layer(spec, message):
    g = jnp.zeros((BATCH, 1, 1, 1))
    with pytest.raises(ValueError, match=message):
        CLASSIFICATION.pseudo_gradient({}, g, dummy_relu=spec, mask_keys=mask_keys(0))
    with pytest.raises(ValueError, match=message):
        CLASSIFICATION.surrogate({}, jnp.zeros(X_SHAPE), dummy_relu=spec, mask_keys=mask_keys(0))


@pytest.mark.parametrize("name, module, g_shape", [
    ("category", CATEGORY, X_SHAPE), ("classification", CLASSIFICATION, (BATCH, 1, 1, 1)),
    ("segmentation", SEGMENTATION, (BATCH, IMAGE, IMAGE, 2)),
])
def test_random_mask_without_one_key_per_image_raises(name, module, g_shape):
    g, params = jnp.zeros(g_shape), params_of(name)
    with pytest.raises(ValueError, match=r"needs per-image mask_keys"):
        module.pseudo_gradient(params, g, dummy_relu="random_mask")
    with pytest.raises(ValueError, match="one key per image"):
        module.pseudo_gradient(params, g, dummy_relu="random_mask", mask_keys=mask_keys(0, 3))


def test_random_mask_surrogate_without_mask_keys_names_the_layer():
    with pytest.raises(ValueError, match=r"'random_mask' at \['relu2_1'\] needs per-image"):
        CLASSIFICATION.surrogate({}, jnp.zeros(X_SHAPE), dummy_relu=EXP2_DUMMIES)
