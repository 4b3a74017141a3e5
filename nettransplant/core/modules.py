"""VGG-16 category module, VGG-16 classification and FCN-8s segmentation task modules.

All modules are Flax Linen, NHWC, with a width multiplier (``width=1.0`` is the
paper's VGG-16: 64-128-256-512-512 conv channels and 4096-wide fc6/fc7).

Every module offers, from one layer description:

* ``module.apply({"params": p}, x)`` — the real forward, returning
  ``(output, intermediates)`` with every layer's output by name;
* ``module.surrogate(p, x, dummy_relu=..., mask_keys=...)`` — the linearised
  forward (ReLU → identity or fixed mask, max → average pool, no dropout, no
  bias);
* ``module.pseudo_gradient(p, g, dummy_relu=..., mask_keys=...)`` — the explicit
  pseudo chain ``D'(G)`` of Eq. 4b, the dummy chosen per ReLU layer;
* ``module.real_gradient(p, g, intermediates)`` — the same chain with the real
  derivatives of the forward (Eq. 4a).

``surrogate``/``pseudo_gradient``/``real_gradient`` are plain functions of the
parameter pytree: they need no ``apply`` and can be jitted with the params as
arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nettransplant.core import layers as L
from nettransplant.core import ops, tasks
from nettransplant.core.fcn8s import FCN_UPSAMPLING, fcn8s_chain, fcn8s_forward, fcn8s_graph

Array = jax.Array
Params = Mapping[str, Any]

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_FC_WIDTH = 4096
FULL_SCALE_INPUT = 224


def scaled_channels(channels: int, width: float) -> int:
    """Channel count of a VGG layer at width multiplier ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


def category_channels(width: float) -> int:
    """Channels of ``x = f(I)``: the output of pool1 (64 at full width)."""
    return scaled_channels(VGG16_BLOCKS[0][0], width)


def default_fc6_kernel(input_size: int) -> int:
    """fc6's kernel: pool5's spatial size at the training input size (7 at 224²)."""
    return max(1, input_size // 32)


def vgg_block_layers(block: int, width: float) -> tuple[L.Layer, ...]:
    """conv{b}_1 … conv{b}_n with ReLUs and pool{b}, for block ``b`` in 1..5."""
    channels, n = VGG16_BLOCKS[block - 1]
    stack: list[L.Layer] = []
    for i in range(1, n + 1):
        stack += [L.Conv(f"conv{block}_{i}", scaled_channels(channels, width)),
                  L.ReLU(f"relu{block}_{i}")]
    stack.append(L.MaxPool(f"pool{block}"))
    return tuple(stack)


def bilinear_upsampling_kernel(size: int, channels: int) -> np.ndarray:
    """FCN's bilinear up-sampling kernel: ``(size, size, C, C)``, one filter per channel."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.arange(size)
    filt1d = 1 - np.abs(og - center) / factor
    filt = np.outer(filt1d, filt1d).astype(np.float32)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


def _check_features(x: Array, channels: int, name: str, what: str) -> None:
    """Rank, channel count and dtype of a module boundary, with a clear error."""
    expected = f"(batch, height, width, {channels})"
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} expects {what} of shape {expected}, got {shape}")
    if x.shape[-1] != channels:
        raise ValueError(
            f"{name} expects {what} of shape {expected}: got {x.shape[-1]} channels in "
            f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} expects floating-point {what} {expected}, got {x.dtype}")


class _ConvParams(nn.Module):
    """Declares a conv's ``kernel`` (HWIO) and ``bias``; the forward is functional."""

    features: int
    kernel_size: int
    kernel_init: Callable = nn.initializers.he_normal()
    bias_init: Callable = nn.initializers.zeros
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> dict[str, Array]:
        k = self.kernel_size
        p = {"kernel": self.param("kernel", self.kernel_init, (k, k, in_features, self.features))}
        if self.use_bias:
            p["bias"] = self.param("bias", self.bias_init, (self.features,))
        return p


def _declare_conv_params(layers: tuple[L.Layer, ...], in_channels: int,
                         kernel_inits: Mapping[str, Callable] | None = None) -> dict:
    """Create the ``_ConvParams`` of every conv in ``layers`` (inside a compact method)."""
    kernel_inits = kernel_inits or {}
    params = {}
    c = in_channels
    for layer in layers:
        if isinstance(layer, L.Conv):
            kwargs = {}
            if layer.name in kernel_inits:
                kwargs["kernel_init"] = kernel_inits[layer.name]
            params[layer.name] = _ConvParams(layer.features, layer.kernel_size, name=layer.name,
                                             **kwargs)(c)
            c = layer.features
    return params


class _SequentialModule(nn.Module):
    """A module that is one sequential layer stack (category and classification modules)."""

    @nn.nowrap
    def layers(self) -> tuple[L.Layer, ...]:
        raise NotImplementedError

    @nn.nowrap
    def input_channels(self) -> int:
        raise NotImplementedError

    @nn.nowrap
    def output_channels(self) -> int:
        return L.output_channels(self.layers(), self.input_channels())

    @nn.nowrap
    def relu_names(self) -> tuple[str, ...]:
        return L.relu_names(self.layers())

    @nn.nowrap
    def _check_input(self, x: Array) -> None:
        _check_features(x, self.input_channels(), type(self).__name__, "inputs")

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """Real forward. ``x``: ``(B, H, W, C_in)`` → ``(y, intermediates)``.

        With ``train=True`` dropout is active and needs the ``"dropout"`` rng.
        """
        self._check_input(x)
        params = _declare_conv_params(self.layers(), self.input_channels(), self.kernel_inits())
        dropout_key = self.make_rng("dropout") if train else None
        return L.forward(params, x, self.layers(), dropout_key=dropout_key)

    @nn.nowrap
    def kernel_inits(self) -> Mapping[str, Callable]:
        return {}

    @nn.nowrap
    def surrogate(self, params: Params, x: Array, *, dummy_relu: L.DummySpec = "identity",
                  mask_keys: Array | None = None,
                  positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
                  mask_layout: ops.MaskLayout = "repeated") -> Array:
        """Linearised forward: ``(B, H, W, C_in)`` → ``(B, h, w, C_out)``, linear in ``x``."""
        self._check_input(x)
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), type(self).__name__)
        return L.surrogate_forward(params, x, self.layers(), dummies, mask_keys=mask_keys,
                                   positive_fraction=positive_fraction,
                                   mask_layout=mask_layout)

    @nn.nowrap
    def pseudo_gradient(self, params: Params, g: Array, *,
                        dummy_relu: L.DummySpec = "identity", mask_keys: Array | None = None,
                        positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
                        mask_layout: ops.MaskLayout = "repeated") -> Array:
        """``D'(G)`` of Eq. 4b: ``(B, h, w, C_out)`` → ``(B, H, W, C_in)``.

        Depends only on the kernels, ``g`` and the ``x_rand`` masks drawn from
        ``mask_keys`` (``(B,)`` per-image keys) — never on input features or biases.
        The input size is inferred from ``g`` assuming every pool divides its
        input exactly (inputs whose sides are multiples of 16 for the task
        modules); on other sizes the dropped trailing rows are not represented.
        With ``random_mask`` on a 1×1 map, ``round(0.2 · 1) = 0`` positions are
        positive: use enlarged maps (S > 1) with that dummy above fc6, or
        ``mask_layout="per_element"`` (20 % of the channels of each position).
        """
        _check_features(g, self.output_channels(), type(self).__name__, "output gradients")
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), type(self).__name__)
        return L.backward_chain(params, g, self.layers(), derivatives="pseudo", dummies=dummies,
                                mask_keys=mask_keys, positive_fraction=positive_fraction,
                                mask_layout=mask_layout)

    @nn.nowrap
    def real_gradient(self, params: Params, g: Array,
                      intermediates: Mapping[str, Array]) -> Array:
        """The same chain with real derivatives (Eq. 4a) — equals ``jax.vjp`` of the forward."""
        _check_features(g, self.output_channels(), type(self).__name__, "output gradients")
        return L.backward_chain(params, g, self.layers(), derivatives="real",
                                intermediates=intermediates)


class CategoryModule(_SequentialModule):
    """VGG-16's first five layers: conv1_1, ReLU, conv1_2, ReLU, pool1.

    ``(B, H, W, 3)`` images → ``x = f(I)`` of shape ``(B, H/2, W/2, 64·width)``.
    """

    width: float = 1.0
    in_channels: int = 3

    @nn.nowrap
    def layers(self) -> tuple[L.Layer, ...]:
        return vgg_block_layers(1, self.width)

    @nn.nowrap
    def input_channels(self) -> int:
        return self.in_channels


class _TaskModuleFields(nn.Module):
    """Fields shared by the task modules: what sits above pool1 at a width and input size."""

    width: float = 1.0
    input_size: int = FULL_SCALE_INPUT
    dropout_rate: float = 0.5
    fc6_kernel: int | None = None
    in_channels: int | None = None

    @nn.nowrap
    def input_channels(self) -> int:
        return self.in_channels or category_channels(self.width)

    @nn.nowrap
    def fc6_size(self) -> int:
        return self.fc6_kernel or default_fc6_kernel(self.input_size)


class ClassificationTaskModule(_TaskModuleFields, _SequentialModule):
    """The rest of VGG-16, fully convolutional: conv2_1 … pool5, fc6, fc7, fc8.

    fc6 is a ``fc6_kernel``² VALID conv (7×7 at 224² input), fc7/fc8 are 1×1
    convs, so the module runs on enlarged inputs and returns a score map.

    ``(B, h, w, 64·width)`` → ``(B, S, S, num_outputs)`` with
    ``S = floor(h / 16) - fc6_kernel + 1`` (``S = 1`` at the training size).
    """

    num_outputs: int = 1
    task = tasks.CLASSIFICATION  # the task interface (loss, predictions, metric)

    @nn.nowrap
    def num_output_channels(self) -> int:
        return self.num_outputs

    @nn.nowrap
    def output_gradient_shape(self, image_size: int, score_size: int = 7
                              ) -> tuple[int, int, int]:
        """One ``G_y'``: an enlarged ``(S, S, num_outputs)`` score map (S = 7 in the paper),
        which the fully convolutional module back-propagates to an enlarged ``D'``."""
        del image_size  # the enlarged map's size is S, whatever the training input
        return (score_size, score_size, self.num_outputs)

    @nn.nowrap
    def layers(self) -> tuple[L.Layer, ...]:
        fc = scaled_channels(VGG16_FC_WIDTH, self.width)
        stack = sum((vgg_block_layers(b, self.width) for b in range(2, 6)), ())
        return stack + (
            L.Conv("fc6", fc, self.fc6_size(), "VALID"), L.ReLU("relu6"),
            L.Dropout("drop6", self.dropout_rate),
            L.Conv("fc7", fc, 1, "VALID"), L.ReLU("relu7"), L.Dropout("drop7", self.dropout_rate),
            L.Conv("fc8", self.num_outputs, 1, "VALID"),
        )

    @nn.nowrap
    def kernel_inits(self) -> Mapping[str, Callable]:
        return {"fc8": nn.initializers.normal(0.01)}

    @nn.nowrap
    def _check_input(self, x: Array) -> None:
        super()._check_input(x)
        minimum = 16 * self.fc6_size()
        if x.shape[1] < minimum or x.shape[2] < minimum:
            raise ValueError(
                f"ClassificationTaskModule expects inputs of at least {minimum}×{minimum} "
                f"(16 × fc6_kernel {self.fc6_size()}), got {tuple(x.shape)}")

    @nn.nowrap
    def enlarged_gradient_shape(self, score_size: int) -> tuple[int, int]:
        """Spatial size of ``D'`` for an ``S×S`` output gradient: ``16·(S + fc6_kernel − 1)``."""
        side = 16 * (score_size + self.fc6_size() - 1)
        return (side, side)


class SegmentationTaskModule(_TaskModuleFields):
    """FCN-8s on VGG-16's trunk above pool1.

    conv2_1 … pool5, fc6 (``fc6_kernel``² SAME), fc7, score_fr; 2× up-sampling
    fused with score_pool4, 2× fused with score_pool3, 8× back to the image size,
    with FCN's alignment crops. Score layers start at zero and up-sampling
    kernels bilinear, as in FCN.

    ``(B, h, w, 64·width)`` with ``h, w`` multiples of 16 →
    ``(B, 2h, 2w, num_classes)`` (the image size).
    """

    num_classes: int = 2
    task = tasks.SEGMENTATION  # the task interface (loss, predictions, metric)

    @nn.nowrap
    def num_output_channels(self) -> int:
        return self.num_classes

    @nn.nowrap
    def output_gradient_shape(self, image_size: int, score_size: int = 7
                              ) -> tuple[int, int, int]:
        """One ``G_y'``: the output's shape ``(H, W, num_classes)``."""
        del score_size  # only classification enlarges its output gradient
        return (image_size, image_size, self.num_classes)

    @nn.nowrap
    def stages(self) -> tuple[tuple[L.Layer, ...], ...]:
        """Three stacks: → pool3, → pool4, → score_fr (fc6…score_fr after pool5)."""
        fc = scaled_channels(VGG16_FC_WIDTH, self.width)
        fc6 = self.fc6_size()
        to_pool3 = vgg_block_layers(2, self.width) + vgg_block_layers(3, self.width)
        to_pool4 = vgg_block_layers(4, self.width)
        to_score = vgg_block_layers(5, self.width) + (
            L.Conv("fc6", fc, fc6, "SAME"), L.ReLU("relu6"), L.Dropout("drop6", self.dropout_rate),
            L.Conv("fc7", fc, 1, "VALID"), L.ReLU("relu7"), L.Dropout("drop7", self.dropout_rate),
            L.Conv("score_fr", self.num_classes, 1, "VALID"),
        )
        return to_pool3, to_pool4, to_score

    @nn.nowrap
    def skip_layers(self) -> tuple[L.Conv, L.Conv]:
        return (L.Conv("score_pool4", self.num_classes, 1, "VALID"),
                L.Conv("score_pool3", self.num_classes, 1, "VALID"))

    @nn.nowrap
    def relu_names(self) -> tuple[str, ...]:
        return sum((L.relu_names(s) for s in self.stages()), ())

    @nn.nowrap
    def _check_input(self, x: Array) -> None:
        _check_features(x, self.input_channels(), "SegmentationTaskModule", "inputs")
        if x.shape[1] % 16 or x.shape[2] % 16:
            raise ValueError(
                "SegmentationTaskModule expects inputs whose height and width are multiples of "
                f"16 (images multiples of 32), got {tuple(x.shape)}")

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """Real forward: ``(B, h, w, C)`` → ``((B, 2h, 2w, num_classes), intermediates)``."""
        self._check_input(x)
        zeros = {"score_fr": nn.initializers.zeros}
        to_pool3, to_pool4, to_score = self.stages()
        c_x = self.input_channels()
        c_pool3 = L.output_channels(to_pool3, c_x)
        c_pool4 = L.output_channels(to_pool4, c_pool3)
        params = _declare_conv_params(to_pool3, c_x)
        params |= _declare_conv_params(to_pool4, c_pool3)
        params |= _declare_conv_params(to_score, c_pool4, zeros)
        score_pool4, score_pool3 = self.skip_layers()
        params[score_pool4.name] = _ConvParams(self.num_classes, 1, nn.initializers.zeros,
                                               name=score_pool4.name)(c_pool4)
        params[score_pool3.name] = _ConvParams(self.num_classes, 1, nn.initializers.zeros,
                                               name=score_pool3.name)(c_pool3)
        for name, stride in FCN_UPSAMPLING:
            kernel = bilinear_upsampling_kernel(2 * stride, self.num_classes)
            params[name] = _ConvParams(self.num_classes, 2 * stride, lambda *_, k=kernel: k,
                                       use_bias=False, name=name)(self.num_classes)
        dropout_key = self.make_rng("dropout") if train else None
        return fcn8s_forward(params, x, self.stages(), dropout_key=dropout_key)

    @nn.nowrap
    def surrogate(self, params: Params, x: Array, *, dummy_relu: L.DummySpec = "identity",
                  mask_keys: Array | None = None,
                  positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
                  mask_layout: ops.MaskLayout = "repeated") -> Array:
        """Linearised FCN-8s: ``(B, h, w, C)`` → ``(B, 2h, 2w, num_classes)``, linear in ``x``."""
        self._check_input(x)
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), "SegmentationTaskModule")

        def stage(p, h, stack):
            return L.surrogate_forward(p, h, stack, dummies, mask_keys=mask_keys,
                                       positive_fraction=positive_fraction,
                                       mask_layout=mask_layout), {}

        return fcn8s_graph(params, x, self.stages(), stage, use_bias=False)[0]

    @nn.nowrap
    def pseudo_gradient(self, params: Params, g: Array, *,
                        dummy_relu: L.DummySpec = "identity", mask_keys: Array | None = None,
                        positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
                        mask_layout: ops.MaskLayout = "repeated") -> Array:
        """``D'(G)`` of Eq. 4b: ``(B, H, W, num_classes)`` → ``(B, H/2, W/2, C)``."""
        _check_features(g, self.num_classes, "SegmentationTaskModule", "output gradients")
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), "SegmentationTaskModule")

        def stage_chain(stack, grad, _stage_input_name):
            return L.backward_chain(params, grad, stack, derivatives="pseudo", dummies=dummies,
                                    mask_keys=mask_keys, positive_fraction=positive_fraction,
                                    mask_layout=mask_layout)

        return fcn8s_chain(params, g, self.stages(), stage_chain)

    @nn.nowrap
    def real_gradient(self, params: Params, g: Array,
                      intermediates: Mapping[str, Array]) -> Array:
        """The same chain with real derivatives (Eq. 4a) — equals ``jax.vjp`` of the forward."""
        _check_features(g, self.num_classes, "SegmentationTaskModule", "output gradients")

        def stage_chain(stack, grad, stage_input_name):
            inter = {**intermediates, "input": intermediates[stage_input_name]}
            return L.backward_chain(params, grad, stack, derivatives="real", intermediates=inter)

        return fcn8s_chain(params, g, self.stages(), stage_chain)


class Teacher(nn.Module):
    """One category module + a classification and a segmentation task module (Fig. 4a).

    ``images (B, H, W, 3)`` → ``({"classification": (B, S, S, K),
    "segmentation": (B, H, W, C)}, intermediates)`` where ``intermediates`` has the
    keys ``"category_module"``, ``"classification_module"``,
    ``"segmentation_module"``, each a dict of that module's layer outputs.
    """

    category_module: CategoryModule
    classification_module: ClassificationTaskModule
    segmentation_module: SegmentationTaskModule

    def __call__(self, images: Array, *, train: bool = False):
        x, cat_inter = self.category_module(images, train=train)
        y_cls, cls_inter = self.classification_module(x, train=train)
        y_seg, seg_inter = self.segmentation_module(x, train=train)
        return ({"classification": y_cls, "segmentation": y_seg},
                {"category_module": cat_inter, "classification_module": cls_inter,
                 "segmentation_module": seg_inter})


def make_teacher(*, width: float = 1.0, input_size: int = FULL_SCALE_INPUT,
                 num_outputs: int = 1, num_classes: int = 2,
                 dropout_rate: float = 0.5) -> Teacher:
    """A :class:`Teacher` whose modules agree on width and input size."""
    return Teacher(
        category_module=CategoryModule(width=width),
        classification_module=ClassificationTaskModule(
            width=width, input_size=input_size, num_outputs=num_outputs,
            dropout_rate=dropout_rate),
        segmentation_module=SegmentationTaskModule(
            width=width, input_size=input_size, num_classes=num_classes,
            dropout_rate=dropout_rate),
    )
