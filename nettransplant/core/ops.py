"""Functional ops, each with a forward, an explicit real VJP and a pseudo VJP.

Layout: activations are NHWC, convolution kernels HWIO (``kernel[i, j, c_in, c_out]``).

Every backward function here is written as an explicit linear map of the output
gradient ``g`` (no ``jax.vjp`` inside), so that the pseudo-gradient chain of the
paper (Eq. 4b) is a composition of these maps:

* convolution: ``f'_conv(G) = G ⊗ W`` with the flipped, in/out-swapped kernel
  (paper appendix), i.e. a transposed convolution, no bias;
* ReLU: real derivative ``g * 1(x > 0)``; dummy 1st = identity; dummy 2nd =
  ``g * 1(x_rand > 0)`` with one random s1×s2 map repeated over channels
  (``"repeated"``), or drawn entry by entry over s1×s2×s3 (``"per_element"``);
* max-pool: real = arg-max routing; pseudo = average-pool derivative;
* average pool, crop, add, transposed convolution: linear, pseudo = real;
* dropout: real = the forward mask; pseudo = identity.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = str | int | Sequence[tuple[int, int]]
DummyReLU = Literal["identity", "random_mask"]
MaskLayout = Literal["repeated", "per_element"]
MASK_LAYOUTS: tuple[str, ...] = ("repeated", "per_element")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
DEFAULT_POSITIVE_FRACTION = 0.2


# --------------------------------------------------------------------------- padding


def resolve_padding(
    padding: Padding, kernel_size: tuple[int, int], strides: tuple[int, int] = (1, 1),
    input_spatial: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ``((top, bottom), (left, right))`` padding for a 2-D window op.

    Args:
      padding: ``"SAME"``, ``"VALID"``, an int (same on every side) or two
        ``(low, high)`` pairs.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``; with ``"SAME"`` and strides > 1 ``input_spatial`` is
        needed (XLA's rule: output = ceil(input / stride)).
      input_spatial: ``(H, W)`` of the input, only for strided ``"SAME"``.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode != "SAME":
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        if strides == (1, 1):
            return tuple((  # type: ignore[return-value]
                (k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
        if input_spatial is None:
            raise ValueError("strided 'SAME' padding needs the input's spatial size")
        pads = lax.padtype_to_pads(input_spatial, kernel_size, strides, "SAME")
        return tuple(tuple(p) for p in pads)  # type: ignore[return-value]
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    try:
        pairs = tuple(tuple(int(v) for v in p) for p in padding)
    except TypeError:
        pairs = ()
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"explicit padding must be two (low, high) pairs, got {padding!r}")
    return pairs  # type: ignore[return-value]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


# --------------------------------------------------------------------------- convolution


def conv2d(
    x: Array, kernel: Array, bias: Array | None = None, *, strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
) -> Array:
    """Cross-correlation ``y = x ⋆ w + b`` (what deep-learning frameworks call conv).

    Args:
      x: ``(B, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)``.
      bias: ``(C_out,)`` or None.
    Returns:
      ``(B, H', W', C_out)``.
    """
    s = _pair(strides)
    pads = resolve_padding(padding, kernel.shape[:2], s, x.shape[1:3])
    if s == (1, 1) and _kernel_outgrows_input(kernel.shape[:2], x.shape[1:3], pads):
        y = _conv2d_as_matmul(x, kernel, pads)
    else:
        y = lax.conv_general_dilated(
            x, kernel, window_strides=s, padding=pads, dimension_numbers=_DIMENSION_NUMBERS,
            precision=lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias
    return y


def _kernel_outgrows_input(kernel_size: tuple[int, int], input_spatial: tuple[int, int],
                           pads: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """A stride-1 conv whose window is larger than its input (VGG's conv5 on a 2×2 map).

    XLA's CPU compiler swaps the operands of such a convolution and runs it, and
    its transpose, in a generic loop ~10× slower per FLOP than a matmul.
    """
    return (any(k > n for k, n in zip(kernel_size, input_spatial))
            and all(lo >= 0 and hi >= 0 and n + lo + hi >= k
                    for k, n, (lo, hi) in zip(kernel_size, input_spatial, pads)))


def _conv2d_as_matmul(x: Array, kernel: Array,
                      pads: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """A stride-1 correlation as one matmul of the ``kh·kw·C_in`` patches (im2col).

    The same products as :func:`lax.conv_general_dilated`, summed in another
    order (float32 rounding differs, ~1e-7 relative).
    """
    kh, kw, c_in, c_out = kernel.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)],
                              axis=-1)  # (B, H', W', kh·kw·C_in), ordered like the kernel
    return jnp.einsum("bhwp,po->bhwo", patches, kernel.reshape(kh * kw * c_in, c_out),
                      precision=lax.Precision.HIGHEST)


def flip_and_swap(kernel: Array) -> Array:
    """``W[i, j, k, l] = w[m+1-i, m+1-j, l, k]`` (paper appendix): flipped, in/out swapped."""
    return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


def conv2d_input_shape(
    output_spatial: tuple[int, int], kernel_size: tuple[int, int], padding: Padding,
) -> tuple[int, int]:
    """Input ``(H, W)`` of a stride-1 convolution that produced ``output_spatial``."""
    pads = resolve_padding(padding, kernel_size)
    return tuple(  # type: ignore[return-value]
        m + k - 1 - lo - hi for m, k, (lo, hi) in zip(output_spatial, kernel_size, pads))


def conv2d_vjp(
    g: Array, kernel: Array, *, input_spatial: tuple[int, int] | None = None,
    strides: int | Sequence[int] = 1, padding: Padding = "SAME",
) -> Array:
    """``f'_conv``: gradient w.r.t. a convolution's input, as an explicit transposed conv.

    The output gradient is dilated by the stride, padded by ``k - 1 - pad`` and
    correlated with the flipped, in/out-swapped kernel. It depends only on the
    kernel: biases and input features never enter (paper appendix).

    Args:
      g: ``(B, H', W', C_out)`` gradient w.r.t. the conv output.
      kernel: ``(kh, kw, C_in, C_out)``.
      input_spatial: ``(H, W)`` of the forward input; inferred for stride 1.
    Returns:
      ``(B, H, W, C_in)``.
    """
    s = _pair(strides)
    ksize = kernel.shape[:2]
    if input_spatial is None:
        if s != (1, 1):
            raise ValueError("conv2d_vjp with strides > 1 needs input_spatial")
        input_spatial = conv2d_input_shape(g.shape[1:3], ksize, padding)
    pads = resolve_padding(padding, ksize, s, input_spatial)
    back_pads = []
    for n, m, k, stride, (lo, _) in zip(input_spatial, g.shape[1:3], ksize, s, pads):
        # The dilated, padded gradient must have length n + k - 1.
        a = k - 1 - lo
        b = n + k - 1 - ((m - 1) * stride + 1) - a
        back_pads.append((a, b))
    return lax.conv_general_dilated(
        g, flip_and_swap(kernel), window_strides=(1, 1), padding=back_pads, lhs_dilation=s,
        dimension_numbers=_DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)


def conv2d_transpose(
    x: Array, kernel: Array, *, strides: int | Sequence[int] = 2,
    padding: Padding = "VALID",
) -> Array:
    """Transposed convolution (learned up-sampling, FCN's ``Deconvolution``), no bias.

    Defined as the input-gradient map of a strided conv whose kernel, seen from
    the up-sampled side, is ``kernel``: output size ``(n - 1) * s + k - lo - hi``.

    Args:
      x: ``(B, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)`` — ``kernel[..., c, d]`` spreads input
        channel ``c`` into output channel ``d``.
      padding: removed from the full output (``"VALID"`` = none), like
        Caffe's/PyTorch's ``padding``.
    Returns:
      ``(B, (H-1)s + kh - pad, (W-1)s + kw - pad, C_out)``.
    """
    s = _pair(strides)
    ksize = kernel.shape[:2]
    pads = resolve_padding(padding, ksize)
    fwd_pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(ksize, pads)]
    return lax.conv_general_dilated(
        x, kernel[::-1, ::-1], window_strides=(1, 1), padding=fwd_pads, lhs_dilation=s,
        dimension_numbers=_DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)


def conv2d_transpose_vjp(
    g: Array, kernel: Array, *, strides: int | Sequence[int] = 2,
    padding: Padding = "VALID",
) -> Array:
    """Gradient w.r.t. the input of :func:`conv2d_transpose`: a strided correlation.

    Args:
      g: ``(B, H_out, W_out, C_out)``.
      kernel: ``(kh, kw, C_in, C_out)``.
    Returns:
      ``(B, H, W, C_in)`` with ``H = (H_out + pad - kh) / s + 1``.
    """
    s = _pair(strides)
    pads = resolve_padding(padding, kernel.shape[:2])
    # The forward correlates the dilated input with the flipped kernel; its
    # transpose correlates g with the unflipped, in/out-swapped kernel, strided.
    return lax.conv_general_dilated(
        g, jnp.swapaxes(kernel, 2, 3), window_strides=s, padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)


# --------------------------------------------------------------------------- ReLU


def relu(x: Array) -> Array:
    """``max(x, 0)``, whose JAX derivative at ``x == 0`` is 0 like :func:`relu_vjp`.

    ``jnp.maximum(x, 0)`` would differentiate to 0.5 at exact zeros (e.g. zero
    backgrounds with zero biases), breaking Eq. 4a's ``real chain == jax.vjp``.
    """
    return jax.nn.relu(x)


def relu_vjp(g: Array, x: Array) -> Array:
    """Real ReLU derivative (Eq. 4a): ``g * 1(x > 0)`` with ``x`` the forward input."""
    return jnp.where(x > 0, g, jnp.zeros_like(g))


def relu_mask_key(key: Array, layer_name: str) -> Array:
    """The key of layer ``layer_name``'s ``x_rand``, derived from a per-image key.

    Student and teacher task modules share layer names, so the same per-image
    key gives them the same ``x_rand`` at the same layer (paper Sec. 3).
    """
    return jax.random.fold_in(key, zlib.crc32(layer_name.encode()) & 0x7FFFFFFF)


def random_relu_mask(
    key: Array, height: int, width: int, positive_fraction: float = DEFAULT_POSITIVE_FRACTION,
    channels: int = 1,
) -> Array:
    """``1(x_rand > 0)`` for one image: an ``(H, W, channels)`` 0/1 float map.

    Exactly ``round(positive_fraction * H * W * channels)`` entries are positive
    (20 % in the paper). With ``channels=1`` (the default), ``x_rand = [x', x', …,
    x']`` repeats one s1×s2 map over channels: the mask is drawn once per
    position and broadcast over the layer's channels. With ``channels=C`` every
    entry of the s1×s2×s3 map is drawn, so a position keeps about 20 % of its
    channels — on a 1×1 map too, where a repeated 20 % mask is all-off.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    n = height * width * channels
    positives = int(round(positive_fraction * n))
    ranks = jnp.argsort(jax.random.uniform(key, (n,)))
    mask = jnp.zeros((n,), jnp.float32).at[ranks[:positives]].set(1.0)
    return mask.reshape(height, width, channels)


def mask_channels(layout: MaskLayout, channels: int) -> int:
    """The channels an ``x_rand`` mask of ``layout`` is drawn over at a layer of ``channels``.

    ``"repeated"``: 1 (one map broadcast over channels); ``"per_element"``: ``channels``.
    """
    if layout == "repeated":
        return 1
    if layout == "per_element":
        return channels
    raise ValueError(f"mask_layout must be one of {MASK_LAYOUTS}, got {layout!r}")


def batched_relu_mask(
    keys: Array, layer_name: str, height: int, width: int,
    positive_fraction: float = DEFAULT_POSITIVE_FRACTION, channels: int = 1,
) -> Array:
    """``(B, H, W, channels)`` masks of layer ``layer_name``, one per per-image key in ``keys``."""
    return jax.vmap(
        lambda k: random_relu_mask(relu_mask_key(k, layer_name), height, width,
                                   positive_fraction, channels))(keys)


def relu_pseudo_vjp(
    g: Array, dummy: DummyReLU, *, mask: Array | None = None,
) -> Array:
    """Dummy ReLU derivative of Eq. 4b.

    Args:
      g: ``(B, H, W, C)``.
      dummy: ``"identity"`` (1st dummy, ``f'(G) = G``) or ``"random_mask"``
        (2nd dummy, ``f'(G) = G ⊙ 1(x_rand > 0)``).
      mask: ``(B, H, W, 1)`` (broadcast over channels) or ``(B, H, W, C)`` 0/1 map,
        required for ``"random_mask"``.
    """
    if dummy == "identity":
        return g
    if dummy == "random_mask":
        if mask is None:
            raise ValueError("dummy 'random_mask' needs the x_rand mask")
        return g * mask.astype(g.dtype)
    raise ValueError(f"dummy ReLU must be 'identity' or 'random_mask', got {dummy!r}")


# --------------------------------------------------------------------------- pooling


def _check_pool(x_spatial: tuple[int, int], window: int) -> None:
    if window < 1:
        raise ValueError(f"pool window must be >= 1, got {window}")
    if any(n < window for n in x_spatial):
        raise ValueError(f"pool window {window} larger than the input {tuple(x_spatial)}")


def max_pool(x: Array, window: int = 2) -> Array:
    """Non-overlapping max pooling (window = stride, VALID: trailing rows dropped).

    Its derivative routes each window's tangent or gradient to the window's first
    maximum in row-major order, as XLA's ``select_and_scatter`` does
    (:func:`max_pool_vjp`), and is computed from that arg-max: on CPU 3-6× faster
    than differentiating ``reduce_window`` and bit-identical to it.
    """
    _check_pool(x.shape[1:3], window)
    return _max_pool(x, window)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool(x: Array, window: int) -> Array:
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, window, window, 1), "VALID")


@_max_pool.defjvp
def _max_pool_jvp(window: int, primals, tangents):
    (x,), (t,) = primals, tangents
    return _max_pool(x, window), jnp.sum(_first_max(x, window, t.dtype) * _windows(t, window),
                                         axis=3)


def _windows(x: Array, window: int) -> Array:
    """``(B, H, W, C)`` → ``(B, H/window, W/window, window², C)``, each window row-major."""
    b, h, w, c = x.shape
    ho, wo = h // window, w // window
    windows = x[:, : ho * window, : wo * window].reshape(b, ho, window, wo, window, c)
    return windows.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, window * window, c)


def _first_max(x: Array, window: int, dtype) -> Array:
    """One-hot ``(B, H/window, W/window, window², C)`` of each window's first maximum."""
    return jax.nn.one_hot(jnp.argmax(_windows(x, window), axis=3), window * window, axis=3,
                          dtype=dtype)


def avg_pool(x: Array, window: int = 2) -> Array:
    """Non-overlapping average pooling (window = stride, VALID)."""
    _check_pool(x.shape[1:3], window)
    total = lax.reduce_window(
        x, 0.0, lax.add, (1, window, window, 1), (1, window, window, 1), "VALID")
    return total / (window * window)


def _unpool(values: Array, window: int, input_spatial: tuple[int, int]) -> Array:
    """Repeat each pooled value over its window and zero-pad dropped trailing rows."""
    up = jnp.repeat(jnp.repeat(values, window, axis=1), window, axis=2)
    h, w = input_spatial
    return jnp.pad(up, ((0, 0), (0, h - up.shape[1]), (0, w - up.shape[2]), (0, 0)))


def avg_pool_vjp(
    g: Array, window: int = 2, *, input_spatial: tuple[int, int] | None = None,
) -> Array:
    """Average-pool derivative: ``g / window²`` spread over each window.

    Used for average pooling, and as the pseudo derivative of max pooling
    (Eq. 4b). ``input_spatial`` defaults to ``window ×`` the gradient's size.
    """
    if input_spatial is None:
        input_spatial = (g.shape[1] * window, g.shape[2] * window)
    return _unpool(g / (window * window), window, input_spatial)


def max_pool_vjp(g: Array, x: Array, window: int = 2) -> Array:
    """Real max-pool derivative: ``g`` routed to the arg-max of each window.

    Ties go to the first maximum in row-major window order, as XLA's
    ``select_and_scatter`` does.

    Args:
      g: ``(B, H/window, W/window, C)``.
      x: ``(B, H, W, C)`` the forward input.
    """
    b, h, w, c = x.shape
    ho, wo = h // window, w // window
    routed = _first_max(x, window, g.dtype) * g[:, :, :, None, :]
    routed = routed.reshape(b, ho, wo, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    routed = routed.reshape(b, ho * window, wo * window, c)
    return jnp.pad(routed, ((0, 0), (0, h - ho * window), (0, w - wo * window), (0, 0)))


# --------------------------------------------------------------------------- dropout


def dropout_mask(key: Array, shape: Sequence[int], rate: float) -> Array:
    """Inverted-dropout multiplier: ``1(keep) / (1 - rate)``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    return keep.astype(jnp.float32) / (1.0 - rate)


def dropout(x: Array, mask: Array | None) -> Array:
    """``x * mask`` (``mask`` from :func:`dropout_mask`); None = evaluation mode."""
    return x if mask is None else x * mask.astype(x.dtype)  # keeps bfloat16 activations


def dropout_vjp(g: Array, mask: Array | None) -> Array:
    """Real dropout derivative: the same mask. The pseudo derivative ignores dropout."""
    return g if mask is None else g * mask


# --------------------------------------------------------------------------- crop / add


def crop(x: Array, offset: int | Sequence[int], size: Sequence[int]) -> Array:
    """``x[:, oy:oy+h, ox:ox+w]`` — FCN's alignment crop after up-sampling."""
    oy, ox = _pair(offset)
    h, w = size
    if oy < 0 or ox < 0 or oy + h > x.shape[1] or ox + w > x.shape[2]:
        raise ValueError(
            f"crop of size {(h, w)} at offset {(oy, ox)} does not fit a {x.shape[1:3]} map")
    return x[:, oy: oy + h, ox: ox + w]


def crop_vjp(g: Array, offset: int | Sequence[int], input_spatial: Sequence[int]) -> Array:
    """Gradient of :func:`crop`: zero-pad ``g`` back to the input's size."""
    oy, ox = _pair(offset)
    h, w = input_spatial
    return jnp.pad(g, ((0, 0), (oy, h - oy - g.shape[1]), (ox, w - ox - g.shape[2]), (0, 0)))


def add(a: Array, b: Array) -> Array:
    """Skip fusion ``a + b`` (FCN's ``fuse_pool4`` / ``fuse_pool3``)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot fuse maps of shapes {a.shape} and {b.shape}")
    return a + b


def add_vjp(g: Array) -> tuple[Array, Array]:
    """Gradient of :func:`add`: the same ``g`` flows into both branches."""
    return g, g
