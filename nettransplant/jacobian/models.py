"""Small image classifiers for Jacobian matching: a conv trunk and one or more linear heads.

A :class:`ConvClassifier` is a :mod:`nettransplant.core.layers` stack (the trunk,
whose every layer output is a named intermediate, e.g. ``pool1``) followed by
linear heads on the flattened trunk output, one per task (``"new"``, ``"old"``
in transfer learning). Parameters are a plain pytree::

    {"trunk": {conv_name: {"kernel", "bias"}}, "heads": {head: {"kernel", "bias"}}}

so every function of them can be jitted with the parameters as arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from nettransplant.core import layers as L

Array = jax.Array
Params = Mapping[str, Any]


def vgg_style_trunk(block_channels: Sequence[int], convs_per_block: int,
                    hidden: int, final_spatial: int) -> tuple[L.Layer, ...]:
    """VGG-style trunk: blocks of ``convs_per_block`` 3×3 conv + ReLU, then a 2×2 max-pool.

    Block ``b`` (1-based) names its layers ``conv{b}_{i}``, ``relu{b}_{i}`` and
    ``pool{b}``; a final ``fc`` (a VALID conv over the whole ``final_spatial``²
    map, i.e. a dense layer) + ``relu_fc`` gives ``hidden`` features.
    """
    stack: list[L.Layer] = []
    for b, channels in enumerate(block_channels, start=1):
        for i in range(1, convs_per_block + 1):
            stack += [L.Conv(f"conv{b}_{i}", int(channels)), L.ReLU(f"relu{b}_{i}")]
        stack.append(L.MaxPool(f"pool{b}"))
    stack += [L.Conv("fc", int(hidden), kernel_size=int(final_spatial), padding="VALID"),
              L.ReLU("relu_fc")]
    return tuple(stack)


@dataclasses.dataclass(frozen=True)
class ConvClassifier:
    """A conv trunk and linear heads ``{name: num_classes}`` on its flattened output.

    Attributes:
      trunk: the layer stack; its output must be ``(B, 1, 1, hidden)`` or any
        map (it is flattened).
      heads: classes per head, e.g. ``{"logits": 10}`` or ``{"new": 5, "old": 5}``.
      image_size: input height = width.
      in_channels: input channels (1 for silhouettes).
    """

    trunk: tuple[L.Layer, ...]
    heads: tuple[tuple[str, int], ...]
    image_size: int = 28
    in_channels: int = 1

    @property
    def head_sizes(self) -> dict[str, int]:
        return dict(self.heads)

    def features_dim(self) -> int:
        """Length of the flattened trunk output (what the heads read)."""
        x = jnp.zeros((1, self.image_size, self.image_size, self.in_channels), jnp.float32)
        shapes = jax.eval_shape(lambda p: L.forward(p, x, self.trunk)[0],
                                _trunk_shapes(self.trunk, self.in_channels))
        return math.prod(shapes.shape[1:])

    def init(self, key: Array) -> dict[str, Any]:
        """He-normal kernels, zero biases (seeded by ``key``)."""
        he = jax.nn.initializers.he_normal()
        trunk, c = {}, self.in_channels
        keys = jax.random.split(key, len(self.trunk) + len(self.heads))
        for k, layer in zip(keys, self.trunk):
            if isinstance(layer, L.Conv):
                shape = (layer.kernel_size, layer.kernel_size, c, layer.features)
                trunk[layer.name] = {"kernel": he(k, shape, jnp.float32),
                                     "bias": jnp.zeros((layer.features,), jnp.float32)}
                c = layer.features
        dim = self.features_dim()
        heads = {name: self.init_head(k, name, dim)
                 for k, (name, _) in zip(keys[len(self.trunk):], self.heads)}
        return {"trunk": trunk, "heads": heads}

    def init_head(self, key: Array, name: str, features_dim: int | None = None) -> dict:
        """A fresh head ``name``: kernel ``(features, classes)`` (LeCun normal), zero bias."""
        dim = features_dim or self.features_dim()
        classes = self.head_sizes[name]
        return {"kernel": jax.nn.initializers.lecun_normal()(key, (dim, classes), jnp.float32),
                "bias": jnp.zeros((classes,), jnp.float32)}

    def apply(self, params: Params, images: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        """Forward pass.

        Args:
          params: ``{"trunk", "heads"}`` as made by :meth:`init`.
          images: ``(B, H, W, C)`` float.
        Returns:
          ``(logits, intermediates)``: ``{head: (B, K_head)}`` and every trunk
          layer's output by name (``"input"``, ``"pool1"``, …).
        """
        chex.assert_rank(images, 4)
        features, inter = L.forward(params["trunk"], images, self.trunk)
        flat = features.reshape(features.shape[0], -1)
        logits = {name: flat @ params["heads"][name]["kernel"] + params["heads"][name]["bias"]
                  for name, _ in self.heads}
        return logits, inter

    def logits(self, params: Params, images: Array, head: str) -> Array:
        """``(B, K)`` logits of one head."""
        return self.apply(params, images)[0][head]


def _trunk_shapes(trunk: tuple[L.Layer, ...], in_channels: int) -> dict:
    shapes, c = {}, in_channels
    for layer in trunk:
        if isinstance(layer, L.Conv):
            k = layer.kernel_size
            shapes[layer.name] = {
                "kernel": jax.ShapeDtypeStruct((k, k, c, layer.features), jnp.float32),
                "bias": jax.ShapeDtypeStruct((layer.features,), jnp.float32)}
            c = layer.features
    return shapes


def make_classifier(spec: Mapping[str, Any], heads: Mapping[str, int], image_size: int,
                    in_channels: int = 1) -> ConvClassifier:
    """A :class:`ConvClassifier` from a config spec.

    Args:
      spec: ``block_channels`` (per block), ``convs_per_block``, ``hidden``.
      heads: ``{name: num_classes}``.
    """
    blocks = tuple(int(c) for c in spec["block_channels"])
    final = image_size
    for _ in blocks:
        final //= 2
    trunk = vgg_style_trunk(blocks, int(spec["convs_per_block"]), int(spec["hidden"]), final)
    return ConvClassifier(trunk=trunk, heads=tuple((k, int(v)) for k, v in heads.items()),
                          image_size=image_size, in_channels=in_channels)
