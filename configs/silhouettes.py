"""Embedded default: the paper's experiments on composited animal silhouettes.

Run:  python -m launch.reproduce --config configs/silhouettes.py --workdir workdir
Quick variant (CI smoke test):  --config configs/silhouettes.py:quick

VGG-16 topology at width 1/8 on 32×32 images: x = f(I) is 16×16×8, fc6 is a
1×1 conv, and a 7×7 G_y' back-propagates to a 112×112 enlarged D'.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Model sizes shared by teachers, task modules and adapters.
    config.model = ml_collections.ConfigDict()
    config.model.width = 0.125
    config.model.image_size = 32
    config.model.dropout_rate = 0.5
    config.model.num_classes = 2  # segmentation: background / object

    # Teachers: category module + classification + segmentation task modules.
    config.teacher = ml_collections.ConfigDict()
    config.teacher.num_steps = 600
    config.teacher.batch_size = 32
    config.teacher.learning_rate = 1e-3

    # Back-distillation (paper Sec. 3; DESIGN.md §2).
    config.transplant = ml_collections.ConfigDict()
    config.transplant.score_size = 7  # S of the enlarged classification G_y'
    config.transplant.positive_fraction = 0.2  # x_rand: 20 % positive entries
    config.transplant.num_draws = 256  # cached (G_y', x_rand) bank per transplant
    config.transplant.draws_per_step = 8
    config.transplant.batch_size = 32  # labelled images per step (padded, masked)
    config.transplant.lambda0_classification = 10.0
    config.transplant.lambda0_segmentation = 1.0
    config.transplant.learning_rate = 1e-3
    config.transplant.num_steps = 300
    config.transplant.closed_form_ridge = 1e-6
    # Draws the closed form's normal equations use: k²M unknowns per channel,
    # h·w equations per draw, so a few dozen draws pin the solution down.
    config.transplant.closed_form_draws = 16

    # Adapters per experiment: (num_convs, kernel_size).
    config.adapters = ml_collections.ConfigDict()
    config.adapters.exp1_1conv = (1, 3)
    config.adapters.exp1_3conv = (3, 3)
    config.adapters.exp2 = (3, 1)
    config.adapters.exp3 = (1, 1)

    if arg == "quick":
        config.teacher.num_steps = 60
        config.transplant.num_draws = 32
        config.transplant.num_steps = 20
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/silhouettes.py (try 'quick')")
    return config
