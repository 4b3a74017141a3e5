"""The transplant net: category module ``f`` → adapter ``h`` → student task module ``g_S``.

The teacher's task module ``g_T`` sits on the same ``f``; only the adapter is
learned, so ``g_S(h(f(I))) ≈ g_T(f(I))`` is reached without touching ``f``,
``g_S`` or ``g_T`` (forgetting is impossible by construction).

Parameters are one dict ``{"category_module", "adapter", "student_task_module",
"teacher_task_module"}``; :func:`split_params` separates the learned adapter from
the frozen rest once, and every jitted function takes both as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from nettransplant.core import layers as L
from nettransplant.core import ops, tasks
from nettransplant.core.adapter import Adapter
from nettransplant.core.modules import (
    CategoryModule,
    ClassificationTaskModule,
    SegmentationTaskModule,
)

Array = jax.Array
Params = Mapping[str, Any]
TaskModule = ClassificationTaskModule | SegmentationTaskModule

TRAINABLE = "adapter"
FROZEN = ("category_module", "student_task_module", "teacher_task_module")

# How back-distillation's draws (G_y', x_rand) are made. "randomised": G_y' ~ U[-1, 1]
# per draw and one s1×s2 x_rand map repeated over channels; "literal" (the paper's
# Exp. 1 as written): G_y' = 1 and x_rand drawn per element over s1×s2×s3.
Draws = Literal["randomised", "literal"]
DRAWS: tuple[str, ...] = ("randomised", "literal")


def check_draws(value, field: str = "draws") -> None:
    """Raise a one-line ValueError naming ``field`` unless ``value`` is one of :data:`DRAWS`."""
    if not isinstance(value, str) or value not in DRAWS:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, DRAWS))}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Transplant:
    """Static description of a transplant (hashable; safe as a jit static argument).

    Attributes:
      category_module: ``f``.
      adapter: ``h``.
      student_task_module: ``g_S``, the generic task module.
      teacher_task_module: ``g_T``, the task module trained with ``f``.
      task_dummy_relu: ReLU dummies in the task modules' pseudo chains (a name or
        a per-layer map; the paper's Exp. 1 uses ``"random_mask"``).
      adapter_dummy_relu: ReLU dummies in the adapter's chain (``"identity"``).
      positive_fraction: share of positive ``x_rand`` entries (0.2).
      draws: ``"randomised"`` (``G_y' ~ U[-1, 1]``, one s1×s2 ``x_rand`` map
        repeated over channels) or ``"literal"`` (``G_y' = 1``, ``x_rand`` drawn
        per element over s1×s2×s3): :data:`DRAWS`.
    """

    category_module: CategoryModule
    adapter: Adapter
    student_task_module: TaskModule
    teacher_task_module: TaskModule
    task_dummy_relu: L.DummySpec = "identity"
    adapter_dummy_relu: L.DummySpec = "identity"
    positive_fraction: float = ops.DEFAULT_POSITIVE_FRACTION
    draws: Draws = "randomised"

    def __post_init__(self):
        check_draws(self.draws)
        # A per-layer dummy map must stay hashable: the transplant is a jit static argument.
        for name in ("task_dummy_relu", "adapter_dummy_relu"):
            spec = getattr(self, name)
            if isinstance(spec, Mapping):
                object.__setattr__(self, name, FrozenDict(spec))
        f_out = L.output_channels(self.category_module.layers(),
                                  self.category_module.input_channels())
        pieces = {
            "adapter": self.adapter.channels,
            "student_task_module": self.student_task_module.input_channels(),
            "teacher_task_module": self.teacher_task_module.input_channels(),
        }
        wrong = {name: c for name, c in pieces.items() if c != f_out}
        if wrong:
            raise ValueError(
                f"channel mismatch: the category module outputs {f_out} channels but "
                + ", ".join(f"the {n} takes {c}" for n, c in wrong.items()))
        student, teacher = self.student_task_module, self.teacher_task_module
        if student.task != teacher.task or type(student) is not type(teacher):
            raise ValueError(
                "student and teacher task modules must solve the same task, got "
                f"{type(student).__name__} ({student.task.name}) and "
                f"{type(teacher).__name__} ({teacher.task.name})")
        if student.num_output_channels() != teacher.num_output_channels():
            raise ValueError(
                "student and teacher task modules must have the same outputs, got "
                f"{student.num_output_channels()} and {teacher.num_output_channels()}")
        # Resolve now so a bad dummy map fails when the pieces are put together.
        for module in (self.student_task_module, self.teacher_task_module):
            L.resolve_dummies(self.task_dummy_relu, module.relu_names(), type(module).__name__)
        L.resolve_dummies(self.adapter_dummy_relu, self.adapter.relu_names(), "Adapter")

    @property
    def task(self) -> tasks.Task:
        """The task both task modules solve (:mod:`nettransplant.core.tasks`)."""
        return self.student_task_module.task

    @property
    def mask_layout(self) -> ops.MaskLayout:
        """How the ``x_rand`` masks of :attr:`draws` cover a layer's channels
        (:func:`ops.mask_channels`)."""
        return "per_element" if self.draws == "literal" else "repeated"

    @property
    def uses_random_masks(self) -> bool:
        def uses(spec):
            return spec == "random_mask" or (
                isinstance(spec, Mapping) and "random_mask" in spec.values())
        return uses(self.task_dummy_relu) or uses(self.adapter_dummy_relu)

    # ------------------------------------------------------------------ parameters

    def init(self, key: Array, image_size: int) -> dict[str, Any]:
        """Fresh parameters for every piece (tests and benchmarks; real runs load teachers)."""
        k_f, k_h, k_s, k_t = jax.random.split(key, 4)
        images = jnp.zeros((1, image_size, image_size, self.category_module.input_channels()))
        f_params = self.category_module.init(k_f, images)["params"]
        x = jnp.zeros((1, image_size // 2, image_size // 2, self.adapter.channels))
        return {
            "category_module": f_params,
            "adapter": self.adapter.init(k_h, x)["params"],
            "student_task_module": self.student_task_module.init(k_s, x)["params"],
            "teacher_task_module": self.teacher_task_module.init(k_t, x)["params"],
        }

    def check_params(self, params: Params, image_size: int) -> None:
        """Raise a ValueError listing every missing, unexpected or mis-shaped parameter."""
        images = jax.ShapeDtypeStruct((1, image_size, image_size,
                                       self.category_module.input_channels()), jnp.float32)
        x = jax.ShapeDtypeStruct((1, image_size // 2, image_size // 2, self.adapter.channels),
                                 jnp.float32)
        key = jax.random.key(0)
        expected = {
            "category_module": jax.eval_shape(self.category_module.init, key, images),
            "adapter": jax.eval_shape(self.adapter.init, key, x),
            "student_task_module": jax.eval_shape(self.student_task_module.init, key, x),
            "teacher_task_module": jax.eval_shape(self.teacher_task_module.init, key, x),
        }
        expected = {k: v["params"] for k, v in expected.items()}
        problems = []
        want = {jax.tree_util.keystr(p): v.shape
                for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
        have = {jax.tree_util.keystr(p): np.shape(v)
                for p, v in jax.tree_util.tree_flatten_with_path(dict(params))[0]}
        for path in sorted(set(want) - set(have)):
            problems.append(f"missing {path} (expected shape {want[path]})")
        for path in sorted(set(have) - set(want)):
            problems.append(f"unexpected {path}")
        for path in sorted(set(want) & set(have)):
            if tuple(want[path]) != tuple(have[path]):
                problems.append(f"{path} has shape {have[path]}, expected {want[path]}")
        if problems:
            raise ValueError("transplant parameters do not fit the modules:\n  "
                             + "\n  ".join(problems))

    # ------------------------------------------------------------------ forward

    def features(self, params: Params, images: Array) -> Array:
        """``x = f(I)``: ``(B, H, W, 3)`` → ``(B, H/2, W/2, M)``."""
        return self.category_module.apply({"params": params["category_module"]}, images)[0]

    def student_output(self, adapter_params: Params, frozen: Params, x: Array,
                       beta: Array | float) -> Array:
        """``y_S = g_S(h(x))``."""
        h, _ = self.adapter.apply({"params": adapter_params}, x, beta=beta)
        return self.student_task_module.apply({"params": frozen["student_task_module"]}, h)[0]

    def teacher_output(self, frozen: Params, x: Array) -> Array:
        """``y_T = g_T(x)``."""
        return self.teacher_task_module.apply({"params": frozen["teacher_task_module"]}, x)[0]

    # ------------------------------------------------------------------ pseudo chains

    def student_task_gradient(self, frozen: Params, g: Array, mask_keys: Array | None) -> Array:
        """``G_h = chain_{g_S}(G_y')``: the pseudo-gradient arriving at the adapter's output."""
        return self.student_task_module.pseudo_gradient(
            frozen["student_task_module"], g, dummy_relu=self.task_dummy_relu,
            mask_keys=mask_keys, positive_fraction=self.positive_fraction,
            mask_layout=self.mask_layout)

    def teacher_gradient(self, frozen: Params, g: Array, mask_keys: Array | None) -> Array:
        """``D'_T = chain_{g_T}(G_y')`` at ``x``."""
        return self.teacher_task_module.pseudo_gradient(
            frozen["teacher_task_module"], g, dummy_relu=self.task_dummy_relu,
            mask_keys=mask_keys, positive_fraction=self.positive_fraction,
            mask_layout=self.mask_layout)

    def adapter_gradient(self, adapter_params: Params, g_h: Array, beta: Array | float,
                         mask_keys: Array | None) -> Array:
        """The adapter's chain: ``G_h`` → its part of ``D'_S`` (without α)."""
        return self.adapter.pseudo_gradient(adapter_params, g_h, beta=beta,
                                            dummy_relu=self.adapter_dummy_relu,
                                            mask_keys=mask_keys, mask_layout=self.mask_layout)


def split_params(params: Params) -> tuple[Params, dict[str, Params]]:
    """``(adapter params, frozen params)``: the one place the frozen modules are named."""
    missing = [k for k in (TRAINABLE, *FROZEN) if k not in params]
    if missing:
        raise ValueError(f"transplant parameters lack {missing}; have {sorted(params)}")
    return params[TRAINABLE], {k: params[k] for k in FROZEN}
