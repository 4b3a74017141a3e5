"""Torchvision VGG-16 weights in nettransplant's modules.

* :mod:`~nettransplant.interop.state_dicts` — read a state dict (PyTorch or
  ``.safetensors`` file, or memory), its layout checked before loading;
* :mod:`~nettransplant.interop.vgg16` — torchvision's VGG-16 layout → the category and
  task modules (and an FCN-8s initialisation);
* :mod:`~nettransplant.interop.torch_check` — PyTorch reference networks that verify a
  conversion;
* :mod:`~nettransplant.interop.command` — ``python -m launch.convert_torchvision``.
"""
