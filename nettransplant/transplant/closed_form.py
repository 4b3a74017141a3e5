"""Closed-form single-conv adapter: the exact minimiser of the zero-sample objective.

With one conv in the adapter and the 1st (identity) dummy at its ReLU,

    D'_S = α β · P^T( G_h ⊗ flip_swap(W) )

is linear in the kernel ``W`` (design insight 3), so ``‖α D'_S − D'_T‖²`` is a
linear least-squares problem. The features are the im2col patches of ``G_h``
(``k·k·M`` per position); each input channel of the conv is one right-hand
side. One ridge-regularised solve of the ``(k²M) × (k²M)`` normal equations
gives the optimum; biases do not enter ``D'`` and are set to zero.

The normal equations are sums over draws, so they are accumulated data
parallel: each device of the mesh sums its share of the draws and a ``psum``
adds the shares (:func:`normal_equations`); the small solve runs on the host.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nettransplant.core import layers as L
from nettransplant.runtime import parallel
from nettransplant.transplant.objectives import ChainCache, TransplantScalars
from nettransplant.transplant.wiring import Transplant

Array = jax.Array


def _patches(g: Array, k: int) -> Array:
    """``(B, h, w, M)`` → ``(B·h·w, k·k·M)`` SAME patches ordered ``(a, b, channel)``."""
    pad = k // 2
    gp = jnp.pad(g, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
    h, w = g.shape[1:3]
    shifted = [gp[:, a: a + h, b: b + w, :] for a in range(k) for b in range(k)]
    return jnp.stack(shifted, axis=3).reshape(-1, k * k * g.shape[-1])


def _normal_equations(k: int, perm: tuple[int, ...] | None, chunk: int, g_h: Array, d_t: Array,
                      scale: Array) -> tuple[Array, Array]:
    """``(Σ pᵀp, Σ pᵀt)`` over the draws given, accumulated ``chunk`` draws at a time."""
    n, m = g_h.shape[0], g_h.shape[-1]
    target = d_t if perm is None else d_t[..., np.asarray(perm)]
    target = target / scale
    pad = (-n) % chunk  # zero draws add nothing to either sum
    g_h = jnp.pad(g_h, ((0, pad),) + ((0, 0),) * 3).reshape(-1, chunk, *g_h.shape[1:])
    target = jnp.pad(target, ((0, pad),) + ((0, 0),) * 3).reshape(-1, chunk, *target.shape[1:])

    def accumulate(carry, part):
        g, t = part
        features = _patches(g, k)
        t = t.reshape(-1, m)
        gram = jnp.einsum("np,nq->pq", features, features, precision=jax.lax.Precision.HIGHEST)
        rhs = jnp.einsum("np,nc->pc", features, t, precision=jax.lax.Precision.HIGHEST)
        return (carry[0] + gram, carry[1] + rhs), None

    init = (jnp.zeros((k * k * m, k * k * m), jnp.float32), jnp.zeros((k * k * m, m), jnp.float32))
    return jax.lax.scan(accumulate, init, (g_h, target))[0]


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sharded_normal_equations(mesh: jax.sharding.Mesh, k: int, perm: tuple[int, ...] | None,
                              chunk: int, g_h: Array, d_t: Array, scale: Array
                              ) -> tuple[Array, Array]:
    def shard_sums(g, t, s):  # this device's draws, then the sum over devices
        gram, rhs = _normal_equations(k, perm, chunk, g, t, s)
        return jax.lax.psum(gram, parallel.DATA_AXIS), jax.lax.psum(rhs, parallel.DATA_AXIS)

    draws = P(parallel.DATA_AXIS)
    # check_vma=False: the scan's zero initial sums are device-invariant, its
    # partial sums are not; the psum makes the result invariant again.
    return jax.shard_map(shard_sums, mesh=mesh, in_specs=(draws, draws, P()),
                         out_specs=(P(), P()), check_vma=False)(g_h, d_t, scale)


def normal_equations(k: int, perm: tuple[int, ...] | None, g_h: Array, d_t: Array,
                     scale: Array, *, chunk: int = 8, mesh: jax.sharding.Mesh | None = None
                     ) -> tuple[Array, Array]:
    """The closed form's normal equations, summed over draws split across ``mesh``'s devices.

    Args:
      k, perm: the adapter's kernel size and channel reorder (None: none).
      g_h: ``G_h`` of ``N`` draws, ``(N, h, w, M)``; d_t: their ``D'_T``, same shape.
      scale: ``α·β``.
      chunk: draws per accumulation step on a device (bounds memory).
      mesh: default every device on one ``data`` axis. ``N`` is padded with
        zero draws to a multiple of the ``data`` size: they add nothing to either sum.
    Returns:
      ``(gram (k²M, k²M), rhs (k²M, M))``, replicated.
    """
    mesh = mesh or parallel.data_mesh()
    devices = parallel.data_size(mesh)
    pad = (-g_h.shape[0]) % devices
    if pad:
        g_h, d_t = (jnp.pad(a, ((0, pad),) + ((0, 0),) * 3) for a in (g_h, d_t))
    per_device = g_h.shape[0] // devices
    g_h, d_t, scale = parallel.replicate((g_h, d_t, jnp.asarray(scale)), mesh)
    return _sharded_normal_equations(mesh, k, perm, min(chunk, per_device), g_h, d_t, scale)


def solve_single_conv_adapter(transplant: Transplant, cache: ChainCache,
                              scalars: TransplantScalars, *, ridge: float = 1e-6,
                              num_draws: int | None = None, chunk: int = 8,
                              mesh: jax.sharding.Mesh | None = None
                              ) -> dict[str, dict[str, Array]]:
    """Adapter params minimising ``E ‖α D'_S − D'_T‖²`` over the draws in ``cache``.

    Args:
      ridge: added to the normal equations' diagonal, relative to their mean
        diagonal (keeps the solve well-posed when some patch directions are
        never excited).
      num_draws: use the first ``num_draws`` draws of the cache (all by default).
        The system has only ``k²M`` unknowns per channel and every draw
        contributes ``h·w`` equations, so a few dozen draws determine it.
      chunk: draws per accumulation step (bounds memory).
      mesh: the devices the draws are split over (:func:`normal_equations`).
    Returns:
      ``{"adapter_conv1": {"kernel": (k, k, M, M), "bias": zeros(M)}}``.
    Raises:
      ValueError: for an adapter with more than one conv or a non-identity dummy.
    """
    adapter = transplant.adapter
    if adapter.num_convs != 1:
        raise ValueError(
            f"the closed form holds for single-conv adapters, this one has {adapter.num_convs}")
    dummies = L.resolve_dummies(transplant.adapter_dummy_relu, adapter.relu_names(), "Adapter")
    if set(dummies.values()) != {"identity"}:
        raise ValueError("the closed form needs the identity dummy at the adapter's ReLU, got "
                         f"{dummies}")
    if num_draws is not None and not 1 <= num_draws <= cache.num_draws:
        raise ValueError(f"num_draws must be in [1, {cache.num_draws}], got {num_draws}")
    k, m = adapter.kernel_size, adapter.channels
    perm = adapter.permutation()
    perm = None if perm is None else tuple(int(p) for p in perm)
    n = num_draws or cache.num_draws
    gram, rhs = normal_equations(k, perm, cache.student_task_gradient[:n],
                                 cache.teacher_gradient[:n], scalars.alpha * scalars.beta,
                                 chunk=chunk, mesh=mesh)
    gram64, rhs64 = np.asarray(gram, np.float64), np.asarray(rhs, np.float64)
    gram64 += ridge * np.mean(np.diag(gram64)) * np.eye(gram64.shape[0])
    solution = np.linalg.solve(gram64, rhs64)  # rows (a, b, c_out), columns c_in
    # solution[a, b, c_out, c_in] is flip_swap(W); undo flip and swap.
    flipped = solution.reshape(k, k, m, m)
    kernel = np.swapaxes(flipped[::-1, ::-1], 2, 3).astype(np.float32)
    return {"adapter_conv1": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((m,), jnp.float32)}}


def warm_start_adapter(transplant: Transplant, cache: ChainCache, scalars: TransplantScalars,
                       *, ridge: float = 1e-6, num_draws: int | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, dict[str, Array]]:
    """The single-conv optimum embedded in an adapter of any depth.

    The first conv gets the closed form of the same adapter cut to one conv;
    every later conv is an identity (centre tap ``I``, zero bias). A later conv
    reads a ReLU output (≥ 0), so identity + ReLU passes it unchanged, and with
    the identity dummy its pseudo-chain is the identity too: forward map and
    ``D'_S`` equal the single-conv optimum's. For a single-conv adapter this is
    :func:`solve_single_conv_adapter`; for deeper ones it is a starting point
    whose zero-sample loss is already the single-conv minimum.
    """
    adapter = transplant.adapter
    single = dataclasses.replace(transplant, adapter=adapter.clone(num_convs=1))
    first = solve_single_conv_adapter(single, cache, scalars, ridge=ridge, num_draws=num_draws,
                                      mesh=mesh)
    params = adapter.ideal_params(1.0)  # identities after the first conv
    params["adapter_conv1"] = first["adapter_conv1"]
    return params
