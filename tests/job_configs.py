"""The main job's quick config trimmed for tests that run it whole or in parts."""

from nettransplant.configs import silhouettes

# Two short teachers (no backbone), small batches and Exp. 3's 16 cells (0, 10, 20 and
# 50 samples: enough that a run killed after its first cell still has cells left to
# interrupt). As flags for subprocesses: ``--config.{key}={value!r}``.
TRIMMED = {"pretrain.num_steps": 0, "experiments": ("exp3",), "categories": ("cat",),
           "sample_counts": (0, 10, 20, 50),
           "teacher.num_steps": 10, "teacher.checkpoint_every": 5, "teacher.renderings": 1,
           "teacher.batch_size": 16, "teacher.seg_batch_size": 8,
           "transplant.num_steps": 4, "transplant.batch_size": 16,
           "transplant.num_draws": 8, "transplant.closed_form_draws": 8,
           "transplant.early_end_every": 2}


def trimmed_quick_config():
    """``nettransplant/configs/silhouettes.py:quick`` with :data:`TRIMMED`, in this process."""
    config = silhouettes.get_config("quick")
    config.update_from_flattened_dict(TRIMMED)
    return config
