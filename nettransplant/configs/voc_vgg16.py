"""Paper scale: full-width VGG-16 / FCN-8s at 224×224 on VOC 2012 + SBD (GPU or TPU).

Run (after fetching the data, see below):

    nettransplant reproduce --workdir workdir/voc --config voc_vgg16 \\
        --config.voc.manual_dir=/data/voc_sbd --config.pretrain.weights=vgg16-397923af.pth

* ``voc.manual_dir`` holds the extracted VOC 2012 trainval archive
  (``VOCdevkit/VOC2012``) and SBD (``benchmark_RELEASE``); the VOC + SBD
  segmentation dataset is built there on first use.
* VOC 2012 classification is TFDS ``voc/2012`` (``tfds build voc/2012
  --file_format=array_record`` on a
  machine with internet; ``voc.tfds_data_dir`` if not TFDS's default folder).
* ``pretrain.weights``: torchvision's ImageNet VGG-16 state dict. Teachers start
  from it (FCN-8s initialised from it as FCN does); empty trains them from
  scratch. VOC's validation split is the test split.

x = f(I) is 112×112×64; fc6 is a 7×7 conv, so a 7×7 G_y' back-propagates to a
208×208 enlarged D'. Teacher and transplant schedules are the embedded
default's and have not been tuned at this scale.
"""

import ml_collections

from nettransplant.configs import silhouettes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = silhouettes.get_config()
    config.data = "voc_sbd"  # VOC 2012 classification + VOC/SBD segmentation
    config.voc = ml_collections.ConfigDict()
    config.voc.manual_dir = ""  # VOCdevkit/ and benchmark_RELEASE/ live here
    config.voc.tfds_data_dir = ""  # TFDS data dir holding voc/2012 ("" = TFDS's default)
    config.model.width = 1.0
    config.model.image_size = 224
    config.pretrain.num_steps = 0  # the ImageNet weights play the backbone's part
    config.pretrain.renderings = 1
    config.pretrain.shipped = False  # the shipped backbone is the silhouettes' one
    config.teacher.renderings = 1  # re-rendering is the silhouettes' augmentation
    config.transplant.num_draws = 512
    config.transplant.draws_per_step = 8
    config.transplant.batch_size = 32
    if arg:
        raise ValueError(f"unknown variant {arg!r} of nettransplant/configs/voc_vgg16.py")
    return config
