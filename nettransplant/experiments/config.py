"""The main job's configuration: checked before anything runs, each error naming its field.

:func:`validate_config` fails early — before a teacher is trained or a file
written — on categories, experiments, counts and settings that cannot run, and
on every number outside its range (negative, zero, huge, NaN, of the wrong
type). :func:`override_error` names a ``--config.<field>`` flag that names no
field, with the valid ones.

``--config`` names a packaged config (``silhouettes:quick`` is
``nettransplant/configs/silhouettes.py`` called with ``quick``; :func:`config_file`) or a
file (``path/to/file.py[:arg]``); :func:`parse_config_flags` parses a command's flags
with it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags

from nettransplant import configs
from nettransplant.data import benchmarks
from nettransplant.interop import vgg16
from nettransplant.runtime import cli
from nettransplant.transplant import runs
from nettransplant.transplant.wiring import check_draws

EXPERIMENTS = ("exp1", "exp2", "exp3", "table4")

# Bounds far above any sensible run: a value beyond them is a typo (an extra zero
# or a missing decimal point), caught before hours of work are spent on it.
_STEPS, _BATCH, _IMAGES = 10**7, 2**16, 10**6

# (field, type, low, high): every number of the main job's config and its range;
# a learning rate only has to be positive and finite (divergence is caught in
# training: a failed cell).
NUMERIC_FIELDS: tuple[tuple[str, type, float, float], ...] = (
    ("seed", int, 0, 2**31 - 1),
    ("model.width", float, 1e-3, 16),
    ("model.image_size", int, 32, 1024),
    ("model.dropout_rate", float, 0, 0.99),
    ("model.num_classes", int, 2, 1000),
    ("pretrain.num_steps", int, 0, _STEPS),
    ("pretrain.batch_size", int, 1, _BATCH),
    ("pretrain.learning_rate", float, 1e-12, math.inf),
    ("teacher.num_steps", int, 1, _STEPS),
    ("teacher.batch_size", int, 1, _BATCH),
    ("teacher.seg_batch_size", int, 1, _BATCH),
    ("teacher.learning_rate", float, 1e-12, math.inf),
    ("teacher.checkpoint_every", int, 0, _STEPS),
    ("teacher.renderings", int, 1, 1000),
    ("teacher.generic_images", int, 1, _IMAGES),
    ("transplant.score_size", int, 1, 1024),
    ("transplant.positive_fraction", float, 1e-6, 1),
    ("transplant.num_draws", int, 1, _IMAGES),
    ("transplant.draws_per_step", int, 1, _BATCH),
    ("transplant.batch_size", int, 1, _BATCH),
    ("transplant.lambda0_classification", float, 1e-12, 1e12),
    ("transplant.lambda0_segmentation", float, 1e-12, 1e12),
    ("transplant.learning_rate", float, 1e-12, math.inf),
    ("transplant.num_steps", int, 1, _STEPS),
    ("transplant.closed_form_ridge", float, 0, 1e12),
    ("transplant.closed_form_draws", int, 1, _IMAGES),
    ("transplant.beta_images", int, 1, _IMAGES),
    ("transplant.log_every", int, 1, _STEPS),
    ("transplant.early_end_every", int, 0, _STEPS),
    ("transplant.learning_rate_segmentation", float, 1e-12, math.inf),
    ("transplant.restarts", int, 0, 100),
    ("transplant.restart_noise", float, 0, 100),
    ("evidence.confidence", float, 1e-6, 1 - 1e-6),
    ("evidence.margin", float, 0, 100),
    ("evidence.teacher_margin", float, 0, 100),
)
# Optional sections: checked when the config has them.
OPTIONAL_NUMERIC_FIELDS: tuple[tuple[str, type, float, float], ...] = (
    ("concurrent_cells", int, 1, 64),
    ("jacobian_baseline.task", float, 0, 1e12),
    ("jacobian_baseline.output_matching", float, 0, 1e12),
    ("jacobian_baseline.jacobian", float, 0, 1e12),
)


def _lookup(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def check_number(field: str, value, kind: type, low: float, high: float) -> None:
    """Raise a ValueError naming ``config.<field>`` unless ``value`` is a ``kind`` in
    ``[low, high]`` (an int for ``int``; an int or a finite float for ``float``)."""
    ok_type = (isinstance(value, int) if kind is int else isinstance(value, int | float)) \
        and not isinstance(value, bool)
    if not ok_type:
        raise ValueError(f"config.{field} must be {'an integer' if kind is int else 'a number'}"
                         f", got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"config.{field} must be finite, got {value}")
    if not low <= value <= high:
        bound = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        if kind is float and low > 0 and low < 1e-6:
            bound = "> 0"
        raise ValueError(f"config.{field} must be {bound}, got {value}")


def _check_numbers(config) -> None:
    for field, kind, low, high in NUMERIC_FIELDS:
        try:
            value = _lookup(config, field)
        except (KeyError, AttributeError):
            raise ValueError(f"config.{field} is missing") from None
        check_number(field, value, kind, low, high)
    for field, kind, low, high in OPTIONAL_NUMERIC_FIELDS:
        try:
            value = _lookup(config, field)
        except (KeyError, AttributeError):
            continue
        check_number(field, value, kind, low, high)
    if config.model.image_size % 32:
        raise ValueError(f"config.model.image_size must be a multiple of 32 (VGG-16 halves it "
                         f"five times), got {config.model.image_size}")
    for name, spec in config.adapters.items():
        if not (isinstance(spec, Sequence) and len(spec) == 2):
            raise ValueError(f"config.adapters.{name} must be (num_convs, kernel_size), got "
                             f"{spec!r}")
        check_number(f"adapters.{name}[0] (num_convs)", spec[0], int, 1, 64)
        check_number(f"adapters.{name}[1] (kernel_size)", spec[1], int, 1, 15)
        if spec[1] % 2 == 0:
            raise ValueError(f"config.adapters.{name}: the kernel size must be odd (a "
                             f"'same' conv), got {spec[1]}")
    for n in config.sample_counts:
        check_number("sample_counts", n, int, 0, _IMAGES)
    seeds = config.get("seeds")
    if not isinstance(seeds, Sequence) or isinstance(seeds, str) or not seeds:
        raise ValueError(f"config.seeds must be a non-empty tuple of seeds, got {seeds!r}")
    for seed in seeds:
        check_number("seeds", seed, int, 0, 2**31 - 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds must be distinct, got {tuple(seeds)}")


# (field, check): the config's choice fields and what checks them (one-line ValueError
# naming the field).
def _check_runs_axis(value, where: str) -> None:
    if value not in runs.MODES:
        raise ValueError(f"{where} must be one of {', '.join(runs.MODES)}, got {value!r}")


CHOICE_FIELDS: tuple[tuple[str, Callable[[object, str], None]], ...] = (
    ("transplant.exp1_draws", check_draws),
    ("transplant.runs_axis", _check_runs_axis),
)


def _check_choices(config) -> None:
    for field, check in CHOICE_FIELDS:
        try:
            value = _lookup(config, field)
        except (KeyError, AttributeError):
            raise ValueError(f"config.{field} is missing") from None
        check(value, f"config.{field}")


def validate_config(config) -> None:
    """Fail early, naming the config field, on categories, experiments or numbers that cannot
    run.

    Raises:
      ValueError: one line, naming the field and what it must be.
    """
    _check_numbers(config)
    _check_choices(config)
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
    counts = [int(n) for n in config.sample_counts]
    if any(n < 0 for n in counts) or sorted(set(counts)) != counts:
        raise ValueError(f"config.sample_counts must be increasing and >= 0, got {counts}")
    benchmark.check_config(config)
    renderings = config.pretrain.get("renderings", 1)
    check_number("pretrain.renderings", renderings, int, 1, 1000)
    if renderings > 1 and not hasattr(benchmark, "rendered"):
        raise ValueError(f"config.pretrain.renderings={renderings}: {config.data!r} has no "
                         "renderings of its images; set it to 1")
    shipped = config.pretrain.get("shipped", False)
    if not isinstance(shipped, bool):
        raise ValueError(f"config.pretrain.shipped must be True or False, got {shipped!r}")
    weights = config.pretrain.get("weights", "")
    if weights:
        if config.pretrain.num_steps:
            raise ValueError("config.pretrain.weights and config.pretrain.num_steps > 0 are "
                             "two initialisations of the teachers; set num_steps to 0")
        if not Path(weights).is_file():
            raise ValueError(f"config.pretrain.weights: no file {weights}")
        size = vgg16.INPUT_SIZE
        if config.model.width != 1.0 or config.model.image_size != size:
            raise ValueError(
                f"config.pretrain.weights holds torchvision's full VGG-16: it needs "
                f"config.model.width = 1.0 and config.model.image_size = {size}, got "
                f"{config.model.width} and {config.model.image_size}")


CONFIGS_DIR = Path(configs.__file__).resolve().parent


def packaged_configs() -> list[str]:
    """The names of the configs shipped in ``nettransplant/configs``."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_file(spec: str) -> str:
    """``path[:arg]`` of the config ``--config spec`` names.

    A name (``silhouettes``, ``silhouettes:quick``: an identifier before the colon) is a
    packaged config, ``nettransplant/configs/<name>.py``; anything else
    (``path/to/file.py[:arg]``) is a file, returned as given.

    Raises:
      ValueError: a name that no packaged config has.
    """
    name, colon, arg = spec.partition(":")
    if not name.isidentifier():
        return spec
    path = CONFIGS_DIR / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        raise ValueError(f"no packaged config {name!r}; packaged configs: "
                         f"{', '.join(packaged_configs())} (or give a path/to/file.py)")
    return f"{path}{colon}{arg}"


def load_config_file(spec: str):
    """The config of ``name[:arg]`` or ``path[:arg]`` (what ``--config`` names), via its
    ``get_config``."""
    path, _, variant = config_file(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_checked_config", path)
    if module_spec is None or not Path(path).is_file():
        raise ValueError(f"no config file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def override_error(args: Sequence[str], default_config: str) -> str | None:
    """The first problem with ``args``' ``--config…`` flags, as one line; None if none found.

    Names a config file that does not load, or a ``--config.<field>`` that names no
    field of the config, with the valid fields where it went wrong.
    """
    spec = default_config
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
    try:
        config = load_config_file(spec)
    except Exception as e:  # noqa: BLE001 - a config file may raise anything
        return f"--config {spec}: {e}"
    for arg in args:
        if not arg.startswith("--config."):
            continue
        name = arg[2:].split("=", 1)[0]
        node, parts = config, name.split(".")[1:]
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(["config", *parts[:depth]])
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"--{name}: {where} has no field {part!r}"
                        + (f"; valid fields: {', '.join(valid)}" if valid else ""))
            node = node[part]
    return None



def _config_flag_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of each ``--config`` resolved by :func:`config_file`."""
    def resolve(spec: str) -> str:
        try:
            return config_file(spec)
        except ValueError as e:
            raise ValueError(f"--config {spec}: {e}") from None

    resolved, follows = [], False
    for arg in argv:
        if arg == "--":
            resolved.append(arg)
            break
        if follows:
            arg, follows = resolve(arg), False
        elif arg == "--config":
            follows = True
        elif arg.startswith("--config="):
            arg = "--config=" + resolve(arg.split("=", 1)[1])
        resolved.append(arg)
    return resolved + list(argv[len(resolved):])


def parse_config_flags(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], object],
                       *, program: str, doc: str, default_config: str,
                       config_help: str) -> flags.FlagValues:
    """:func:`nettransplant.runtime.cli.parse_flags` for a command with a ``--config``.

    ``--config`` (default ``default_config``, a packaged name) takes a name or a file
    (:func:`config_file`) and ``--config.<field>=<value>`` overrides; the parsed config is
    ``values.config``. Every error (a config file that is missing or fails to load, an
    unknown name, an unknown or mistyped ``--config.<field>``) is one ``error:`` line,
    exit 2.
    """
    from ml_collections import config_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        resolved = [] if cli.wants_help(argv) else _config_flag_values(argv)
    except ValueError as e:
        cli.refuse(e)

    def describe(error: BaseException) -> str:
        return override_error(argv, default_config) or cli.error_message(error)

    def define_all(values: flags.FlagValues) -> None:
        try:  # the --config.<field> overrides are defined here, from the command line
            config_flags.DEFINE_config_file(
                "config", config_file(default_config),
                f"{config_help}: a packaged config's name[:arg] ({', '.join(packaged_configs())})"
                " or a path/to/file.py[:arg]; --config.<field>=<value> sets a field",
                flag_values=values, sys_argv=[program, *resolved])
        except Exception as e:  # noqa: BLE001 - config files raise anything while loading
            cli.refuse(describe(e))
        values["config"].default_as_str = repr(default_config)
        define(values)

    values = cli.parse_flags(argv if cli.wants_help(argv) else resolved, define_all,
                             program=program, doc=doc, describe_error=describe)
    try:  # ml_collections keeps a file that did not load as an error, raised on use
        values.config.keys()
    except Exception as e:  # noqa: BLE001 - a config file may raise anything
        cli.refuse(describe(e))
    return values
