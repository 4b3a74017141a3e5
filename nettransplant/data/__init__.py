"""Data: the embedded animal-silhouette benchmark, task views, paper-scale loaders, batching."""

from nettransplant.data.animal_mnist import (
    CATEGORIES,
    DISSIMILAR,
    INSTALL_COMMAND,
    MAMMALS,
    DataFileError,
    load_animal_mnist,
)
from nettransplant.data.silhouettes import (
    AnimalSilhouettes,
    ImageSet,
    build_silhouettes,
    load_silhouettes,
)
from nettransplant.data.tasks import (
    SAMPLE_COUNTS,
    binary_classification,
    few_shot,
    normalize_images,
    segmentation,
    unlabelled_images,
)

__all__ = [
    "CATEGORIES", "DISSIMILAR", "INSTALL_COMMAND", "MAMMALS", "SAMPLE_COUNTS", "AnimalSilhouettes",
    "DataFileError", "ImageSet", "binary_classification", "build_silhouettes", "few_shot",
    "load_animal_mnist", "load_silhouettes", "normalize_images", "segmentation",
    "unlabelled_images",
]
