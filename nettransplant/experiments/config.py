"""The main job's configuration: checked before anything runs, each error naming its field.

:func:`validate_config` fails early — before a teacher is trained or a file
written — on categories, experiments, counts and settings that cannot run.
"""

from __future__ import annotations

from pathlib import Path

from nettransplant import convert
from nettransplant.data import benchmarks

EXPERIMENTS = ("exp1", "exp2", "exp3", "table4")


def validate_config(config) -> None:
    """Fail early, naming the config field, on categories or experiments that cannot run."""
    if config.data not in benchmarks.BENCHMARKS:
        raise ValueError(f"config.data={config.data!r}: unknown benchmark; choose from "
                         f"{list(benchmarks.BENCHMARKS)}")
    benchmark = benchmarks.BENCHMARKS[config.data]

    def known(field, names):
        bad = [n for n in names if n not in benchmark.categories]
        if bad:
            raise ValueError(f"config.{field}: unknown categories {bad}; {config.data!r} has "
                             f"{list(benchmark.categories)}")

    known("categories", config.categories)
    known("target_categories", config.target_categories)
    known("generic_category", [config.generic_category])
    if config.generic_category in config.target_categories:
        raise ValueError(f"config.generic_category={config.generic_category!r} is also in "
                         f"config.target_categories {list(config.target_categories)}: a category "
                         "transplanted to its own task module is Exp. 1")
    bad = [e for e in config.experiments if e not in EXPERIMENTS]
    if bad:
        raise ValueError(f"config.experiments: unknown {bad}; choose from {list(EXPERIMENTS)}")
    if "table4" in config.experiments:
        not_mammal = [c for c in config.target_categories if c not in benchmark.mammals]
        if not_mammal:
            raise ValueError(f"config.target_categories: Table 4's leave-one-out modules hold "
                             f"out a mammal, got {not_mammal}")
    for field, value, low in (("pretrain.num_steps", config.pretrain.num_steps, 0),
                              ("teacher.num_steps", config.teacher.num_steps, 1),
                              ("teacher.renderings", config.teacher.renderings, 1),
                              ("teacher.batch_size", config.teacher.batch_size, 1),
                              ("teacher.seg_batch_size", config.teacher.seg_batch_size, 1)):
        if int(value) < low:
            raise ValueError(f"config.{field} must be >= {low}, got {value}")
    counts = [int(n) for n in config.sample_counts]
    if any(n < 0 for n in counts) or sorted(set(counts)) != counts:
        raise ValueError(f"config.sample_counts must be increasing and >= 0, got {counts}")
    benchmark.check_config(config)
    weights = config.pretrain.get("weights", "")
    if weights:
        if config.pretrain.num_steps:
            raise ValueError("config.pretrain.weights and config.pretrain.num_steps > 0 are "
                             "two initialisations of the teachers; set num_steps to 0")
        if not Path(weights).is_file():
            raise ValueError(f"config.pretrain.weights: no file {weights}")
        size = convert.INPUT_SIZE
        if config.model.width != 1.0 or config.model.image_size != size:
            raise ValueError(
                f"config.pretrain.weights holds torchvision's full VGG-16: it needs "
                f"config.model.width = 1.0 and config.model.image_size = {size}, got "
                f"{config.model.width} and {config.model.image_size}")
