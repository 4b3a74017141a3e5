"""The ``python -m launch.net`` commands: build, grow, inspect and use a transplant net.

Usage examples: :mod:`launch.net`.

Every command that grows a net writes a new net (``--out``) and leaves the
input net untouched. Labelled samples are ``.npz`` files with a uint8
``images`` array ``(N, H, W, 3)`` and ``labels`` ``(N,)`` (classification)
or ``masks`` ``(N, H, W)`` (segmentation); ``samples`` writes such files from
the embedded benchmark. Errors are one line naming the offending input (exit 2).

Nets are verified when read (their content hash covers the spec and the
parameters); a net written before the hash existed needs --allow-unverified,
or re-export it with ``export --allow-unverified``. --out is checked before
any training (an existing one needs --overwrite) and locked while written: a
second writer of the same path is refused. Images are read as uint8 RGB from
8- or 16-bit gray, RGB, RGBA or palette files, at most 16,777,216 pixels each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

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
from nettransplant.runtime.cli import USER_ERRORS, UsageError, run_main
from nettransplant.runtime.files import atomic_path
from nettransplant.training import checkpoint

METHODS = ("back-distill", "direct-learn", "distill", "jacobian")
PANEL_NAME = re.compile(r"\d{5}\.png")


# --------------------------------------------------------------------------- inputs


def _load(args) -> TransplantNet:
    """``--net``, verified (or with a one-line warning under ``--allow-unverified``)."""
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
        raise UsageError("give at most one of --category and --task-module")
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
        raise UsageError("give --beta, or --beta-images OLD NEW (images of a category "
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
                             f"--task-module {args.task_module!r}")
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


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line (exit 2), without the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _int_at_least(low: int, high: int = 2**32 - 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low} and <= {high}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def positive_finite(text: str) -> float:
    """``--beta``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


STEPS, SEED, COUNT = _int_at_least(1, 10**7), _int_at_least(0), _int_at_least(1, 10**6)


def _add_net_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", required=True)
    parser.add_argument("--allow-unverified", action="store_true",
                        help="load a net without a content hash (written by an older "
                             "nettransplant); prints a warning")


def _add_growth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="back-distill")
    parser.add_argument("--samples", help="labelled samples .npz (default: 0 samples)")
    parser.add_argument("--steps", type=STEPS, default=35, help="Adam steps (>= 1)")
    parser.add_argument("--cold", action="store_true",
                        help="start back-distill from random init, not the closed form")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--out", required=True, help="folder of the grown net (new, or "
                                                     "replaced with --overwrite)")
    parser.add_argument("--overwrite", action="store_true")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m launch.net",
        description="Build, grow, inspect and use a transplant net.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="a net from teacher checkpoints")
    p.add_argument("--teacher", action="append", required=True,
                   help="a teacher checkpoint (W/teachers/<cat>, or launch.convert_torchvision "
                        "output); repeat for several")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("export", help="write a net (or one module) again with a fresh "
                                      "content hash")
    _add_net_arg(p)
    p.add_argument("--category", help="export only this category module")
    p.add_argument("--task-module", help="export only this task module")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("samples", help="labelled samples of the embedded benchmark → .npz")
    p.add_argument("--category", required=True)
    p.add_argument("--task", choices=sorted(tasks.TASKS), required=True)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--num", type=COUNT, default=10, help="how many samples (>= 1)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_samples)

    p = sub.add_parser("transplant", help="transplant a teacher's category module onto a task "
                                          "module of the net")
    _add_net_arg(p)
    p.add_argument("--teacher", required=True, help="the teacher checkpoint")
    p.add_argument("--name", help="the new category module's id (default: the teacher's)")
    p.add_argument("--onto", required=True, help="the task module g_S")
    p.add_argument("--beta", type=positive_finite,
                   help="the re-scaling β, finite and > 0 (default: estimated)")
    p.add_argument("--beta-images", nargs=2, metavar=("OLD", "NEW"),
                   help="images of a category the task module serves, and of the new one")
    _add_growth_args(p)
    p.set_defaults(run=cmd_transplant)

    p = sub.add_parser("connect", help="connect a category module to a task module")
    _add_net_arg(p)
    p.add_argument("--category", required=True)
    p.add_argument("--task-module", required=True)
    p.add_argument("--reference", help="the category's own task module used as g_T")
    p.add_argument("--beta", type=positive_finite, help="the re-scaling β, finite and > 0")
    _add_growth_args(p)
    p.set_defaults(run=cmd_connect)

    p = sub.add_parser("add-task", help="learn a new task module on category features")
    _add_net_arg(p)
    p.add_argument("--name", required=True, help="the new task module's id")
    p.add_argument("--task", choices=sorted(tasks.TASKS), required=True)
    p.add_argument("--data", action="append", required=True, metavar="CATEGORY=FILE.npz")
    p.add_argument("--steps", type=STEPS, default=300)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_add_task)

    p = sub.add_parser("info", help="routes, module sizes, provenance")
    _add_net_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("predict", help="labels / masks of images")
    _add_net_arg(p)
    p.add_argument("--category", required=True)
    p.add_argument("--task", required=True, help="a task module id connected to the category")
    p.add_argument("--images", required=True,
                   help=".npz with 'images', a PNG/JPEG file or a folder of them (8/16-bit, "
                        f"gray/RGB/RGBA/palette; at most {MAX_IMAGE_PIXELS:,} pixels each)")
    p.add_argument("--out", required=True, help=".npz of labels or masks (replaced if it exists)")
    p.add_argument("--overlays", help="folder for PNG mask overlays (segmentation); replaced "
                                      "whole if it holds overlays of an earlier run")
    p.set_defaults(run=cmd_predict)
    return parser


def _run(args) -> None:
    """The command, with operating-system errors (full disk, permissions) as one line."""
    try:
        args.run(args)
    except OSError as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise UsageError(outputs.describe_os_error(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code (2: bad input, one line)."""
    args = make_parser().parse_args(argv)
    return run_main(lambda: _run(args), interrupted="interrupted; the input net is unchanged")
