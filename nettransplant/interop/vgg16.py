"""Torchvision VGG-16 weights → nettransplant's VGG-16 modules (and an FCN-8s initialisation).

torchvision's ``vgg16`` state dict holds 13 convs ``features.N.{weight,bias}``
(``N`` in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; weights OIHW) and
three linear layers ``classifier.{0,3,6}.{weight,bias}`` (weights ``(out, in)``).
They become:

* conv1_1, conv1_2 → the category module; conv2_1 … conv5_3 → the
  classification task module; kernels OIHW → HWIO;
* ``classifier.0`` (fc6, ``(4096, 25088)``) → a 7×7 conv. PyTorch flattens
  pool5 in (C, H, W) order, so the weight is reshaped to ``(4096, 512, 7, 7)``
  and permuted to a ``(7, 7, 512, 4096)`` HWIO kernel;
* ``classifier.3`` (fc7) and ``classifier.6`` (fc8) → 1×1 convs.

torchvision's VGG-16 average-pools pool5 to 7×7 (``AdaptiveAvgPool2d((7, 7))``)
before the classifier. At a 224² input pool5 is already 7×7 and that pooling is
the identity, so the converted network reproduces torchvision's logits there.
On larger inputs the converted network runs fully convolutionally (fc6 as a
VALID 7×7 conv) and returns an ``S×S`` score map, which equals torchvision's
classifier applied at every 7×7 window of pool5 — not torchvision's output on
the enlarged image, which average-pools pool5 down to 7×7 first.

Inputs are NHWC float32 images normalised as torchvision expects (RGB in
[0, 1], minus mean ``(0.485, 0.456, 0.406)``, divided by std
``(0.229, 0.224, 0.225)``).

State dicts are read by :mod:`nettransplant.interop.state_dicts`; the PyTorch
reference networks that verify a conversion are in :mod:`nettransplant.interop.torch_check`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nettransplant.core import modules
from nettransplant.core.fcn8s import FCN_UPSAMPLING
from nettransplant.interop.state_dicts import (
    StateDictSource,
    _summarise,
    read_state_dict,
)

Array = jax.Array
Params = dict[str, Any]

ARCHITECTURE = "vgg16"
IMAGENET_CLASSES = 1000
INPUT_SIZE = modules.FULL_SCALE_INPUT
POOL5_SIZE = INPUT_SIZE // 32
# Convs per block of torchvision's VGG configurations "A", "B", "D", "E".
VGG_CONVS_PER_BLOCK = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": tuple(n for _, n in modules.VGG16_BLOCKS),
    "vgg19": (2, 2, 4, 4, 4),
}
# classifier.{0,3,6} = Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
FC_LAYERS = (("fc6", "classifier.0"), ("fc7", "classifier.3"), ("fc8", "classifier.6"))
CATEGORY_LAYERS = ("conv1_1", "conv1_2")


# --------------------------------------------------------------------------- layout


def vgg_feature_indices(convs_per_block: Sequence[int], *,
                        batch_norm: bool = False) -> tuple[int, ...]:
    """Indices of the convs in a torchvision VGG's ``features`` Sequential.

    Each conv is followed by a ReLU — with ``batch_norm``, by a BatchNorm2d and
    then the ReLU — and each block ends in a MaxPool2d.
    ``(2, 2, 3, 3, 3)`` → ``(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)``.
    """
    step = 3 if batch_norm else 2
    indices: list[int] = []
    index = 0
    for n in convs_per_block:
        for _ in range(n):
            indices.append(index)
            index += step
        index += 1  # MaxPool2d
    return tuple(indices)


def vgg16_conv_names() -> tuple[tuple[str, int], ...]:
    """``(nettransplant name, torchvision features index)`` of VGG-16's 13 convs."""
    names = [f"conv{b}_{i}" for b, (_, n) in enumerate(modules.VGG16_BLOCKS, 1)
             for i in range(1, n + 1)]
    return tuple(zip(names, vgg_feature_indices(VGG_CONVS_PER_BLOCK["vgg16"])))


def torchvision_vgg16_shapes(num_classes: int = IMAGENET_CLASSES) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's ``vgg16(num_classes=...)`` state dict and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    conv_names = iter(vgg16_conv_names())
    for channels, n in modules.VGG16_BLOCKS:
        for _ in range(n):
            _, index = next(conv_names)
            shapes[f"features.{index}.weight"] = (channels, in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (channels,)
            in_channels = channels
    fc = modules.VGG16_FC_WIDTH
    fc_shapes = {"fc6": (fc, in_channels * POOL5_SIZE ** 2), "fc7": (fc, fc),
                 "fc8": (num_classes, fc)}
    for name, key in FC_LAYERS:
        shapes[f"{key}.weight"] = fc_shapes[name]
        shapes[f"{key}.bias"] = fc_shapes[name][:1]
    return shapes


def detect_architecture(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Name the torchvision architecture a state dict's keys and shapes belong to.

    Returns ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"`` (with ``"_bn"``
    for the batch-norm variants), ``"alexnet"``, ``"resnet"``, ``"densenet"``,
    or None when the layout is not recognised (e.g. a VGG-16 with keys missing).
    """
    keys = set(shapes)
    if "fc.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    if any(k.startswith("features.denseblock") for k in keys):
        return "densenet"
    conv_indices = sorted(
        int(k.split(".")[1]) for k in keys
        if k.startswith("features.") and k.endswith(".weight") and k.count(".") == 2
        and k.split(".")[1].isdigit() and len(shapes[k]) == 4)
    if not conv_indices:
        return None
    if len(conv_indices) == 5 and "classifier.1.weight" in keys:
        return "alexnet"
    for name, convs in VGG_CONVS_PER_BLOCK.items():
        for batch_norm in (False, True):
            if tuple(conv_indices) == vgg_feature_indices(convs, batch_norm=batch_norm):
                return name + ("_bn" if batch_norm else "")
    return None



def validate_vgg16_state_dict(state: Mapping[str, np.ndarray], origin: str = "the state dict",
                              ) -> int:
    """Check that ``state`` is exactly torchvision's VGG-16; return its number of classes.

    ``classifier.6`` may have any number of classes K (1000 for ImageNet).
    Floating dtypes of any precision are accepted (conversion casts to float32).

    Raises:
      ValueError: another architecture (named when recognised), or one line
        listing the missing, unexpected, mis-shaped and non-floating keys
        (up to :data:`MAX_LISTED_KEYS` of each, then how many more).
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    architecture = detect_architecture(shapes)
    if architecture not in (None, ARCHITECTURE):
        hint = ""
        if architecture.endswith("_bn"):
            hint = (" Its batch-norm layers shift the feature indices and carry running "
                    "statistics; nettransplant's VGG-16 has no batch norm, so use the plain "
                    "vgg16 weights (torchvision's VGG16_Weights.IMAGENET1K_V1).")
        raise ValueError(
            f"{origin} holds a torchvision {architecture} state dict; only {ARCHITECTURE} "
            f"(without batch norm) can be converted.{hint}")

    head = shapes.get("classifier.6.weight")
    num_classes = (head[0] if head is not None and len(head) == 2 and head[0] >= 1
                   else IMAGENET_CLASSES)
    expected = torchvision_vgg16_shapes(num_classes)
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in expected)
    misshaped = [f"{k} has shape {shapes[k]}, expected {expected[k]}"
                 for k in expected if k in shapes and shapes[k] != expected[k]]
    not_float = [f"{k} ({state[k].dtype})" for k in expected
                 if k in state and not np.issubdtype(state[k].dtype, np.floating)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", misshaped), ("non-floating keys", not_float)):
        if items:
            problems.append(f"{title} ({len(items)}): {_summarise(items)}")
    if problems:
        raise ValueError(f"{origin} is not a torchvision {ARCHITECTURE} state dict: "
                         + " | ".join(problems))
    return num_classes


# --------------------------------------------------------------------------- conversion


def conv_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``(O, I, kh, kw)`` → HWIO kernel ``(kh, kw, I, O)``."""
    return np.transpose(weight, (2, 3, 1, 0))


def fc6_kernel_from_torch(weight: np.ndarray, channels: int, size: int) -> np.ndarray:
    """fc6 ``(O, C·size·size)`` → a ``(size, size, C, O)`` conv kernel.

    PyTorch flattens pool5 ``(C, H, W)`` with W fastest, so the weight is read as
    ``(O, C, H, W)`` and permuted to HWIO.
    """
    return conv_kernel_from_torch(weight.reshape(weight.shape[0], channels, size, size))


def linear_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch linear weight ``(O, I)`` → a 1×1 conv kernel ``(1, 1, I, O)``."""
    return weight.T[None, None]


def _conv_params(kernel: np.ndarray, bias: np.ndarray) -> dict[str, Array]:
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def vgg16_params_from_state_dict(state: Mapping[str, np.ndarray]) -> Params:
    """Convert a validated torchvision VGG-16 state dict (numpy arrays).

    Returns:
      ``{"category_module": {conv1_1, conv1_2}, "classification_module":
      {conv2_1 … conv5_3, fc6 (7, 7, 512, 4096), fc7 (1, 1, 4096, 4096),
      fc8 (1, 1, 4096, K)}}``, each ``{"kernel": HWIO, "bias": (O,)}``, float32.
    """
    category: dict[str, Any] = {}
    classification: dict[str, Any] = {}
    for name, index in vgg16_conv_names():
        target = category if name in CATEGORY_LAYERS else classification
        target[name] = _conv_params(conv_kernel_from_torch(state[f"features.{index}.weight"]),
                                    state[f"features.{index}.bias"])
    pool5_channels = modules.VGG16_BLOCKS[-1][0]
    kernels = {
        "fc6": fc6_kernel_from_torch(state["classifier.0.weight"], pool5_channels, POOL5_SIZE),
        "fc7": linear_kernel_from_torch(state["classifier.3.weight"]),
        "fc8": linear_kernel_from_torch(state["classifier.6.weight"]),
    }
    for name, key in FC_LAYERS:
        classification[name] = _conv_params(kernels[name], state[f"{key}.bias"])
    return {"category_module": category, "classification_module": classification}


def _as_key(key: Array | int) -> Array:
    return jax.random.key(int(key)) if isinstance(key, int | np.integer) else key


def fresh_head(num_outputs: int, key: Array | int = 0) -> dict[str, Array]:
    """A newly initialised fc8: ``{"kernel": (1, 1, 4096, K), "bias": (K,)}``.

    Drawn with the classification task module's own fc8 initialiser (normal,
    std 0.01) and zero bias; ``key`` is a PRNG key or an integer seed.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    task_module = modules.ClassificationTaskModule(num_outputs=num_outputs)
    init = task_module.kernel_inits()["fc8"]
    kernel = init(_as_key(key), (1, 1, modules.VGG16_FC_WIDTH, num_outputs), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_outputs,), jnp.float32)}


class VGG16Classifier(nn.Module):
    """VGG-16 as category module + fully convolutional classification task module.

    ``images (B, H, W, 3)`` (NHWC, torchvision-normalised, H, W >= 224) →
    logits ``(B, K)`` when the score map is 1×1 (a 224² input, as torchvision
    returns), else the score map ``(B, S, S, K)`` with ``S = H // 32 - 6``.
    Parameters: ``{"category_module": ..., "classification_module": ...}``.
    """

    category_module: modules.CategoryModule
    classification_module: modules.ClassificationTaskModule

    def __call__(self, images: Array, *, train: bool = False) -> Array:
        """Logits ``(B, K)`` or the score map ``(B, S, S, K)``; dropout with ``train=True``."""
        x, _ = self.category_module(images, train=train)
        scores, _ = self.classification_module(x, train=train)
        if scores.shape[1:3] == (1, 1):
            return scores[:, 0, 0]
        return scores


def make_vgg16_classifier(num_outputs: int = IMAGENET_CLASSES, *,
                          dropout_rate: float = 0.5) -> VGG16Classifier:
    """A full-width :class:`VGG16Classifier` with fc6 sized for 224² inputs (7×7 kernel)."""
    return VGG16Classifier(
        category_module=modules.CategoryModule(width=1.0),
        classification_module=modules.ClassificationTaskModule(
            width=1.0, input_size=INPUT_SIZE, num_outputs=num_outputs,
            dropout_rate=dropout_rate))


def vgg16_from_state_dict(state: Mapping[str, np.ndarray], origin: str = "the state dict", *,
                          num_outputs: int | None = None, key: Array | int = 0,
                          ) -> tuple[VGG16Classifier, Params]:
    """Validate and convert a state dict already read by :func:`read_state_dict`.

    Args:
      state: ``{torchvision key: numpy array}`` (any floating dtype).
      origin: names the state dict in error messages.
      num_outputs, key: as in :func:`load_torchvision_vgg16`.
    Returns:
      ``(VGG16Classifier, {"category_module": ..., "classification_module": ...})``.
    Raises:
      ValueError: not a torchvision VGG-16 state dict (:func:`validate_vgg16_state_dict`).
    """
    if num_outputs is not None and num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    stored_classes = validate_vgg16_state_dict(state, origin)
    params = vgg16_params_from_state_dict(state)
    if num_outputs is not None:
        params["classification_module"]["fc8"] = fresh_head(num_outputs, key)
    return make_vgg16_classifier(num_outputs or stored_classes), params


def load_torchvision_vgg16(source: StateDictSource, *, num_outputs: int | None = None,
                           key: Array | int = 0, state_dict_key: str | None = None,
                           ) -> tuple[VGG16Classifier, Params]:
    """Load torchvision VGG-16 weights as ``(model, params)``.

    ``model.apply({"params": params}, images)`` with NHWC images ``(B, 224, 224, 3)``
    gives the logits ``(B, K)`` of ``torchvision.models.vgg16().eval()`` on the
    same images in NCHW; larger images give a score map ``(B, S, S, K)``.

    Args:
      source: ``.pth``/``.pt`` file (needs PyTorch), ``.safetensors`` file, or a
        state dict in memory (torch tensors or numpy arrays); float32, float16
        or bfloat16 weights.
      num_outputs: None keeps the stored head (K = 1000 ImageNet classes for
        torchvision's weights); an integer replaces fc8 by a fresh K-output head.
      key: PRNG key or integer seed for the fresh head.
      state_dict_key: the entry of a checkpoint dict that holds the weights
        (``key`` of :func:`read_state_dict`); None finds it.
    Returns:
      ``(VGG16Classifier, {"category_module": ..., "classification_module": ...})``,
      float32 whatever the stored precision.
    Raises:
      ValueError: not a torchvision VGG-16 state dict (see
        :func:`validate_vgg16_state_dict`), or an unreadable file (see
        :func:`read_state_dict`).
    """
    state, origin = read_state_dict(source, key=state_dict_key, check=validate_vgg16_state_dict)
    return vgg16_from_state_dict(state, origin, num_outputs=num_outputs, key=key)


# --------------------------------------------------------------------------- FCN-8s


def fcn8s_params_from_vgg16(vgg16_params: Mapping[str, Any], num_classes: int = 2) -> Params:
    """FCN-8s segmentation task module parameters initialised from VGG-16, as FCN does.

    conv2_1 … conv5_3, fc6 and fc7 are VGG-16's (the segmentation module's fc6
    is a SAME 7×7 conv taking the same ``(7, 7, 512, 4096)`` kernel); score_fr,
    score_pool4 and score_pool3 are zero; upscore2, upscore_pool4 and upscore8
    are bilinear kernels (:func:`modules.bilinear_upsampling_kernel`).

    Args:
      vgg16_params: ``{"category_module", "classification_module"}`` as returned by
        :func:`load_torchvision_vgg16` (any width).
      num_classes: segmentation classes C.
    Returns:
      The ``segmentation_module`` parameters of :class:`modules.SegmentationTaskModule`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    classification = vgg16_params["classification_module"]
    params: dict[str, Any] = {name: dict(p) for name, p in classification.items() if name != "fc8"}

    def zero_score(in_channels: int) -> dict[str, Array]:
        return {"kernel": jnp.zeros((1, 1, in_channels, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32)}

    params["score_fr"] = zero_score(classification["fc7"]["kernel"].shape[-1])
    params["score_pool4"] = zero_score(classification["conv4_3"]["kernel"].shape[-1])
    params["score_pool3"] = zero_score(classification["conv3_3"]["kernel"].shape[-1])
    for name, stride in FCN_UPSAMPLING:
        params[name] = {"kernel": jnp.asarray(
            modules.bilinear_upsampling_kernel(2 * stride, num_classes))}
    return params


def load_torchvision_teacher(source: StateDictSource, *, num_outputs: int | None = None,
                             num_classes: int = 2, key: Array | int = 0,
                             state_dict_key: str | None = None,
                             ) -> tuple[modules.Teacher, Params]:
    """A full-width :class:`modules.Teacher` initialised from torchvision VGG-16 weights.

    Category module and classification task module as in
    :func:`load_torchvision_vgg16`; the segmentation task module from
    :func:`fcn8s_params_from_vgg16`. ``state_dict_key`` picks the entry of a
    checkpoint dict holding the weights, as in :func:`read_state_dict`.

    Returns:
      ``(teacher, {"category_module", "classification_module",
      "segmentation_module"})``; ``teacher.apply({"params": params}, images)`` with
      ``(B, 224, 224, 3)`` images gives ``({"classification": (B, 1, 1, K),
      "segmentation": (B, 224, 224, num_classes)}, intermediates)``.
    """
    classifier, params = load_torchvision_vgg16(source, num_outputs=num_outputs, key=key,
                                                state_dict_key=state_dict_key)
    params["segmentation_module"] = fcn8s_params_from_vgg16(params, num_classes)
    teacher = modules.make_teacher(
        width=1.0, input_size=INPUT_SIZE,
        num_outputs=classifier.classification_module.num_outputs, num_classes=num_classes)
    return teacher, params
