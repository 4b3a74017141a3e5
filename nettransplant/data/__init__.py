"""Data: the embedded animal-silhouette benchmark, task views, paper-scale loaders, batching.

Images are uint8 RGB ``(N, H, W, 3)`` everywhere; :func:`normalize_images`
makes the network input (float32, ImageNet mean/std on [0, 1] RGB, as
torchvision's VGG-16 expects). Masks are uint8 ``(N, H, W)``: 1 object, 0
background (255 = ignore, only where a paper-scale loader is asked to keep it).

Modules: :mod:`~nettransplant.data.animal_mnist` (safe reading of the source
files), :mod:`~nettransplant.data.composite` (how images are made),
:mod:`~nettransplant.data.silhouettes` (the TFDS builder and loader),
:mod:`~nettransplant.data.tasks` (task views and few-shot sets),
:mod:`~nettransplant.data.baselines` (threshold / majority pixel baselines),
:mod:`~nettransplant.data.pipeline` (batches),
:mod:`~nettransplant.data.paper_scale` (VOC, Oxford-IIIT Pet, VOC + SBD) and
:mod:`~nettransplant.data.benchmarks` (every view the main job reads, per dataset).
"""

from nettransplant.data.animal_mnist import (
    CATEGORIES,
    DISSIMILAR,
    INSTALL_COMMAND,
    MAMMALS,
    DataFileError,
    load_animal_mnist,
)
from nettransplant.data.baselines import majority_baseline, threshold_baseline
from nettransplant.data.composite import background_scenes
from nettransplant.data.pipeline import iterate_batches
from nettransplant.data.silhouettes import (
    AnimalSilhouettes,
    ImageSet,
    build_silhouettes,
    default_data_dir,
    load_silhouettes,
    rerender,
)
from nettransplant.data.tasks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAMPLE_COUNTS,
    binary_classification,
    few_shot,
    few_shot_indices,
    leave_one_out_categories,
    normalize_images,
    positive_set,
    segmentation,
    unlabelled_images,
    validation_set,
)

__all__ = [
    "CATEGORIES", "DISSIMILAR", "IMAGENET_MEAN", "IMAGENET_STD", "INSTALL_COMMAND", "MAMMALS",
    "SAMPLE_COUNTS", "AnimalSilhouettes", "DataFileError", "ImageSet", "background_scenes",
    "binary_classification", "build_silhouettes", "default_data_dir", "few_shot",
    "few_shot_indices", "iterate_batches", "leave_one_out_categories", "load_animal_mnist",
    "load_silhouettes", "majority_baseline", "normalize_images", "positive_set", "rerender",
    "segmentation", "threshold_baseline", "unlabelled_images", "validation_set",
]
