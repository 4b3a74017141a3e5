"""Knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018) as its own system.

Layers, top to bottom:

* :mod:`~nettransplant.jacobian.losses` — Jacobian matching on per-example
  L2-normalised input gradients, distillation with input noise, attention
  transfer, LwF, and the two sides of the noise ↔ Jacobian equivalence;
* :mod:`~nettransplant.jacobian.models` — small conv classifiers with named
  intermediates and one head per task;
* :mod:`~nettransplant.jacobian.train` — the whole-student step factory on the
  project's one loop (:mod:`nettransplant.training.loop`);
* :mod:`~nettransplant.jacobian.data` — the raw silhouette classification task;
* :mod:`~nettransplant.jacobian.experiments` — distillation, robustness and
  transfer runs (``nettransplant jacobian``);
* :mod:`~nettransplant.jacobian.report` — claims, ``results.md``, plots.
"""

from nettransplant.jacobian.losses import (
    SELECTIONS,
    attention_maps,
    attention_transfer_loss,
    classification_loss,
    first_order_noise_matching,
    gaussian_noise,
    input_gradients,
    jacobian_distance,
    jacobian_matching_loss,
    lwf_loss,
    monte_carlo_noise_matching,
    noisy_output_matching_loss,
    normalise_per_example,
    output_matching_loss,
    selected_outputs,
)
from nettransplant.jacobian.models import ConvClassifier, make_classifier, vgg_style_trunk
from nettransplant.jacobian.train import fit, make_train_step

__all__ = [
    "SELECTIONS", "ConvClassifier", "attention_maps", "attention_transfer_loss",
    "classification_loss", "first_order_noise_matching", "fit", "gaussian_noise",
    "input_gradients", "jacobian_distance", "jacobian_matching_loss", "lwf_loss",
    "make_classifier", "make_train_step", "monte_carlo_noise_matching",
    "noisy_output_matching_loss", "normalise_per_example", "output_matching_loss",
    "selected_outputs", "vgg_style_trunk",
]
