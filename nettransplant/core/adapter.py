"""The adapter ``h``: reorder, re-scale by β, then ``n`` × [conv + ReLU] (paper Sec. 3).

``h(x) = relu(conv_n(… relu(conv_1(β · x[..., perm])) …))`` with ``M`` = the
channels of ``x`` filters per conv, 1×1 or 3×3 (pad 1) kernels. The reorder is a
fixed, seeded channel permutation that mimics unrelated category modules; β is a
fixed scalar computed before training (see :mod:`nettransplant.transplant.objectives`) and
passed in, so the only learned parameters are the convs'.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nettransplant.core import layers as L
from nettransplant.core import ops
from nettransplant.core.modules import _check_features, _declare_conv_params

Array = jax.Array


class Adapter(nn.Module):
    """Reorder → re-scale by β → ``num_convs`` × [conv (M filters) + ReLU].

    Attributes:
      channels: ``M``, the channels of ``x`` (in = out).
      num_convs: ``n`` (1 or 3 in the paper).
      kernel_size: 1 or 3 (3×3 convs are padded by 1).
      reorder_seed: seed of the fixed channel permutation; None = no reorder.
    """

    channels: int
    num_convs: int = 1
    kernel_size: int = 3
    reorder_seed: int | None = None

    def __post_init__(self):
        if self.channels < 1 or self.num_convs < 1:
            raise ValueError(
                f"Adapter needs channels >= 1 and num_convs >= 1, got channels={self.channels}, "
                f"num_convs={self.num_convs}")
        if self.kernel_size not in (1, 3):
            raise ValueError(f"Adapter kernel_size must be 1 or 3, got {self.kernel_size}")
        super().__post_init__()

    @nn.nowrap
    def layers(self) -> tuple[L.Layer, ...]:
        stack: list[L.Layer] = []
        for i in range(1, self.num_convs + 1):
            stack += [L.Conv(f"adapter_conv{i}", self.channels, self.kernel_size, "SAME"),
                      L.ReLU(f"adapter_relu{i}")]
        return tuple(stack)

    @nn.nowrap
    def relu_names(self) -> tuple[str, ...]:
        return L.relu_names(self.layers())

    @nn.nowrap
    def permutation(self) -> np.ndarray | None:
        """``perm`` with ``reorder(x)[..., k] = x[..., perm[k]]``, or None."""
        if self.reorder_seed is None:
            return None
        return np.random.default_rng(self.reorder_seed).permutation(self.channels)

    @nn.nowrap
    def reorder_and_rescale(self, x: Array, beta: float | Array) -> Array:
        perm = self.permutation()
        if perm is not None:
            x = x[..., perm]
        return beta * x

    @nn.nowrap
    def reorder_and_rescale_vjp(self, g: Array, beta: float | Array) -> Array:
        """Transpose of :meth:`reorder_and_rescale`: scale by β, undo the permutation."""
        g = beta * g
        perm = self.permutation()
        if perm is not None:
            g = g[..., np.argsort(perm)]
        return g

    @nn.nowrap
    def _check(self, x: Array, what: str) -> None:
        _check_features(x, self.channels, "Adapter", what)

    @nn.compact
    def __call__(self, x: Array, *, beta: float | Array = 1.0
                 ) -> tuple[Array, dict[str, Array]]:
        """``(B, H, W, M)`` → ``(h(x), intermediates)``; ``"rescaled"`` is ``β·x[perm]``."""
        self._check(x, "inputs")
        params = _declare_conv_params(self.layers(), self.channels)
        rescaled = self.reorder_and_rescale(x, beta)
        y, inter = L.forward(params, rescaled, self.layers())
        inter["rescaled"] = inter["input"]
        inter["input"] = x
        return y, inter

    @nn.nowrap
    def surrogate(self, params: Mapping, x: Array, *, beta: float | Array = 1.0,
                  dummy_relu: L.DummySpec = "identity", mask_keys: Array | None = None,
                  mask_layout: ops.MaskLayout = "repeated") -> Array:
        """Linearised adapter (ReLU → dummy, no bias): ``(B, H, W, M)`` → same shape."""
        self._check(x, "inputs")
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), "Adapter")
        return L.surrogate_forward(params, self.reorder_and_rescale(x, beta), self.layers(),
                                   dummies, mask_keys=mask_keys, mask_layout=mask_layout)

    @nn.nowrap
    def pseudo_gradient(self, params: Mapping, g: Array, *, beta: float | Array = 1.0,
                        dummy_relu: L.DummySpec = "identity",
                        mask_keys: Array | None = None,
                        mask_layout: ops.MaskLayout = "repeated") -> Array:
        """Adapter part of ``D'_S`` (Eq. 4b): ``G_h (B, H, W, M)`` → ``(B, H, W, M)``."""
        self._check(g, "output gradients")
        dummies = L.resolve_dummies(dummy_relu, self.relu_names(), "Adapter")
        g = L.backward_chain(params, g, self.layers(), derivatives="pseudo", dummies=dummies,
                             mask_keys=mask_keys, mask_layout=mask_layout)
        return self.reorder_and_rescale_vjp(g, beta)

    @nn.nowrap
    def real_gradient(self, params: Mapping, g: Array, intermediates: Mapping[str, Array], *,
                      beta: float | Array = 1.0) -> Array:
        """The adapter's chain with real derivatives (Eq. 4a)."""
        self._check(g, "output gradients")
        inter = {**intermediates, "input": intermediates["rescaled"]}
        g = L.backward_chain(params, g, self.layers(), derivatives="real", intermediates=inter)
        return self.reorder_and_rescale_vjp(g, beta)

    @nn.nowrap
    def ideal_params(self, beta: float) -> dict[str, dict[str, Array]]:
        """The adapter that undoes reorder and re-scaling exactly: ``R⁻¹ / β`` (Exp. 1).

        The first conv maps ``β·x[perm]`` back to ``x``; later convs are identities.
        ReLUs pass ``x ≥ 0`` (it follows pool1 of a ReLU network) unchanged.
        """
        m, k = self.channels, self.kernel_size
        perm = self.permutation()
        perm = np.arange(m) if perm is None else perm
        params = {}
        for i, layer in enumerate(la for la in self.layers() if isinstance(la, L.Conv)):
            kernel = np.zeros((k, k, m, m), np.float32)
            centre = k // 2
            if i == 0:
                # rescaled[..., j] = β x[..., perm[j]]  →  output channel perm[j] reads input j.
                kernel[centre, centre, np.arange(m), perm] = 1.0 / beta
            else:
                kernel[centre, centre, np.arange(m), np.arange(m)] = 1.0
            params[layer.name] = {"kernel": jnp.asarray(kernel),
                                  "bias": jnp.zeros((m,), jnp.float32)}
        return params

