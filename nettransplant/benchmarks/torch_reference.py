"""The adapter's train steps written as a PyTorch user would, on the library's problem.

A reference for :func:`nettransplant.transplant.step.make_train_step`: the same transplant
(``f``, ``h``, ``g_S``, ``g_T`` as ``torch.nn.Module``\\ s holding the JAX
weights, NCHW), the same batch, the same draws of ``(G_y', x_rand)`` and the
same α, β, λ, trained with ``torch.optim.Adam`` on the adapter's parameters
only. :mod:`nettransplant.benchmarks.step_benchmark` times it beside the
library's steps; ``tests/test_torch_reference.py`` checks that one step's loss
and adapter gradient agree.

The objectives are the library's (:func:`nettransplant.transplant.objectives.objective_terms`),
written the PyTorch way:

* ``direct-learn`` — the task loss of ``g_S(h(x))``;
* ``distill`` — cross-entropy with the teacher's output ``y_T``;
* ``back-distill`` — double back-propagation: each module runs its linearised
  surrogate (ReLU → the draw's fixed ``x_rand`` mask or identity, max → average
  pool, no dropout, no bias) on an enlarged input ``X``;
  ``D'_S = ∂⟨g_S(h(X)), G_y'⟩/∂X`` comes from ``torch.autograd.grad(...,
  create_graph=True)``, ``D'_T = ∂⟨g_T(X), G_y'⟩/∂X`` likewise without a graph,
  and ``λ · E‖α·D'_S − D'_T‖²`` is back-propagated into the adapter (plus the
  task loss when there is a batch). Both chains run every step, as a PyTorch
  user writes it; the library reads them from its
  :class:`~nettransplant.transplant.objectives.ChainCache`;
* ``jacobian`` — task loss + output matching + the distance of the per-example
  L2-normalised input Jacobians ``∇_x⟨P, y(x)⟩`` (the student's by
  ``torch.autograd.grad(..., create_graph=True)``, the teacher's cached).

The ``x_rand`` masks are the library's (:func:`nettransplant.core.ops.batched_relu_mask`
of each draw's key), drawn once per bank of draws like ``G_y'``, so both
frameworks see the same draws. Classification task modules only (the Exp. 1
problem the benchmark builds); FCN-8s segmentation modules are not ported.

PyTorch is imported inside the functions: the package does not need it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nettransplant.core import layers as L
from nettransplant.core import ops
from nettransplant.core.modules import ClassificationTaskModule
from nettransplant.transplant.objectives import METHODS, ObjectiveWeights


def _require_classification(module) -> None:
    if not isinstance(module, ClassificationTaskModule):
        raise NotImplementedError(
            f"the PyTorch reference ports classification task modules only, got "
            f"{type(module).__name__}")


def _padding(layer: L.Conv) -> int:
    k = layer.kernel_size
    if layer.padding == "VALID":
        return 0
    if layer.padding == "SAME" and k % 2 == 1:
        return (k - 1) // 2
    raise NotImplementedError(f"padding {layer.padding!r} with kernel {k} of {layer.name}")


def _nchw(a) -> np.ndarray:
    """NHWC (JAX) → NCHW (PyTorch), float32, contiguous."""
    return np.array(np.asarray(a, np.float32).transpose(0, 3, 1, 2), order="C")  # a copy


@functools.cache
def _modules():
    """The ``nn.Module`` classes (defined on first use: PyTorch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Stack(nn.Module):
        """A sequential VGG stack: ``nn.Conv2d`` per conv, functional ReLU/pool/dropout.

        ``forward(x)`` is the real network; ``forward(x, pseudo=masks)`` the
        linearised surrogate whose input gradient is the pseudo chain: each ReLU
        multiplies by ``masks[name]`` (``(B, 1, h, w)``) or passes ``x`` (no
        entry), max pools average, dropout is skipped and biases are left out.
        """

        def __init__(self, layers: tuple[L.Layer, ...], in_channels: int):
            super().__init__()
            self.specs = layers
            self.convs = nn.ModuleDict()
            c = in_channels
            for layer in layers:
                if isinstance(layer, L.Conv):
                    self.convs[layer.name] = nn.Conv2d(c, layer.features, layer.kernel_size,
                                                       padding=_padding(layer))
                    c = layer.features

        def forward(self, x: torch.Tensor, pseudo: Mapping[str, torch.Tensor] | None = None
                    ) -> torch.Tensor:
            for layer in self.specs:
                if isinstance(layer, L.Conv):
                    conv = self.convs[layer.name]
                    x = conv(x) if pseudo is None else F.conv2d(x, conv.weight,
                                                                padding=conv.padding)
                elif isinstance(layer, L.ReLU):
                    if pseudo is None:
                        x = F.relu(x)
                    elif layer.name in pseudo:
                        x = x * pseudo[layer.name]
                elif isinstance(layer, L.MaxPool):
                    x = (F.max_pool2d(x, layer.window) if pseudo is None
                         else F.avg_pool2d(x, layer.window))
                elif isinstance(layer, L.Dropout):
                    if pseudo is None:
                        x = F.dropout(x, layer.rate, self.training)
            return x

    class Adapter(nn.Module):
        """``h``: fixed channel reorder, ``β·x``, then the conv stack."""

        def __init__(self, adapter):
            super().__init__()
            perm = adapter.permutation()
            perm = np.arange(adapter.channels) if perm is None else perm
            self.register_buffer("perm", torch.as_tensor(perm, dtype=torch.long))
            self.stack = Stack(adapter.layers(), adapter.channels)

        def forward(self, x, beta, pseudo=None):
            return self.stack(beta * x[:, self.perm], pseudo)

    return Stack, Adapter


@dataclasses.dataclass
class TorchTransplant:
    """The transplant as PyTorch modules (eval mode), with its scalars α, β, λ.

    ``f``, ``g_s`` and ``g_t`` are frozen (``requires_grad=False``); ``h`` is the
    only module with trainable parameters.
    """

    f: Any
    h: Any
    g_s: Any
    g_t: Any
    alpha: float
    beta: float
    lam: float
    task_dummies: dict[str, str]
    adapter_dummies: dict[str, str]
    channels: int  # M, the channels of x = f(I)
    enlarged_size: tuple[int, int]  # the spatial size of D' for the draws' G_y'
    device: Any = "cpu"


def _copy_convs(stack, params: Mapping) -> None:
    import torch

    with torch.no_grad():
        for name, conv in stack.convs.items():
            kernel = np.array(params[name]["kernel"], np.float32)  # HWIO
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(np.array(params[name]["bias"], np.float32)))


def from_jax(transplant, params: Mapping, scalars, *, score_size: int,
             device: str = "cpu") -> TorchTransplant:
    """PyTorch modules computing the same functions as ``transplant`` with ``params``.

    Args:
      params: the full parameter dict (``category_module``, ``adapter``, …).
      scalars: the :class:`~nettransplant.transplant.objectives.TransplantScalars`.
      score_size: ``S`` of the draws' ``G_y'`` (sets the enlarged input size).
    """
    Stack, Adapter = _modules()
    student, teacher = transplant.student_task_module, transplant.teacher_task_module
    _require_classification(student)
    _require_classification(teacher)
    f = Stack(transplant.category_module.layers(), transplant.category_module.input_channels())
    h = Adapter(transplant.adapter)
    g_s = Stack(student.layers(), student.input_channels())
    g_t = Stack(teacher.layers(), teacher.input_channels())
    for module, name in ((f, "category_module"), (h.stack, "adapter"),
                         (g_s, "student_task_module"), (g_t, "teacher_task_module")):
        _copy_convs(module, params[name])
    for module in (f, g_s, g_t):
        module.requires_grad_(False)
    for module in (f, h, g_s, g_t):
        module.to(device).eval()
    return TorchTransplant(
        f=f, h=h, g_s=g_s, g_t=g_t, alpha=float(scalars.alpha), beta=float(scalars.beta),
        lam=float(scalars.lam),
        task_dummies=L.resolve_dummies(transplant.task_dummy_relu, student.relu_names(),
                                       type(student).__name__),
        adapter_dummies=L.resolve_dummies(transplant.adapter_dummy_relu,
                                          transplant.adapter.relu_names(), "Adapter"),
        channels=transplant.adapter.channels,
        enlarged_size=student.enlarged_gradient_shape(score_size), device=device)


# --------------------------------------------------------------------------- data and draws


@dataclasses.dataclass
class TorchData:
    """:class:`~nettransplant.transplant.objectives.TransferData` as NCHW tensors."""

    features: Any
    labels: Any
    label_valid: Any
    valid: Any
    teacher_outputs: Any
    jacobian_projection: Any
    teacher_jacobian: Any

    def take(self, index) -> TorchData:
        return TorchData(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def data_from_jax(data, device: str = "cpu") -> TorchData:
    """The library's :class:`~nettransplant.transplant.objectives.TransferData`, converted."""
    import torch

    def t(a, nchw=False):
        return torch.from_numpy(_nchw(a) if nchw else np.array(a)).to(device)

    return TorchData(t(data.features, True), t(data.labels), t(data.label_valid),
                     t(data.valid), t(data.teacher_outputs, True),
                     t(data.jacobian_projection, True), t(data.teacher_jacobian, True))


def make_transfer_data(problem: TorchTransplant, images, labels, projection) -> TorchData:
    """A PyTorch user's data preparation: ``x = f(I)``, ``y_T = g_T(x)`` and the
    teacher's Jacobian ``∇_x⟨P, g_T(x)⟩``, computed once (``f`` and ``g_T`` are frozen).

    Args:
      images: NHWC ``(N, H, W, 3)`` array; labels ``(N,)``; projection NHWC ``P``.
    """
    import torch

    device = problem.device
    with torch.no_grad():
        x = problem.f(torch.from_numpy(_nchw(images)).to(device))
    x_in = x.clone().requires_grad_(True)
    y_t = problem.g_t(x_in)
    p = torch.from_numpy(_nchw(projection)).to(device)
    (j_t,) = torch.autograd.grad((y_t * p).sum(), x_in)
    n = x.shape[0]
    ones = torch.ones(n, device=device)
    return TorchData(x, torch.from_numpy(np.array(labels)).to(device), ones, ones.clone(),
                     y_t.detach(), p, j_t)


@dataclasses.dataclass
class TorchDraws:
    """A bank of draws: ``G_y'`` (NCHW) and each draw's ``x_rand`` masks per ReLU."""

    output_gradients: Any
    task_masks: dict[str, Any]
    adapter_masks: dict[str, Any]

    @property
    def num_draws(self) -> int:
        return self.output_gradients.shape[0]

    def take(self, index) -> TorchDraws:
        return TorchDraws(self.output_gradients[index],
                          {k: v[index] for k, v in self.task_masks.items()},
                          {k: v[index] for k, v in self.adapter_masks.items()})


def _relu_sizes(layers: tuple[L.Layer, ...], size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Spatial size at each ReLU of a stack run on a ``size`` input."""
    h, w = size
    sizes = {}
    for layer in layers:
        if isinstance(layer, L.Conv) and layer.padding == "VALID":
            h, w = h - layer.kernel_size + 1, w - layer.kernel_size + 1
        elif isinstance(layer, L.MaxPool):
            h, w = h // layer.window, w // layer.window
        elif isinstance(layer, L.ReLU):
            sizes[layer.name] = (h, w)
    return sizes


def _mask_specs(layers, dummies, size) -> tuple[tuple[str, int, int], ...]:
    return tuple((name, h, w) for name, (h, w) in _relu_sizes(layers, size).items()
                 if dummies[name] == "random_mask")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_masks(mask_keys, specs, positive_fraction: float) -> dict[str, jax.Array]:
    """Every ReLU's ``x_rand`` masks in one compiled call (eager: one compile per op)."""
    return {name: ops.batched_relu_mask(mask_keys, name, h, w, positive_fraction)
            for name, h, w in specs}


def draws_from_jax(transplant, problem: TorchTransplant, output_gradients, mask_keys
                   ) -> TorchDraws:
    """The draws ``(G_y', mask keys)`` of :func:`nettransplant.transplant.step.raw_draws` (the same
    draws :func:`~nettransplant.transplant.objectives.build_chain_cache` caches), with the library's
    masks: the task modules' at ``transplant.positive_fraction``, the adapter's at the
    default fraction (as :meth:`Transplant.adapter_gradient` draws them)."""
    import torch

    size, device = problem.enlarged_size, problem.device

    def masks(layers, dummies, positive_fraction):
        drawn = _draw_masks(mask_keys, _mask_specs(layers, dummies, size), positive_fraction)
        return {name: torch.from_numpy(_nchw(m)).to(device) for name, m in drawn.items()}

    task = masks(transplant.student_task_module.layers(), problem.task_dummies,
                 transplant.positive_fraction)
    adapter = masks(transplant.adapter.layers(), problem.adapter_dummies,
                    ops.DEFAULT_POSITIVE_FRACTION)
    return TorchDraws(torch.from_numpy(_nchw(output_gradients)).to(problem.device), task,
                      adapter)


# --------------------------------------------------------------------------- objectives


def _masked_mean(values, weights):
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _logits(y):
    return y.mean(dim=(2, 3))  # (B, K, S, S) score maps → (B, K)


def task_loss(y, labels, weights):
    """Sigmoid cross-entropy for one output, softmax otherwise (``tasks.CLASSIFICATION``)."""
    import torch.nn.functional as F

    logits = _logits(y)
    if logits.shape[1] == 1:
        per_image = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(),
                                                       reduction="none")
    else:
        per_image = F.cross_entropy(logits, labels.long(), reduction="none")
    return _masked_mean(per_image, weights)


def distill_loss(y_student, y_teacher, weights):
    """Cross-entropy of the student's scores with the teacher's distribution."""
    import torch.nn.functional as F

    s, t = _logits(y_student), _logits(y_teacher)
    if s.shape[1] == 1:
        per_image = F.binary_cross_entropy_with_logits(s[:, 0], t[:, 0].sigmoid(),
                                                       reduction="none")
    else:
        per_image = -(t.softmax(1) * s.log_softmax(1)).sum(1)
    return _masked_mean(per_image, weights)


def back_distill_term(problem: TorchTransplant, draws: TorchDraws):
    """``λ · E‖α·D'_S − D'_T‖²`` by double back-propagation through the surrogates."""
    import torch

    g = draws.output_gradients
    shape = (g.shape[0], problem.channels, *problem.enlarged_size)
    x_s = torch.zeros(shape, device=g.device, requires_grad=True)
    y_s = problem.g_s(problem.h(x_s, problem.beta, pseudo=draws.adapter_masks),
                      pseudo=draws.task_masks)
    (d_s,) = torch.autograd.grad((y_s * g).sum(), x_s, create_graph=True)
    x_t = torch.zeros(shape, device=g.device, requires_grad=True)
    y_t = problem.g_t(x_t, pseudo=draws.task_masks)
    (d_t,) = torch.autograd.grad((y_t * g).sum(), x_t)
    diff = problem.alpha * d_s - d_t
    return problem.lam * diff.square().flatten(1).sum(1).mean()


def jacobian_term(y_s, x, batch: TorchData):
    """``E_i ‖J_S,i/‖J_S,i‖ − J_T,i/‖J_T,i‖‖²`` with ``J_S = ∇_x⟨P, y_S⟩`` (double backprop)."""
    import torch

    (j_s,) = torch.autograd.grad((y_s * batch.jacobian_projection).sum(), x, create_graph=True)

    def normalised(j):
        flat = j.flatten(1)
        return flat / (flat.square().sum(1, keepdim=True) + 1e-12).sqrt()

    per_image = (normalised(j_s) - normalised(batch.teacher_jacobian)).square().sum(1)
    return _masked_mean(per_image, batch.valid)


def objective_terms(problem: TorchTransplant, method: str, batch: TorchData | None,
                    draws: TorchDraws | None, weights: ObjectiveWeights | None = None
                    ) -> dict[str, Any]:
    """The loss terms of ``method`` (the same keys as the library's ``objective_terms``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    weights = weights or ObjectiveWeights()
    terms = {}
    if method == "back-distill":
        if draws is None:
            raise ValueError("back-distill needs draws")
        terms["back_distill"] = back_distill_term(problem, draws)
        if batch is None:
            return terms
    if batch is None:
        raise ValueError(f"{method} needs a batch of images")
    x = batch.features
    if method == "jacobian":
        x = x.clone().requires_grad_(True)
    y_s = problem.g_s(problem.h(x, problem.beta))
    if method in ("direct-learn", "back-distill", "jacobian"):
        terms["task"] = weights.task * task_loss(y_s, batch.labels,
                                                 batch.valid * batch.label_valid)
    if method == "distill":
        terms["distill"] = distill_loss(y_s, batch.teacher_outputs, batch.valid)
    if method == "jacobian":
        terms["output_matching"] = weights.output_matching * distill_loss(
            y_s, batch.teacher_outputs, batch.valid)
        terms["jacobian"] = weights.jacobian * jacobian_term(y_s, x, batch)
    return terms


def adam(problem: TorchTransplant, learning_rate: float):
    """``torch.optim.Adam`` on the adapter's parameters only (optax.adam's defaults)."""
    import torch

    return torch.optim.Adam(problem.h.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                            eps=1e-8)


def make_train_step(problem: TorchTransplant, method: str, optimizer, *,
                    weights: ObjectiveWeights | None = None):
    """``step(data, draws, batch_index, draw_index) -> metrics``: one Adam step on θ_h.

    ``data``/``draws`` may be None (as for the library's step); the indices pick
    the step's rows. Metrics hold ``loss`` and each term, as tensors (reading
    them synchronises a GPU).
    """
    def step(data, draws, batch_index, draw_index):
        batch = None if data is None else data.take(batch_index)
        draw_batch = None if draws is None else draws.take(draw_index)
        optimizer.zero_grad(set_to_none=True)
        terms = objective_terms(problem, method, batch, draw_batch, weights)
        loss = sum(terms.values())
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    return step


def adapter_params(problem: TorchTransplant) -> dict[str, dict[str, np.ndarray]]:
    """The adapter's parameters in the library's layout (HWIO kernels)."""
    return {name: {"kernel": conv.weight.detach().cpu().numpy().transpose(2, 3, 1, 0),
                   "bias": conv.bias.detach().cpu().numpy()}
            for name, conv in problem.h.stack.convs.items()}


def adapter_grads(problem: TorchTransplant) -> dict[str, dict[str, np.ndarray]]:
    """The adapter's ``.grad`` in the library's layout (after ``backward``)."""
    def g(p):
        return (np.zeros(p.shape, np.float32) if p.grad is None
                else p.grad.detach().cpu().numpy())

    return {name: {"kernel": g(conv.weight).transpose(2, 3, 1, 0), "bias": g(conv.bias)}
            for name, conv in problem.h.stack.convs.items()}
