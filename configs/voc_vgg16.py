"""Paper scale: full-width VGG-16 / FCN-8s at 224×224 on VOC / SBD (GPU or TPU).

x = f(I) is 112×112×64; fc6 is a 7×7 conv, so a 7×7 G_y' back-propagates to a
208×208 enlarged D'.
"""

import ml_collections

from configs import silhouettes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = silhouettes.get_config()
    config.data = "voc_sbd"  # VOC 2012 classification + VOC/SBD segmentation
    config.model.width = 1.0
    config.model.image_size = 224
    config.transplant.num_draws = 512
    config.transplant.draws_per_step = 8
    config.transplant.batch_size = 32
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/voc_vgg16.py")
    return config
