"""FCN-8s's wiring over a parameter dict: the forward (real or surrogate) and the backward chain.

:class:`~nettransplant.core.modules.SegmentationTaskModule` runs its three VGG stages
through these; the stages themselves are :mod:`nettransplant.core.layers` stacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from nettransplant.core import layers as L
from nettransplant.core import ops

Array = jax.Array
Params = Mapping[str, Any]

# FCN-8s up-sampling: (name, stride); kernel = 2 × stride, crop offset = stride / 2.
FCN_UPSAMPLING = (("upscore2", 2), ("upscore_pool4", 2), ("upscore8", 8))


def fcn8s_graph(params, x, stages, run_stage, use_bias=True):
    """FCN-8s wiring shared by the real and the surrogate forward.

    ``run_stage(params, h, stack)`` returns ``(output, intermediates)``.
    """
    to_pool3, to_pool4, to_score = stages
    inter: dict[str, Array] = {"input": x}

    def score(name, h):
        p = params[name]
        return ops.conv2d(h, p["kernel"], p["bias"] if use_bias else None, padding="VALID")

    h = x
    outputs = []
    for stack in (to_pool3, to_pool4, to_score):
        h, stage_inter = run_stage(params, h, stack)
        inter |= {k: v for k, v in stage_inter.items() if k != "input"}
        outputs.append(h)
    pool3, pool4, score_fr = outputs

    def upsample(name, stride, h, size):
        up = ops.conv2d_transpose(h, params[name]["kernel"], strides=stride)
        inter[name] = out = ops.crop(up, stride // 2, size)
        return out

    (up2_name, s2), (up4_name, s4), (up8_name, s8) = FCN_UPSAMPLING
    inter["score_pool4"] = score("score_pool4", pool4)
    inter["fuse_pool4"] = fuse4 = ops.add(upsample(up2_name, s2, score_fr, pool4.shape[1:3]),
                                          inter["score_pool4"])
    inter["score_pool3"] = score("score_pool3", pool3)
    inter["fuse_pool3"] = fuse3 = ops.add(upsample(up4_name, s4, fuse4, pool3.shape[1:3]),
                                          inter["score_pool3"])
    out = upsample(up8_name, s8, fuse3, (2 * x.shape[1], 2 * x.shape[2]))
    return out, inter


def fcn8s_forward(params: Params, x: Array, stages, *, dropout_key: Array | None = None):
    """Real FCN-8s forward over a parameter dict: ``(y, intermediates)``."""
    keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
    counter = iter(keys)

    def stage(p, h, stack):
        return L.forward(p, h, stack, dropout_key=next(counter))

    return fcn8s_graph(params, x, stages, stage)


def fcn8s_chain(params, g, stages, stage_chain):
    """FCN-8s backward chain: up-sampling and skip VJPs, fan-in of the skip gradients."""
    to_pool3, to_pool4, to_score = stages

    def upsample_vjp(name, stride, grad):
        full = tuple(n + stride for n in grad.shape[1:3])  # (n - 1)s + 2s, cropped by s
        grad = ops.crop_vjp(grad, stride // 2, full)
        return ops.conv2d_transpose_vjp(grad, params[name]["kernel"], strides=stride)

    (up2_name, s2), (up4_name, s4), (up8_name, s8) = FCN_UPSAMPLING
    g_fuse3 = upsample_vjp(up8_name, s8, g)
    g_up4, g_score3 = ops.add_vjp(g_fuse3)
    g_fuse4 = upsample_vjp(up4_name, s4, g_up4)
    g_up2, g_score4 = ops.add_vjp(g_fuse4)
    g_score_fr = upsample_vjp(up2_name, s2, g_up2)
    g_pool4 = stage_chain(to_score, g_score_fr, "pool4")
    g_pool4 = g_pool4 + ops.conv2d_vjp(g_score4, params["score_pool4"]["kernel"],
                                       padding="VALID")
    g_pool3 = stage_chain(to_pool4, g_pool4, "pool3")
    g_pool3 = g_pool3 + ops.conv2d_vjp(g_score3, params["score_pool3"]["kernel"],
                                       padding="VALID")
    return stage_chain(to_pool3, g_pool3, "input")
