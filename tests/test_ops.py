"""Ops: every explicit backward map equals JAX's own differentiation of the forward.

Real VJPs (Eq. 4a) must equal ``jax.vjp`` of the op; pseudo VJPs (Eq. 4b) must
equal ``jax.vjp`` and ``jax.linear_transpose`` of the op's linear surrogate
(max → average pool, ReLU → identity or a fixed ``x_rand`` mask, dropout →
identity). Each equivalence runs jitted and un-jitted (``chex.variants``).
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from chain_assertions import assert_relatively_close

from nettransplant.core import layers as L
from nettransplant.core import ops

# float32 with Precision.HIGHEST: an explicit backward map may only differ from
# JAX's by rounding. Measured on CPU: bit-identical to jax.vjp / linear_transpose
# (jitted and not); <= 4e-7 of the scale against the float64 numpy references.
OP_TOL = 1e-6


assert_close = functools.partial(assert_relatively_close, tol=OP_TOL)


def normal(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """XLA's SAME rule, written out: output ``ceil(n / s)``, extra padding at the end."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return (total // 2, total - total // 2)


def numpy_conv2d(x, w, b, strides, pads):
    """Cross-correlation by explicit sums over kernel offsets (independent of lax)."""
    x, w, b = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(b, np.float64)
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xp.shape[1] - kh) // strides + 1
    wo = (xp.shape[2] - kw) // strides + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3])) + b
    for a in range(kh):
        for c in range(kw):
            patch = xp[:, a: a + (ho - 1) * strides + 1: strides,
                       c: c + (wo - 1) * strides + 1: strides]
            y += patch @ w[a, c]
    return y


# Odd spatial sizes, so that strides leave remainders.
CONV_INPUT = (2, 15, 17, 3)
CONV_CASES = (
    # name, kernel, padding, strides, explicit pads (None: XLA's SAME rule)
    ("k1_same", 1, "SAME", 1, None),
    ("k3_same", 3, "SAME", 1, None),
    ("k7_same", 7, "SAME", 1, None),
    ("k3_valid", 3, "VALID", 1, ((0, 0), (0, 0))),
    ("k7_valid", 7, "VALID", 1, ((0, 0), (0, 0))),
    ("k3_int_padding", 3, 2, 1, ((2, 2), (2, 2))),
    ("k7_explicit_asymmetric", 7, ((3, 1), (0, 2)), 1, ((3, 1), (0, 2))),
    ("k1_same_stride2", 1, "SAME", 2, None),
    ("k3_same_stride2", 3, "SAME", 2, None),
    ("k7_same_stride2", 7, "SAME", 2, None),
    ("k3_valid_stride2", 3, "VALID", 2, ((0, 0), (0, 0))),
    ("k7_explicit_stride2", 7, ((1, 0), (2, 3)), 2, ((1, 0), (2, 3))),
)


class ConvolutionTest(chex.TestCase):

    @parameterized.named_parameters(*CONV_CASES)
    def test_conv2d_with_bias_matches_explicit_cross_correlation(
            self, kernel, padding, strides, pads):
        x, w, b = normal(0, CONV_INPUT), normal(1, (kernel, kernel, 3, 4)), normal(2, (4,))
        if pads is None:
            pads = tuple(same_padding(n, kernel, strides) for n in CONV_INPUT[1:3])
        y = ops.conv2d(x, w, b, strides=strides, padding=padding)
        assert_close(y, numpy_conv2d(x, w, b, strides, pads))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CONV_CASES)
    def test_conv2d_vjp_equals_jax_vjp(self, kernel, padding, strides, pads):
        del pads
        spatial = CONV_INPUT[1:3]

        @self.variant
        def both(x, w, b, g):
            _, vjp = jax.vjp(lambda x: ops.conv2d(x, w, b, strides=strides, padding=padding), x)
            explicit = ops.conv2d_vjp(g, w, input_spatial=spatial, strides=strides,
                                      padding=padding)
            return explicit, vjp(g)[0]

        x, w, b = normal(0, CONV_INPUT), normal(1, (kernel, kernel, 3, 4)), normal(2, (4,))
        g = normal(3, ops.conv2d(x, w, b, strides=strides, padding=padding).shape)
        explicit, reference = both(x, w, b, g)
        chex.assert_shape(explicit, CONV_INPUT)
        assert_close(explicit, reference)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("k1", 1, "VALID"), ("k3", 3, "SAME"), ("k7", 7, 1))
    def test_conv_pseudo_vjp_equals_linear_transpose_of_bias_free_conv(self, kernel, padding):
        # f'_conv depends on the kernel only: the surrogate is the conv without bias.
        @self.variant
        def both(x, w, g):
            transpose = jax.linear_transpose(lambda x: ops.conv2d(x, w, padding=padding), x)
            return ops.conv2d_vjp(g, w, padding=padding), transpose(g)[0]

        x, w = normal(0, CONV_INPUT), normal(1, (kernel, kernel, 3, 4))
        g = normal(3, ops.conv2d(x, w, padding=padding).shape)
        explicit, reference = both(x, w, g)
        assert_close(explicit, reference)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("k3_same_on_2x2", (2, 2, 2, 3), 3, "SAME", ((1, 1), (1, 1))),
        ("k3_same_on_1x1", (2, 1, 1, 3), 3, "SAME", ((1, 1), (1, 1))),
        ("k3_same_on_2x4", (2, 2, 4, 3), 3, "SAME", ((1, 1), (1, 1))),
        ("k7_explicit_on_6x5", (2, 6, 5, 3), 7, ((3, 1), (2, 2)), ((3, 1), (2, 2))))
    def test_conv2d_with_a_window_larger_than_its_input_and_its_vjp(self, shape, kernel,
                                                                    padding, pads):
        # Such convs (VGG's conv5 on a 2×2 map) run as one matmul of patches.
        x, w, b = normal(0, shape), normal(1, (kernel, kernel, 3, 4)), normal(2, (4,))

        @self.variant
        def both(x, w, b):
            y, vjp = jax.vjp(lambda x: ops.conv2d(x, w, b, padding=padding), x)
            g = jnp.cos(y)
            return y, vjp(g)[0], ops.conv2d_vjp(g, w, input_spatial=shape[1:3],
                                                padding=padding)

        y, vjp, explicit = both(x, w, b)
        assert_close(y, numpy_conv2d(x, w, b, 1, pads))
        assert_close(vjp, explicit)

    def test_flip_and_swap_is_the_papers_kernel(self):
        # Appendix: W[i, j, k, l] = w[m+1-i, m+1-j, l, k] (1-based, m = kernel size).
        w = np.asarray(normal(0, (3, 3, 2, 5)))
        flipped = np.asarray(ops.flip_and_swap(jnp.asarray(w)))
        m = 3
        chex.assert_shape(flipped, (3, 3, 5, 2))
        for i in range(1, m + 1):
            for j in range(1, m + 1):
                for k in range(5):
                    for l in range(2):
                        assert flipped[i - 1, j - 1, k, l] == w[m - i, m - j, l, k]

    def test_strided_conv_backward_needs_input_spatial(self):
        with pytest.raises(ValueError, match="input_spatial"):
            ops.conv2d_vjp(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), strides=2)

    def test_bad_padding_raises(self):
        with pytest.raises(ValueError, match="padding"):
            ops.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), padding="FULL")
        with pytest.raises(ValueError, match="pairs"):
            ops.resolve_padding(((1, 1), (1, 1), (1, 1)), (3, 3))


UPSAMPLING_CASES = (("fcn_2x", 4, 2, "VALID"), ("fcn_8x", 16, 8, "VALID"),
                    ("2x_padded", 4, 2, 1))


class TransposedConvolutionTest(chex.TestCase):

    @parameterized.named_parameters(*UPSAMPLING_CASES)
    def test_conv2d_transpose_matches_scatter_definition(self, kernel, strides, padding):
        # y[i·s + a, j·s + b, d] += x[i, j, c] · K[a, b, c, d], then `padding` cropped.
        x, k = normal(0, (2, 5, 6, 3)), normal(1, (kernel, kernel, 3, 2))
        xn, kn = np.asarray(x, np.float64), np.asarray(k, np.float64)
        full = np.zeros((2, 4 * strides + kernel, 5 * strides + kernel, 2))
        for i in range(5):
            for j in range(6):
                full[:, i * strides: i * strides + kernel, j * strides: j * strides + kernel] += (
                    np.einsum("nc,abcd->nabd", xn[:, i, j], kn))
        p = 0 if padding == "VALID" else padding
        expected = full[:, p: full.shape[1] - p, p: full.shape[2] - p]
        assert_close(ops.conv2d_transpose(x, k, strides=strides, padding=padding), expected)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*UPSAMPLING_CASES)
    def test_conv2d_transpose_vjp_equals_jax_vjp_and_linear_transpose(
            self, kernel, strides, padding):
        @self.variant
        def three(x, k, g):
            def up(x):
                return ops.conv2d_transpose(x, k, strides=strides, padding=padding)
            _, vjp = jax.vjp(up, x)
            explicit = ops.conv2d_transpose_vjp(g, k, strides=strides, padding=padding)
            return explicit, vjp(g)[0], jax.linear_transpose(up, x)(g)[0]

        x, k = normal(0, (2, 5, 6, 3)), normal(1, (kernel, kernel, 3, 2))
        g = normal(2, ops.conv2d_transpose(x, k, strides=strides, padding=padding).shape)
        explicit, reference, transpose = three(x, k, g)
        chex.assert_shape(explicit, (2, 5, 6, 3))
        assert_close(explicit, reference)
        assert_close(explicit, transpose)

    @parameterized.named_parameters(("fcn_2x", 4, 2), ("fcn_8x", 16, 8))
    def test_conv2d_transpose_is_the_vjp_of_a_strided_conv(self, kernel, strides):
        # The docstring's definition: the input-gradient map of a strided conv whose
        # kernel, seen from the up-sampled side, is `kernel` (in/out swapped).
        x, k = normal(0, (2, 5, 6, 3)), normal(1, (kernel, kernel, 3, 2))
        upsampled = jnp.zeros((2, 4 * strides + kernel, 5 * strides + kernel, 2))
        _, vjp = jax.vjp(lambda z: ops.conv2d(z, jnp.swapaxes(k, 2, 3), strides=strides,
                                              padding="VALID"), upsampled)
        assert_close(ops.conv2d_transpose(x, k, strides=strides), vjp(x)[0])


class ReLUTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_relu_vjp_equals_jax_vjp_including_exact_zeros(self):
        # Exact zeros occur on black backgrounds with zero biases: the derivative there is 0.
        x = normal(0, (2, 6, 7, 3)).at[:, :3].set(0.0)
        g = normal(1, x.shape)

        @self.variant
        def both(x, g):
            return ops.relu_vjp(g, x), jax.vjp(ops.relu, x)[1](g)[0]

        explicit, reference = both(x, g)
        assert_close(explicit, reference, tol=0.0)
        assert np.all(np.asarray(explicit)[:, :3] == 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_relu_pseudo_vjp_identity_equals_linear_transpose_of_identity(self):
        g = normal(1, (2, 6, 7, 3))

        @self.variant
        def both(g):
            return (ops.relu_pseudo_vjp(g, "identity"),
                    jax.linear_transpose(lambda x: x, g)(g)[0])

        explicit, reference = both(g)
        assert_close(explicit, reference, tol=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_relu_pseudo_vjp_random_mask_equals_vjp_and_linear_transpose_of_masking(self):
        keys = jax.random.split(jax.random.key(0), 2)
        mask = ops.batched_relu_mask(keys, "relu2_1", 6, 7)
        x, g = normal(0, (2, 6, 7, 3)), normal(1, (2, 6, 7, 3))

        @self.variant
        def three(x, g, mask):
            def surrogate(x):
                return x * mask
            return (ops.relu_pseudo_vjp(g, "random_mask", mask=mask),
                    jax.vjp(surrogate, x)[1](g)[0],
                    jax.linear_transpose(surrogate, x)(g)[0])

        explicit, reference, transpose = three(x, g, mask)
        assert_close(explicit, reference, tol=0.0)
        assert_close(explicit, transpose, tol=0.0)
        # One x_rand map broadcast over channels: each channel is g masked the same way.
        for c in range(3):
            np.testing.assert_array_equal(explicit[..., c], g[..., c] * mask[..., 0])

    def test_bad_relu_dummy_or_missing_mask_raises(self):
        g = jnp.ones((1, 2, 2, 1))
        with pytest.raises(ValueError, match="needs the x_rand mask"):
            ops.relu_pseudo_vjp(g, "random_mask")
        with pytest.raises(ValueError, match="'zero'"):
            ops.relu_pseudo_vjp(g, "zero")


# Ties: integers after a ReLU give windows of equal maxima, and all-zero windows.
def tied_after_relu(seed: int, shape) -> jax.Array:
    return jnp.maximum(jnp.round(normal(seed, shape)), 0.0)


POOL_CASES = (("even_2x2", (2, 16, 16, 3), 2), ("odd_trailing_rows_dropped", (2, 15, 17, 3), 2),
              ("window3_odd", (2, 11, 13, 3), 3))


def xla_max_pool(x: jax.Array, window: int) -> jax.Array:
    """Max pooling as XLA's reduce-window, differentiated by JAX's own rule (the reference)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, window, window, 1), "VALID")


class PoolingTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*POOL_CASES)
    def test_max_pool_vjp_equals_jax_vjp_with_ties(self, shape, window):
        x = tied_after_relu(0, shape)
        g = normal(1, ops.max_pool(x, window).shape)

        @self.variant
        def three(x, g):
            return (ops.max_pool_vjp(g, x, window),
                    jax.vjp(lambda x: xla_max_pool(x, window), x)[1](g)[0],
                    jax.vjp(lambda x: ops.max_pool(x, window), x)[1](g)[0])

        explicit, reference, library = three(x, g)
        assert_close(explicit, reference, tol=0.0)
        # ops.max_pool's own derivative (from the arg-max) is XLA's, bit for bit.
        np.testing.assert_array_equal(library, reference)
        # Each window routes its gradient to exactly one position, even when tied.
        ho, wo = shape[1] // window, shape[2] // window
        nonzero = np.asarray(explicit)[:, : ho * window, : wo * window] != 0
        assert nonzero.sum() == np.count_nonzero(np.asarray(g))
        # Dropped trailing rows and columns get no gradient.
        assert not np.any(np.asarray(explicit)[:, ho * window:])
        assert not np.any(np.asarray(explicit)[:, :, wo * window:])

    @chex.variants(with_jit=True, without_jit=True)
    def test_chain_through_relu_and_max_pool_equals_vjp_with_zero_ties(self):
        # relu → max pool where whole windows are 0 (ties) or pre-activations are exactly 0.
        x = jnp.round(normal(0, (2, 15, 17, 3)))
        g = normal(1, (2, 7, 8, 3))

        @self.variant
        def both(x, g):
            h = ops.relu(x)
            chain = ops.relu_vjp(ops.max_pool_vjp(g, h), x)
            return chain, jax.vjp(lambda x: ops.max_pool(ops.relu(x)), x)[1](g)[0]

        explicit, reference = both(x, g)
        assert_close(explicit, reference, tol=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*POOL_CASES)
    def test_max_pool_pseudo_vjp_is_avg_pool_vjp(self, shape, window):
        # Eq. 4b: the average-pool derivative replaces max-pool's; the surrogate is avg_pool.
        x = tied_after_relu(0, shape)
        g = normal(1, ops.avg_pool(x, window).shape)

        @self.variant
        def three(x, g):
            def surrogate(x):
                return ops.avg_pool(x, window)
            return (ops.avg_pool_vjp(g, window, input_spatial=shape[1:3]),
                    jax.vjp(surrogate, x)[1](g)[0],
                    jax.linear_transpose(surrogate, x)(g)[0])

        explicit, reference, transpose = three(x, g)
        assert_close(explicit, reference)
        assert_close(explicit, transpose)
        # Closed form: g / window² on every position of its window.
        ho, wo = g.shape[1:3]
        spread = np.asarray(explicit)[:, : ho * window, : wo * window]
        windows = spread.reshape(2, ho, window, wo, window, 3)
        np.testing.assert_allclose(windows, np.broadcast_to(
            np.asarray(g)[:, :, None, :, None] / window**2, windows.shape), rtol=1e-6)

    @parameterized.named_parameters(*POOL_CASES)
    def test_max_pool_jvp_and_second_derivative_equal_xlas(self, shape, window):
        x, t = tied_after_relu(0, shape), normal(1, shape)
        g = normal(2, ops.max_pool(x, window).shape)
        np.testing.assert_array_equal(jax.jvp(lambda v: ops.max_pool(v, window), (x,), (t,))[1],
                                      jax.jvp(lambda v: xla_max_pool(v, window), (x,), (t,))[1])

        def vjp_norm(pool):  # a derivative of the VJP (what double back-propagation takes)
            return jax.grad(lambda v: jnp.sum(
                jax.vjp(lambda u: pool(u, window) ** 2, v)[1](g)[0] ** 2))(x)

        assert_close(vjp_norm(ops.max_pool), vjp_norm(xla_max_pool), tol=0.0)

    def test_avg_pool_is_the_window_mean_and_max_pool_the_window_max(self):
        x = normal(0, (2, 15, 17, 3))
        windows = np.asarray(x)[:, :14, :16].reshape(2, 7, 2, 8, 2, 3)
        assert_close(ops.avg_pool(x), windows.mean(axis=(2, 4)))
        assert_close(ops.max_pool(x), windows.max(axis=(2, 4)), tol=0.0)

    def test_pool_window_larger_than_input_raises(self):
        with pytest.raises(ValueError, match="larger than the input"):
            ops.max_pool(jnp.ones((1, 1, 4, 2)))


class DropoutTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_vjp_equals_jax_vjp(self):
        mask = ops.dropout_mask(jax.random.key(0), (2, 5, 5, 8), 0.5)
        x, g = normal(0, mask.shape), normal(1, mask.shape)

        @self.variant
        def both(x, g, mask):
            return ops.dropout_vjp(g, mask), jax.vjp(lambda x: ops.dropout(x, mask), x)[1](g)[0]

        explicit, reference = both(x, g, mask)
        assert_close(explicit, reference, tol=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_pseudo_vjp_is_identity_even_with_a_training_mask(self):
        # Eq. 4b ignores dropout: the pseudo chain through a dropout layer is the identity,
        # the transpose of the evaluation-mode (surrogate) dropout, whatever mask was drawn.
        mask = ops.dropout_mask(jax.random.key(0), (2, 5, 5, 8), 0.5)
        g = normal(1, mask.shape)
        stack = (L.Dropout("drop6", 0.5),)

        @self.variant
        def both(g, mask):
            pseudo = L.backward_chain({}, g, stack, derivatives="pseudo", dummies={},
                                      intermediates={L.mask_name("drop6"): mask})
            return pseudo, jax.linear_transpose(lambda x: ops.dropout(x, None), g)(g)[0]

        pseudo, transpose = both(g, mask)
        assert_close(pseudo, g, tol=0.0)
        assert_close(pseudo, transpose, tol=0.0)

    def test_dropout_mask_is_inverted_dropout(self):
        mask = np.asarray(ops.dropout_mask(jax.random.key(0), (64, 64, 8), 0.5))
        assert set(np.unique(mask)) == {0.0, 2.0}
        assert abs(mask.mean() - 1.0) < 0.02
        with pytest.raises(ValueError, match="rate"):
            ops.dropout_mask(jax.random.key(0), (2,), 1.0)


class CropAddTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_crop_vjp_equals_jax_vjp(self):
        x = normal(0, (2, 12, 14, 3))
        g = normal(1, (2, 8, 9, 3))

        @self.variant
        def both(x, g):
            def cut(x):
                return ops.crop(x, (1, 4), (8, 9))
            return ops.crop_vjp(g, (1, 4), (12, 14)), jax.vjp(cut, x)[1](g)[0]

        explicit, reference = both(x, g)
        assert_close(explicit, reference, tol=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_add_vjp_equals_jax_vjp(self):
        a, b, g = normal(0, (2, 4, 4, 3)), normal(1, (2, 4, 4, 3)), normal(2, (2, 4, 4, 3))

        @self.variant
        def both(a, b, g):
            return ops.add_vjp(g), jax.vjp(ops.add, a, b)[1](g)

        explicit, reference = both(a, b, g)
        for e, r in zip(explicit, reference):
            assert_close(e, r, tol=0.0)

    def test_crop_and_add_reject_mismatched_shapes(self):
        with pytest.raises(ValueError, match="does not fit"):
            ops.crop(jnp.ones((1, 8, 8, 1)), 4, (8, 8))
        with pytest.raises(ValueError, match="cannot fuse"):
            ops.add(jnp.ones((1, 8, 8, 1)), jnp.ones((1, 8, 9, 1)))


class RandomReluMaskTest(chex.TestCase):
    """``x_rand``: 20 % positive, one s1×s2 map repeated over channels, seeded per image."""

    # A few map sizes (each new size compiles): 1×1 up to odd, non-square maps.
    @hypothesis.settings(max_examples=15, deadline=None)
    @hypothesis.given(size=st.sampled_from([(1, 1), (3, 5), (7, 7), (13, 17)]),
                      seed=st.integers(0, 2**31 - 1),
                      fraction=st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    def test_random_relu_mask_has_exactly_the_positive_fraction(self, size, seed, fraction):
        height, width = size
        mask = np.asarray(ops.random_relu_mask(jax.random.key(seed), height, width, fraction))
        chex.assert_shape(mask, (height, width, 1))
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() == round(fraction * height * width)

    def test_random_relu_mask_defaults_to_twenty_percent(self):
        mask = ops.random_relu_mask(jax.random.key(0), 16, 16)
        assert int(mask.sum()) == round(0.2 * 256) == 51

    def test_random_relu_mask_positions_are_uniform_over_keys(self):
        keys = jax.random.split(jax.random.key(0), 400)
        masks = np.asarray(jax.vmap(lambda k: ops.random_relu_mask(k, 16, 16))(keys))
        frequency = masks.mean(axis=0)
        assert 0.1 < frequency.min() and frequency.max() < 0.3

    def test_same_key_gives_the_same_mask_and_different_keys_or_layers_differ(self):
        key = jax.random.key(7)
        same = ops.random_relu_mask(ops.relu_mask_key(key, "relu2_1"), 16, 16)
        again = ops.random_relu_mask(ops.relu_mask_key(key, "relu2_1"), 16, 16)
        other_layer = ops.random_relu_mask(ops.relu_mask_key(key, "relu2_2"), 16, 16)
        other_key = ops.random_relu_mask(ops.relu_mask_key(jax.random.key(8), "relu2_1"), 16, 16)
        np.testing.assert_array_equal(same, again)
        assert np.any(np.asarray(same) != np.asarray(other_layer))
        assert np.any(np.asarray(same) != np.asarray(other_key))

    def test_batched_masks_differ_per_image_and_match_the_per_image_mask(self):
        keys = jax.random.split(jax.random.key(3), 4)
        masks = np.asarray(ops.batched_relu_mask(keys, "relu6", 7, 7))
        chex.assert_shape(masks, (4, 7, 7, 1))
        for i in range(4):
            np.testing.assert_array_equal(
                masks[i], ops.random_relu_mask(ops.relu_mask_key(keys[i], "relu6"), 7, 7))
            for j in range(i):
                assert np.any(masks[i] != masks[j])

    def test_random_relu_mask_is_one_map_broadcast_over_channels(self):
        keys = jax.random.split(jax.random.key(3), 2)
        mask = ops.batched_relu_mask(keys, "relu3_1", 8, 8)
        g = jnp.ones((2, 8, 8, 5))
        masked = np.asarray(ops.relu_pseudo_vjp(g, "random_mask", mask=mask))
        for c in range(5):
            np.testing.assert_array_equal(masked[..., c], masked[..., 0])
        assert masked[..., 0].sum() == 2 * round(0.2 * 64)

    def test_positive_fraction_out_of_range_raises(self):
        with pytest.raises(ValueError, match="positive_fraction"):
            ops.random_relu_mask(jax.random.key(0), 4, 4, 1.5)
