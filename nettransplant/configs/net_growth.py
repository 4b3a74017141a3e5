"""Growing a transplant net on the embedded data: choosing the task module, fine-tuning.

    nettransplant growth --workdir W     # after nettransplant reproduce --workdir W
    nettransplant growth --workdir W --config net_growth:quick

Reuses the main job's teachers in ``W/teachers`` (trains the missing ones with
the main job's settings) and writes ``W/growth/results.json`` and
``W/growth/results.md``; 589 s measured with the teachers present, on a 2-core
CPU shared with other work.

* **Choosing the task module**: every target category is transplanted onto
  every other category's task module (back-distill, ``growth.samples``
  labelled samples); the zero-sample residual of each candidate
  (``nettransplant.net.operations.rank_task_modules``) is compared with the transplant's
  test error / pixel accuracy (Spearman's ρ, and whether the residual's first
  choice is the best transplant).
* **Fine-tuning and forgetting**: the net of the generic category's teacher
  with every target transplanted onto its task modules; the generic
  classification module is then fine-tuned on ``growth.fine_tune_categories``
  and every route is scored before and after (the routes of the other
  categories measure the forgetting; without fine-tuning no route changes).
"""

import ml_collections

from nettransplant.configs import silhouettes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The main job's config (``arg`` selects its variant) plus a ``growth`` section."""
    config = silhouettes.get_config(arg)
    config.growth = ml_collections.ConfigDict()
    config.growth.tasks = ("classification", "segmentation")
    config.growth.samples = 20  # labelled samples per transplant
    config.growth.fine_tune_categories = ("cat", "cow")
    config.growth.fine_tune_samples = 20  # per fine-tuned category
    config.growth.fine_tune_steps = 100
    config.growth.fine_tune_learning_rate = 1e-4
    config.growth.fine_tune_batch_size = 32
    if arg == "quick":
        config.categories = ("cat", "cow", "dog")
        config.target_categories = ("cat", "cow")
        config.growth.tasks = ("classification",)
        config.growth.samples = 10
        config.growth.fine_tune_categories = ("cat",)
        config.growth.fine_tune_samples = 10
        config.growth.fine_tune_steps = 10
    return config
