"""Sequential layer stacks: real forward, linearised surrogate, explicit backward chains.

A stack is a tuple of layer specs (:class:`Conv`, :class:`ReLU`, :class:`MaxPool`,
:class:`Dropout`). Parameters are a dict ``{conv_name: {"kernel", "bias"}}``.
Three pure functions walk a stack:

* :func:`forward` — the real network, returning the output and every layer's
  output by name (``"input"`` is the stack's input);
* :func:`surrogate_forward` — the linearised network whose transpose is the
  pseudo chain: ReLU → identity or fixed ``x_rand`` mask (one s1×s2 map repeated
  over channels, or drawn per element: ``mask_layout``), max → average pool,
  no dropout, no bias;
* :func:`backward_chain` — the explicit chain of op VJPs from an output gradient
  down to the input, with real derivatives (Eq. 4a, needs the forward's
  intermediates) or pseudo derivatives (Eq. 4b, needs nothing but the kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import jax

from nettransplant.core import ops

Array = jax.Array
Params = Mapping[str, Mapping[str, Array]]
DummySpec = str | Mapping[str, str]
Derivatives = Literal["real", "pseudo"]

DUMMY_CHOICES = ("identity", "random_mask")


@dataclasses.dataclass(frozen=True)
class Conv:
    """Stride-1 convolution with bias; ``padding`` as in :func:`ops.conv2d`."""

    name: str
    features: int
    kernel_size: int = 3
    padding: ops.Padding = "SAME"


@dataclasses.dataclass(frozen=True)
class ReLU:
    name: str


@dataclasses.dataclass(frozen=True)
class MaxPool:
    name: str
    window: int = 2


@dataclasses.dataclass(frozen=True)
class Dropout:
    name: str
    rate: float = 0.5


Layer = Conv | ReLU | MaxPool | Dropout


def output_channels(layers: tuple[Layer, ...], in_channels: int) -> int:
    """Channels a stack outputs (those of its last conv; ``in_channels`` if it has none)."""
    convs = [layer for layer in layers if isinstance(layer, Conv)]
    return convs[-1].features if convs else in_channels


def mask_name(layer_name: str) -> str:
    """Intermediates key of a dropout layer's mask (present in training mode only)."""
    return f"{layer_name}_mask"


def relu_names(layers: tuple[Layer, ...]) -> tuple[str, ...]:
    return tuple(layer.name for layer in layers if isinstance(layer, ReLU))


def resolve_dummies(dummy_relu: DummySpec, names: tuple[str, ...], owner: str) -> dict[str, str]:
    """Per-ReLU dummy choice from a single name or a ``{relu_name | "default": dummy}`` map.

    Raises:
      ValueError: naming an unknown ReLU layer, a missing one, or a bad dummy.
    """
    if isinstance(dummy_relu, str):
        choice = {name: dummy_relu for name in names}
    else:
        unknown = sorted(set(dummy_relu) - set(names) - {"default"})
        if unknown:
            raise ValueError(
                f"dummy_relu names {unknown} that are not ReLU layers of the {owner}; "
                f"its ReLU layers are {list(names)} (or use 'default')")
        default = dummy_relu.get("default")
        missing = [n for n in names if n not in dummy_relu and default is None]
        if missing:
            raise ValueError(
                f"dummy_relu gives no dummy for ReLU layers {missing} of the {owner} "
                "and no 'default'")
        choice = {n: dummy_relu.get(n, default) for n in names}
    for name, dummy in choice.items():
        if dummy not in DUMMY_CHOICES:
            raise ValueError(
                f"dummy for ReLU layer {name!r} must be one of {DUMMY_CHOICES}, got {dummy!r}")
    return choice


def _check_mask_keys(mask_keys: Array | None, batch: int, dummies: Mapping[str, str]) -> None:
    if "random_mask" not in dummies.values():
        return
    if mask_keys is None:
        layers = [n for n, d in dummies.items() if d == "random_mask"]
        raise ValueError(f"dummy 'random_mask' at {layers} needs per-image mask_keys")
    if mask_keys.shape[0] != batch:
        raise ValueError(
            f"mask_keys must hold one key per image: expected leading dimension {batch}, "
            f"got shape {mask_keys.shape}")


def forward(
    params: Params, x: Array, layers: tuple[Layer, ...], *,
    dropout_key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The real forward pass of a stack.

    Args:
      params: ``{conv_name: {"kernel": (k, k, C_in, C_out), "bias": (C_out,)}}``.
      x: ``(B, H, W, C)``.
      dropout_key: enables dropout (training mode); None = evaluation mode.
    Returns:
      ``(y, intermediates)`` with every layer's output under its name, the input
      under ``"input"`` and dropout masks under ``"<name>_mask"``.
    """
    inter: dict[str, Array] = {"input": x}
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv):
            p = params[layer.name]
            x = ops.conv2d(x, p["kernel"], p["bias"], padding=layer.padding)
        elif isinstance(layer, ReLU):
            x = ops.relu(x)
        elif isinstance(layer, MaxPool):
            x = ops.max_pool(x, layer.window)
        elif isinstance(layer, Dropout):
            if dropout_key is not None and layer.rate > 0:
                mask = ops.dropout_mask(jax.random.fold_in(dropout_key, i), x.shape, layer.rate)
                inter[mask_name(layer.name)] = mask
                x = ops.dropout(x, mask)
        else:  # pragma: no cover - exhaustive over Layer
            raise TypeError(f"unknown layer {layer!r}")
        inter[layer.name] = x
    return x, inter


def surrogate_forward(
    params: Params, x: Array, layers: tuple[Layer, ...], dummies: Mapping[str, str], *,
    mask_keys: Array | None = None, positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
    mask_layout: ops.MaskLayout = "repeated",
) -> Array:
    """The linearised stack whose transpose is the pseudo chain (Eq. 4b).

    ReLU → identity or ``x * 1(x_rand > 0)``; max → average pool; no dropout; no
    bias. Linear in ``x``; ``jax.vjp``/``jax.linear_transpose`` of it equals
    :func:`backward_chain` with ``derivatives="pseudo"``.
    """
    _check_mask_keys(mask_keys, x.shape[0], dummies)
    for layer in layers:
        if isinstance(layer, Conv):
            x = ops.conv2d(x, params[layer.name]["kernel"], padding=layer.padding)
        elif isinstance(layer, ReLU):
            if dummies[layer.name] == "random_mask":
                x = x * ops.batched_relu_mask(
                    mask_keys, layer.name, x.shape[1], x.shape[2], positive_fraction,
                    ops.mask_channels(mask_layout, x.shape[3]))
        elif isinstance(layer, MaxPool):
            x = ops.avg_pool(x, layer.window)
    return x


def backward_chain(
    params: Params, g: Array, layers: tuple[Layer, ...], *, derivatives: Derivatives,
    dummies: Mapping[str, str] | None = None, intermediates: Mapping[str, Array] | None = None,
    mask_keys: Array | None = None, positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION,
    mask_layout: ops.MaskLayout = "repeated",
) -> Array:
    """Run the explicit chain of op VJPs from ``g`` (w.r.t. the output) down to the input.

    Args:
      g: ``(B, h, w, C_out)`` gradient w.r.t. the stack's output; for the pseudo
        chain any spatial size the stack admits (e.g. enlarged maps).
      derivatives: ``"real"`` (Eq. 4a: ReLU masks, arg-max routing and dropout
        masks from ``intermediates``) or ``"pseudo"`` (Eq. 4b: dummies, average
        pool derivative, dropout ignored; ``intermediates`` unused).
      dummies: per-ReLU dummy, for ``"pseudo"`` (see :func:`resolve_dummies`).
      mask_keys: ``(B,)`` per-image keys, needed when a dummy is ``random_mask``.
      positive_fraction, mask_layout: the ``x_rand`` masks' share of positive
        entries and layout (:func:`ops.random_relu_mask`, :func:`ops.mask_channels`).
    Returns:
      ``(B, H, W, C_in)`` gradient w.r.t. the stack's input.
    """
    if derivatives == "real":
        if intermediates is None:
            raise ValueError("the chain with real derivatives needs the forward's intermediates")
    elif derivatives == "pseudo":
        if dummies is None:
            raise ValueError("the pseudo chain needs a dummy per ReLU layer")
        _check_mask_keys(mask_keys, g.shape[0], dummies)
    else:
        raise ValueError(f"derivatives must be 'real' or 'pseudo', got {derivatives!r}")

    names = ["input"] + [layer.name for layer in layers]
    for i in reversed(range(len(layers))):
        layer = layers[i]
        x_in = intermediates[names[i]] if derivatives == "real" else None
        if isinstance(layer, Conv):
            spatial = x_in.shape[1:3] if x_in is not None else None
            g = ops.conv2d_vjp(g, params[layer.name]["kernel"], input_spatial=spatial,
                               padding=layer.padding)
        elif isinstance(layer, ReLU):
            if derivatives == "real":
                g = ops.relu_vjp(g, x_in)
            else:
                dummy = dummies[layer.name]
                mask = None
                if dummy == "random_mask":
                    mask = ops.batched_relu_mask(
                        mask_keys, layer.name, g.shape[1], g.shape[2], positive_fraction,
                        ops.mask_channels(mask_layout, g.shape[3]))
                g = ops.relu_pseudo_vjp(g, dummy, mask=mask)
        elif isinstance(layer, MaxPool):
            if derivatives == "real":
                g = ops.max_pool_vjp(g, x_in, layer.window)
            else:  # Eq. 4b: the average-pool derivative replaces max-pool's.
                g = ops.avg_pool_vjp(g, layer.window)
        elif isinstance(layer, Dropout):
            if derivatives == "real":
                g = ops.dropout_vjp(g, intermediates.get(mask_name(layer.name)))
            # Eq. 4b: dropout is ignored by the pseudo chain.
    return g

