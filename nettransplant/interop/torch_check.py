"""PyTorch reference VGG-16s that verify a conversion; they import PyTorch when called."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nettransplant.core import modules
from nettransplant.interop.vgg16 import (
    IMAGENET_CLASSES,
    INPUT_SIZE,
    POOL5_SIZE,
    Params,
    VGG16Classifier,
)


def torch_vgg16(num_classes: int = IMAGENET_CLASSES) -> Any:
    """A PyTorch VGG-16 with torchvision's module layout (its ``load_state_dict`` takes
    torchvision's weights): ``features``, ``avgpool = AdaptiveAvgPool2d((7, 7))``,
    ``classifier``. NCHW ``(B, 3, H, W)`` → ``(B, num_classes)``. Needs PyTorch."""
    import torch
    from torch import nn as tnn

    class VGG16(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[tnn.Module] = []
            in_channels = 3
            for channels, n in modules.VGG16_BLOCKS:
                for _ in range(n):
                    layers += [tnn.Conv2d(in_channels, channels, 3, padding=1),
                               tnn.ReLU(inplace=True)]
                    in_channels = channels
                layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
            fc = modules.VGG16_FC_WIDTH
            self.features = tnn.Sequential(*layers)
            self.avgpool = tnn.AdaptiveAvgPool2d((POOL5_SIZE, POOL5_SIZE))
            self.classifier = tnn.Sequential(
                tnn.Linear(in_channels * POOL5_SIZE ** 2, fc), tnn.ReLU(True), tnn.Dropout(),
                tnn.Linear(fc, fc), tnn.ReLU(True), tnn.Dropout(),
                tnn.Linear(fc, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    return VGG16()


def torch_vgg16_fully_convolutional(vgg16: Any) -> Any:
    """The conv-ified PyTorch VGG-16 sharing ``vgg16``'s weights, in eval mode.

    ``features``, then fc6 as ``Conv2d(512, 4096, 7)``, fc7 and fc8 as 1×1
    convs (no average pooling): NCHW ``(B, 3, H, W)`` → ``(B, K, S, S)``.
    """
    import torch
    from torch import nn as tnn

    linears = [m for m in vgg16.classifier if isinstance(m, tnn.Linear)]
    channels = modules.VGG16_BLOCKS[-1][0]
    convs = []
    for i, linear in enumerate(linears):
        size = POOL5_SIZE if i == 0 else 1
        conv = tnn.Conv2d(linear.in_features // size ** 2, linear.out_features, size)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.reshape(
                linear.out_features, channels if i == 0 else linear.in_features, size, size))
            conv.bias.copy_(linear.bias)
        convs.append(conv)
    fcn = tnn.Sequential(vgg16.features, convs[0], tnn.ReLU(), convs[1], tnn.ReLU(), convs[2])
    return fcn.eval()


def verify_against_torch(state: Mapping[str, np.ndarray], model: VGG16Classifier,
                         params: Params, *, input_sizes: Sequence[int] = (224, 288),
                         batch_size: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Compare converted logits with PyTorch's on random images; needs PyTorch.

    The PyTorch VGG-16 gets ``state`` (its fc8 replaced by the converted one, so a
    fresh head is compared too). At 224² the reference is the PyTorch VGG-16
    itself, at larger sizes its conv-ified form (:func:`torch_vgg16_fully_convolutional`).

    Returns:
      One dict per input size: ``{"input_size", "output_shape", "max_abs_diff",
      "max_rel_diff"}``, the relative difference being ``max|Δ| / max|torch|``.
    """
    import torch

    fc8 = params["classification_module"]["fc8"]
    num_outputs = fc8["kernel"].shape[-1]
    reference = dict(state)
    reference["classifier.6.weight"] = np.asarray(fc8["kernel"])[0, 0].T
    reference["classifier.6.bias"] = np.asarray(fc8["bias"])
    with torch.device("meta"):  # no initialisation: every weight is loaded next
        vgg16 = torch_vgg16(num_outputs)
    vgg16.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                           for k, v in reference.items()}, assign=True)
    vgg16.eval()
    fully_convolutional = torch_vgg16_fully_convolutional(vgg16)
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(seed)
    results = []
    for size in input_sizes:
        images = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
        with torch.no_grad():
            nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            if size == INPUT_SIZE:
                expected = vgg16(nchw).numpy()
            else:
                expected = fully_convolutional(nchw).numpy().transpose(0, 2, 3, 1)
        actual = np.asarray(apply({"params": params}, jnp.asarray(images)))
        if actual.shape != expected.shape:
            raise AssertionError(
                f"converted output shape {actual.shape} != PyTorch {expected.shape} at {size}²")
        max_abs = float(np.max(np.abs(actual - expected)))
        results.append({"input_size": size, "output_shape": list(actual.shape),
                        "max_abs_diff": max_abs,
                        "max_rel_diff": max_abs / max(float(np.max(np.abs(expected))), 1e-30)})
    return results
