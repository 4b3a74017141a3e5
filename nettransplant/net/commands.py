"""Build, grow, inspect and use a transplant net: the ``nettransplant net`` commands.

    nettransplant net build --teacher W/teachers/dog --out NET
    nettransplant net samples --category horse --task segmentation --num 10 --out h.npz
    nettransplant net transplant --net NET --teacher W/teachers/horse \\
        --onto dog.segmentation --samples h.npz --out NET2
    nettransplant net connect --net NET2 --category cat --task_module dog.segmentation \\
        --samples cat.npz --out NET3
    nettransplant net add-task --net NET --name shared.classification \\
        --task classification --data cat=cat.npz --data dog=dog.npz --out NET4
    nettransplant net info --net NET --json
    nettransplant net predict --net NET --category cat --task cat.segmentation \\
        --images imgs.npz --out preds.npz --overlays overlays/

Every command that grows a net writes a new net (``--out``) and leaves the
input net untouched. Labelled samples are ``.npz`` files with a uint8
``images`` array ``(N, H, W, 3)`` and ``labels`` ``(N,)`` (classification)
or ``masks`` ``(N, H, W)`` (segmentation); ``samples`` writes such files from
the embedded benchmark. Errors are one line naming the offending input (exit 2).

Nets are verified when read (their content hash covers the spec and the
parameters); a net written before the hash existed needs --allow_unverified,
or re-export it with ``export --allow_unverified``. --out is checked before
any training (an existing one needs --overwrite) and locked while written: a
second writer of the same path is refused. Images are read as uint8 RGB from
8- or 16-bit gray, RGB, RGBA or palette files, at most 16,777,216 pixels each.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import flags

from nettransplant.core import tasks
from nettransplant.net import (
    TaskTrainingSettings,
    TransplantNet,
    TransplantSettings,
    load_net,
    load_teacher,
    operations,
    outputs,
)
from nettransplant.net import io as net_io
from nettransplant.net.graph import check_id
from nettransplant.net.images import (  # noqa: F401 - part of this module's interface
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    num_classes,
    read_images,
    read_samples,
)
from nettransplant.runtime import cli
from nettransplant.runtime.cli import USER_ERRORS, UsageError, run_main
from nettransplant.runtime.files import atomic_path
from nettransplant.training import checkpoint

METHODS = ("back-distill", "direct-learn", "distill", "jacobian")
PANEL_NAME = re.compile(r"\d{5}\.png")


# --------------------------------------------------------------------------- inputs


def _load(args) -> TransplantNet:
    """``--net``, verified (or with a one-line warning under ``--allow_unverified``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", net_io.UnverifiedNetWarning)
        net = load_net(args.net, allow_unverified=getattr(args, "allow_unverified", False))
    for warning in caught:
        if issubclass(warning.category, net_io.UnverifiedNetWarning):
            print(f"WARNING: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    return net


def _samples_for(net: TransplantNet, path: str | None, task_module: str):
    """``(images, targets)`` of ``path`` checked against ``task_module``'s classes, or None."""
    if not path:
        return None
    node = net.task_module(task_module)
    return read_samples(path, node.task, num_classes(node.module))


def _settings(args) -> TransplantSettings:
    return TransplantSettings(num_steps=args.steps, seed=args.seed, warm_start=not args.cold)


@contextlib.contextmanager
def _net_output(out: str, overwrite: bool) -> Iterator[Path]:
    """Check ``--out`` and hold its lock for the whole command (before any training).

    ``--out`` must not exist unless ``--overwrite`` (and then it must be a net);
    stale staging folders of killed writes are removed once the lock is held.
    """
    def check() -> Path:
        return outputs.check_output(out, overwrite=overwrite,
                                    replaceable=checkpoint.is_checkpoint, what="transplant net")

    with outputs.exclusive_output(check()) as target:
        checkpoint.clean_stale(target)
        check()  # again under the lock: another writer may have finished meanwhile
        yield target


def _write_net(net: TransplantNet, out: Path, overwrite: bool) -> None:
    net_io.write_net(net, out, overwrite=overwrite)
    print(f"wrote {out}: {len(net.routes())} routes")


# --------------------------------------------------------------------------- commands


def cmd_build(args) -> None:
    with _net_output(args.out, args.overwrite) as out:
        net = TransplantNet()
        for path in args.teacher:
            net = net.add_teacher(load_teacher(path))
        _write_net(net, out, args.overwrite)


def cmd_export(args) -> None:
    """Write the net (or one module of it) again, with a fresh content hash."""
    if args.category and args.task_module:
        raise UsageError("give at most one of --category and --task_module")
    with _net_output(args.out, args.overwrite) as out:
        net = _load(args)
        if args.category or args.task_module:
            single = net_io.single_module_net(net, category=args.category,
                                              task_module=args.task_module)
            net_io.write_net(single, out, overwrite=args.overwrite)
            print(f"wrote {out}: module {args.category or args.task_module}")
        else:
            _write_net(net, out, args.overwrite)


def cmd_samples(args) -> None:
    from nettransplant.configs import silhouettes
    from nettransplant.data import benchmarks

    out = outputs.check_output(args.out, flag="--out", replaceable=Path.is_file, what="file")
    config = silhouettes.get_config()
    bench = benchmarks.make_benchmark(config)
    if args.category not in bench.categories:
        raise UsageError(f"--category {args.category!r}: the embedded benchmark has "
                         f"{list(bench.categories)}")
    # A benchmark has one view method per task, named after it.
    view = getattr(bench, args.task)(args.category, args.split)
    rows = np.random.default_rng(args.seed).permutation(len(view))[:args.num]
    view = view.take(np.sort(rows))
    task = tasks.get(args.task)
    arrays = {"images": view.images, task.target_field: task.targets(view)}
    with outputs.exclusive_output(out):
        _atomic_npz(out, arrays)
    print(f"wrote {args.out}: {len(view)} {args.split} {args.task} samples of {args.category}")


def cmd_transplant(args) -> None:
    if args.beta is None and not args.beta_images:
        raise UsageError("give --beta, or --beta_images OLD,NEW (images of a category "
                         f"{args.onto!r} already serves, and of the new one)")
    with _net_output(args.out, args.overwrite) as out:
        net = _load(args)
        net.task_module(args.onto)
        teacher = load_teacher(args.teacher, args.name)
        samples = _samples_for(net, args.samples, args.onto)
        beta_images = None
        if args.beta is None:
            beta_images = (read_images(args.beta_images[0]), read_images(args.beta_images[1]))
        grown, report = operations.transplant(net, teacher, onto=args.onto, method=args.method,
                                              samples=samples, beta=args.beta,
                                              beta_images=beta_images, settings=_settings(args))
        print(json.dumps(_brief(report)))
        _write_net(grown, out, args.overwrite)


def cmd_connect(args) -> None:
    with _net_output(args.out, args.overwrite) as out:
        net = _load(args)
        net.category(args.category)
        net.task_module(args.task_module)
        if (args.category, args.task_module) in net.edges:
            raise UsageError(f"--category {args.category!r} is already connected to "
                             f"--task_module {args.task_module!r}")
        samples = _samples_for(net, args.samples, args.task_module)
        grown, report = operations.connect(net, args.category, args.task_module,
                                           reference=args.reference, method=args.method,
                                           samples=samples,
                                           beta=args.beta if args.beta is not None else 1.0,
                                           settings=_settings(args))
        print(json.dumps(_brief(report)))
        _write_net(grown, out, args.overwrite)


def cmd_add_task(args) -> None:
    pairs = []
    for item in args.data:
        category, sep, path = item.partition("=")
        if not sep or not category or not path:
            raise UsageError(f"--data {item!r}: expected CATEGORY=FILE.npz")
        pairs.append((category, path))
    with _net_output(args.out, args.overwrite) as out:
        net = _load(args)
        check_id(args.name, "--name: task module")
        if args.name in net.task_modules:
            raise UsageError(f"--name {args.name!r}: the net already has this task module")
        task = tasks.TASKS[args.task]
        # The new module has the architecture of a task module of the same task
        # already in the net that takes the categories' features.
        template = next((node for node in net.task_modules.values() if node.task is task),
                        None)
        if template is None:
            raise UsageError(f"--task {args.task}: the net has no {args.task} task module to "
                             "copy the architecture from")
        data = {}
        for category, path in pairs:
            net.category(category)
            data[category] = read_samples(path, task, num_classes(template.module))
        grown, report = operations.add_task(net, args.name, template.module, data=data,
                                            settings=TaskTrainingSettings(num_steps=args.steps,
                                                                   seed=args.seed))
        print(json.dumps(_brief(report)))
        _write_net(grown, out, args.overwrite)


def cmd_info(args) -> None:
    net = _load(args)
    info = describe(net)
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return
    print(f"transplant net {args.net}")
    print(f"{'category module':<22}{'input':>8}{'params':>12}")
    for name, node in info["category_modules"].items():
        print(f"{name:<22}{node['input_size']:>8}{node['params']:>12,}")
    print(f"{'task module':<30}{'task':>16}{'params':>12}")
    for name, node in info["task_modules"].items():
        print(f"{name:<30}{node['task']:>16}{node['params']:>12,}")
    print(f"{'route':<48}{'adapter':>10}{'β':>8}  method / samples / metric")
    for route in info["routes"]:
        how = route.get("method", "teacher") if route["adapter"] else "teacher's own"
        extra = "" if not route["adapter"] else f" / {route.get('samples', '?')}"
        metrics = route.get("metrics") or {}
        extra += "".join(f" / {k} {v:.1f}" for k, v in metrics.items())
        print(f"{route['category'] + ' → ' + route['task_module']:<48}"
              f"{route['adapter_params'] if route['adapter'] else '-':>10}"
              f"{route['beta']:>8.3g}  {how}{extra}")


def describe(net: TransplantNet) -> dict:
    """Routes, module sizes and provenance of ``net`` (what ``info --json`` prints)."""
    sizes = net.module_sizes()
    spec = net_io.net_spec(net)
    routes = []
    for route in net.routes():
        edge = net.edge(route.category, route.task_module)
        entry = {"category": route.category, "task_module": route.task_module,
                 "task": net.task_module(route.task_module).task.name,
                 "adapter": edge.adapter is not None, "beta": float(edge.beta),
                 "adapter_params": sizes["adapters"].get(
                     f"{route.category}->{route.task_module}", 0)}
        entry.update({k: edge.provenance[k] for k in ("method", "samples", "metrics", "alpha",
                                                       "lambda0", "operation")
                      if k in edge.provenance})
        routes.append(entry)
    return {
        "category_modules": {name: {"input_size": node.input.size,
                                    "params": sizes["category_modules"][name],
                                    "provenance": dict(node.provenance)}
                             for name, node in net.category_modules.items()},
        "task_modules": {name: {"task": node.task.name, "params": sizes["task_modules"][name],
                                "provenance": dict(node.provenance)}
                         for name, node in net.task_modules.items()},
        "routes": routes,
        "spec": spec,
    }


def _is_overlay_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of overlay panels only (``00000.png`` …), or empty."""
    return path.is_dir() and not path.is_symlink() and all(
        PANEL_NAME.fullmatch(p.name) and p.is_file() for p in path.iterdir())


def cmd_predict(args) -> None:
    out = outputs.check_output(args.out, replaceable=Path.is_file, what="file")
    overlays = None
    if args.overlays:
        overlays = outputs.check_output(args.overlays, flag="--overlays",
                                        replaceable=_is_overlay_folder,
                                        what="folder of overlay panels (00000.png …)")
        if overlays == out:
            raise UsageError("--overlays and --out name the same path")
    net = _load(args)
    net.edge(args.category, args.task)
    task = net.task_module(args.task).task
    if overlays is not None and task.name != "segmentation":
        raise UsageError(f"--overlays: {args.task!r} is a {task.name} module; overlays are "
                         "drawn for segmentation")
    images = read_images(args.images)
    net.category(args.category).input.check(images.shape, f"--images {args.images}")
    with contextlib.ExitStack() as held:
        held.enter_context(outputs.exclusive_output(out))
        if overlays is not None:
            held.enter_context(outputs.exclusive_output(overlays))
        predictions = np.asarray(net.predict(images, category=args.category, task=args.task))
        field = task.target_field
        _atomic_npz(out, {field: predictions})
        print(f"wrote {args.out}: {field} {tuple(predictions.shape)}")
        if overlays is not None:
            write_overlays(images, predictions, overlays)
            print(f"wrote {len(images)} overlays to {args.overlays}")


def write_overlays(images: np.ndarray, masks: np.ndarray, folder: Path,
                   min_side: int = 128) -> None:
    """A PNG per image: the image beside its prediction (background darkened, object tinted).

    Darkening the background shows the mask whatever the image's colours; small
    images are enlarged (nearest neighbour) to at least ``min_side`` pixels. The
    panels are written into a staging folder that then replaces ``folder`` whole,
    so no panel of an earlier run is left beside the new ones.
    """
    from PIL import Image

    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        tint = np.array([0, 255, 0], np.float32)
        scale = max(1, -(-min_side // max(images.shape[1:3])))
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            shown = image.astype(np.float32)
            on = mask.astype(bool)
            shown[~on] *= 0.25
            shown[on] = 0.6 * shown[on] + 0.4 * tint
            gap = np.full((image.shape[0], 2, 3), 255, np.float32)
            panel = np.concatenate([image.astype(np.float32), gap, shown], axis=1)
            panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
            Image.fromarray(panel.astype(np.uint8)).save(staging / f"{i:05d}.png",
                                                         format="PNG")
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move ``staging`` to ``folder``, the old ``folder`` (if any) removed after the move."""
    if not folder.exists():
        staging.rename(folder)
        return
    retired = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    folder.rename(retired)
    try:
        staging.rename(folder)
    except BaseException:
        retired.rename(folder)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging, open(staging, "wb") as f:
        np.savez(f, **arrays)


def _brief(report: dict) -> dict:
    keep = ("operation", "method", "samples", "alpha", "beta", "lambda0", "metrics",
            "train_fit", "warm_start_residual", "final_loss", "categories")
    return {k: report[k] for k in keep if k in report}


# --------------------------------------------------------------------------- flags

PROGRAM = "nettransplant net"
MAX_SEED = 2**32 - 1


def _define_net(values: flags.FlagValues) -> None:
    flags.DEFINE_string("net", None, "the transplant net (a folder)", flag_values=values,
                        required=True)
    flags.DEFINE_boolean("allow_unverified", False,
                         "load a net without a content hash (written by an older "
                         "nettransplant); prints a warning", flag_values=values)


def _define_out(values: flags.FlagValues, help_text: str = "the folder written") -> None:
    flags.DEFINE_string("out", None, help_text, flag_values=values, required=True)
    flags.DEFINE_boolean("overwrite", False, "replace an existing --out", flag_values=values)


def _define_beta(values: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE_float("beta", None, help_text, flag_values=values)
    flags.register_validator("beta", lambda beta: beta is None or (math.isfinite(beta)
                                                                   and beta > 0),
                             message="--beta must be a finite number > 0", flag_values=values)


def _define_seed(values: flags.FlagValues, help_text: str = "random seed") -> None:
    flags.DEFINE_integer("seed", 0, help_text, lower_bound=0, upper_bound=MAX_SEED,
                         flag_values=values)


def _define_growth(values: flags.FlagValues) -> None:
    flags.DEFINE_enum("method", "back-distill", METHODS, "how the adapter is learnt",
                      flag_values=values)
    flags.DEFINE_string("samples", None, "labelled samples .npz (default: 0 samples)",
                        flag_values=values)
    flags.DEFINE_integer("steps", 35, "Adam steps", lower_bound=1, upper_bound=10**7,
                         flag_values=values)
    flags.DEFINE_boolean("cold", False, "start back-distill from random init, not the closed "
                         "form", flag_values=values)
    _define_seed(values)
    _define_out(values, "folder of the grown net (new, or replaced with --overwrite)")


def _define_build(values: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("teacher", None, "a teacher checkpoint (W/teachers/<cat>, or "
                              "nettransplant convert's output)", flag_values=values,
                              required=True)
    _define_out(values, "folder of the net")


def _define_export(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_string("category", None, "export only this category module",
                        flag_values=values)
    flags.DEFINE_string("task_module", None, "export only this task module",
                        flag_values=values)
    _define_out(values, "folder of the exported net")


def _define_samples(values: flags.FlagValues) -> None:
    flags.DEFINE_string("category", None, "a category of the embedded benchmark",
                        flag_values=values, required=True)
    flags.DEFINE_enum("task", None, sorted(tasks.TASKS), "the task the samples are labelled "
                      "for", flag_values=values, required=True)
    flags.DEFINE_enum("split", "train", ("train", "test"), "the split drawn from",
                      flag_values=values)
    flags.DEFINE_integer("num", 10, "how many samples", lower_bound=1, upper_bound=10**6,
                         flag_values=values)
    _define_seed(values)
    flags.DEFINE_string("out", None, "the .npz written", flag_values=values, required=True)


def _define_transplant(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_string("teacher", None, "the teacher checkpoint", flag_values=values,
                        required=True)
    flags.DEFINE_string("name", None, "the new category module's id (default: the teacher's)",
                        flag_values=values)
    flags.DEFINE_string("onto", None, "the task module g_S", flag_values=values, required=True)
    _define_beta(values, "the re-scaling β, finite and > 0 (default: estimated from "
                         "--beta_images)")
    flags.DEFINE_list("beta_images", None, "OLD,NEW: images of a category the task module "
                      "serves, and of the new one", flag_values=values)
    flags.register_validator("beta_images", lambda files: files is None or len(files) == 2,
                             message="--beta_images takes two files, OLD,NEW",
                             flag_values=values)
    _define_growth(values)


def _define_connect(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_string("category", None, "the category module", flag_values=values,
                        required=True)
    flags.DEFINE_string("task_module", None, "the task module", flag_values=values,
                        required=True)
    flags.DEFINE_string("reference", None, "the category's own task module used as g_T",
                        flag_values=values)
    _define_beta(values, "the re-scaling β, finite and > 0 (default: 1)")
    _define_growth(values)


def _define_add_task(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_string("name", None, "the new task module's id", flag_values=values,
                        required=True)
    flags.DEFINE_enum("task", None, sorted(tasks.TASKS), "the new module's task",
                      flag_values=values, required=True)
    flags.DEFINE_multi_string("data", None, "CATEGORY=FILE.npz: labelled samples of a "
                              "category", flag_values=values, required=True)
    flags.DEFINE_integer("steps", 300, "Adam steps", lower_bound=1, upper_bound=10**7,
                         flag_values=values)
    _define_seed(values)
    _define_out(values, "folder of the grown net (new, or replaced with --overwrite)")


def _define_info(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_boolean("json", False, "print the description as JSON", flag_values=values)


def _define_predict(values: flags.FlagValues) -> None:
    _define_net(values)
    flags.DEFINE_string("category", None, "the category module the images show",
                        flag_values=values, required=True)
    flags.DEFINE_string("task", None, "a task module id connected to the category",
                        flag_values=values, required=True)
    flags.DEFINE_string("images", None, ".npz with 'images', a PNG/JPEG file or a folder of "
                        "them (8/16-bit, gray/RGB/RGBA/palette; at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels each)", flag_values=values,
                        required=True)
    flags.DEFINE_string("out", None, ".npz of labels or masks (replaced if it exists)",
                        flag_values=values, required=True)
    flags.DEFINE_string("overlays", None, "folder for PNG mask overlays (segmentation); "
                        "replaced whole if it holds overlays of an earlier run",
                        flag_values=values)


@dataclass(frozen=True)
class Command:
    """One ``nettransplant net`` command: what it does, its flags and its body."""

    summary: str
    define: Callable[[flags.FlagValues], None]
    run: Callable[[flags.FlagValues], None]


COMMANDS = {
    "build": Command("a net from teacher checkpoints", _define_build, cmd_build),
    "export": Command("write a net (or one module) again with a fresh content hash",
                      _define_export, cmd_export),
    "samples": Command("labelled samples of the embedded benchmark → .npz", _define_samples,
                       cmd_samples),
    "transplant": Command("transplant a teacher's category module onto a task module of the "
                          "net", _define_transplant, cmd_transplant),
    "connect": Command("connect a category module to a task module", _define_connect,
                       cmd_connect),
    "add-task": Command("learn a new task module on category features", _define_add_task,
                        cmd_add_task),
    "info": Command("routes, module sizes, provenance", _define_info, cmd_info),
    "predict": Command("labels / masks of images", _define_predict, cmd_predict),
}


def _run(command: Command, values: flags.FlagValues) -> None:
    """The command, with operating-system errors (full disk, permissions) as one line."""
    try:
        command.run(values)
    except OSError as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise UsageError(outputs.describe_os_error(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant net <command>`` on ``argv`` (default ``sys.argv[1:]``); the exit code.

    ``--help`` prints the commands (exit 0); ``<command> --help`` its flags. An unknown
    command or a bad flag is one ``error:`` line (``SystemExit`` with status 2); an input
    refused while running is one line too, and returns 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = cli.choose_command(argv, {name: c.summary for name, c in COMMANDS.items()},
                              program=PROGRAM, doc=__doc__)
    if name is None:  # --help
        return 0
    command = COMMANDS[name]
    values = cli.parse_flags(argv[1:], command.define, program=f"{PROGRAM} {name}",
                             doc=command.summary[0].upper() + command.summary[1:] + ".")
    return run_main(lambda: _run(command, values),
                    interrupted="interrupted; the input net is unchanged")
