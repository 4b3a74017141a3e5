"""Convert torchvision VGG-16 weights into a nettransplant checkpoint.

    python -m launch.convert_torchvision --weights vgg16-397923af.pth --out ckpt/vgg16 \\
        [--key state_dict] [--num-outputs K] [--seed 0] [--verify] [--overwrite]

Reads a ``.pth``/``.pt``/``.bin`` (needs PyTorch; loaded with
``weights_only=True``, so the file runs no code) or ``.safetensors`` state dict
of torchvision's ``vgg16`` in float32, float16 or bfloat16, converts it with
:func:`nettransplant.interop.vgg16.vgg16_from_state_dict` (``--num-outputs`` replaces
the 1000-class head by a fresh one drawn from ``--seed``) and writes
``{"category_module", "classification_module"}`` (float32) with
:func:`nettransplant.training.checkpoint.save_checkpoint`. A checkpoint dict that wraps
the weights (``{"state_dict": ..., "epoch": ...}``) is unwrapped when one entry
among ``state_dict``, ``model``, ``model_state_dict``, ``net``, ``weights``
holds them; ``--key NAME`` (``a/b`` for a nested entry) names the entry. The
metadata records the source file and its sha256, the architecture,
``num_outputs``, the head, the seed and the nettransplant version. Rebuild the
model with ``nettransplant.interop.vgg16.make_vgg16_classifier(metadata["num_outputs"])``.

``--verify`` (needs PyTorch) compares the converted logits with a PyTorch VGG-16
holding the same weights on random images (224², and 288² fully convolutionally),
prints the max abs/rel differences and writes nothing if they exceed
``--tolerance``. Full-width VGG-16 on a CPU XLA path takes ~10 s per verified size.

Every expected error is one line on stderr, ``error: <message>``: exit status 2
for bad arguments (a missing weights file, an ``--out`` that may not be replaced
or whose folder is not writable, a missing PyTorch) and for a full disk, 1 when
the weights are refused or verification fails. An unexpected error (a bug)
prints its traceback and one line asking for a report. The checkpoint is
written last and atomically, so a failed run leaves whatever was at ``--out``
as it was.
"""

import sys

from nettransplant.interop.command import main, parse_args  # noqa: F401 - the command's API

if __name__ == "__main__":
    sys.exit(main())
