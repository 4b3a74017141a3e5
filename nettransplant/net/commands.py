"""The ``python -m launch.net`` commands: build, grow, inspect and use a transplant net.

Usage examples: :mod:`launch.net`.

Every command that grows a net writes a new net (``--out``) and leaves the
input net untouched. Labelled samples are ``.npz`` files with a uint8
``images`` array ``(N, H, W, 3)`` and ``labels`` ``(N,)`` (classification)
or ``masks`` ``(N, H, W)`` (segmentation); ``samples`` writes such files from
the embedded benchmark. Errors are one line naming the offending input.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nettransplant import tasks
from nettransplant.cli import UsageError, one_line, run_main
from nettransplant.files import atomic_path
from nettransplant.net import (
    TaskTrainingSettings,
    TransplantNet,
    TransplantSettings,
    export_net,
    load_net,
    load_teacher,
)
from nettransplant.net import io as net_io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METHODS = ("back-distill", "direct-learn", "distill", "jacobian")


# --------------------------------------------------------------------------- inputs


def read_images(path: str | Path) -> np.ndarray:
    """uint8 RGB images ``(N, H, W, 3)`` from an ``.npz`` (``images``) or a folder of PNG/JPEG."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image, UnidentifiedImageError

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in the folder")
        images = []
        for file in files:
            try:
                with Image.open(file) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except (UnidentifiedImageError, OSError) as err:
                raise UsageError(f"{file}: not a readable image ({err})") from None
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise UsageError(f"{path}: the images have different sizes {sorted(shapes)}; "
                             "resize them to the net's input size first")
        return np.stack(images)
    arrays = _read_npz(path)
    if "images" not in arrays:
        raise UsageError(f"{path}: no 'images' array (it holds {sorted(arrays)})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise UsageError(f"{path}: 'images' must be uint8 RGB (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"{path}: 'images' must be (N, H, W, 3) RGB, got shape {images.shape}")
    return images


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:  # an .npz never unpickles objects
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as err:
        raise UsageError(f"{path}: not a readable .npz file ({one_line(err)})") from None


def read_samples(path: str | Path, task: tasks.Task) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels or masks)`` for ``task`` from a samples ``.npz``."""
    path = Path(path)
    images = read_images(path)
    arrays = _read_npz(path)
    field = task.target_field
    if field not in arrays:
        raise UsageError(f"{path}: a {task.name} sample file needs a '{field}' array "
                         f"(it holds {sorted(arrays)})")
    targets = arrays[field]
    if len(targets) != len(images):
        raise UsageError(f"{path}: {len(images)} images but {len(targets)} {field}")
    expected = images.shape[:3] if field == "masks" else images.shape[:1]
    if targets.shape != expected:
        raise UsageError(f"{path}: '{field}' has shape {targets.shape}, expected {expected}")
    return images, targets


def _settings(args) -> TransplantSettings:
    return TransplantSettings(num_steps=args.steps, seed=args.seed, warm_start=not args.cold)


def _write_net(net: TransplantNet, out: str, overwrite: bool) -> None:
    export_net(net, out, overwrite=overwrite)
    print(f"wrote {out}: {len(net.routes())} routes")


# --------------------------------------------------------------------------- commands


def cmd_build(args) -> None:
    net = TransplantNet()
    for path in args.teacher:
        net = net.add_teacher(load_teacher(path))
    _write_net(net, args.out, args.overwrite)


def cmd_samples(args) -> None:
    from configs import silhouettes
    from nettransplant.data import benchmarks

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
    _atomic_npz(Path(args.out), arrays)
    print(f"wrote {args.out}: {len(view)} {args.split} {args.task} samples of {args.category}")


def cmd_transplant(args) -> None:
    net = load_net(args.net)
    teacher = load_teacher(args.teacher, args.name)
    task = net.task_module(args.onto).task
    samples = read_samples(args.samples, task) if args.samples else None
    beta_images = None
    if args.beta is None:
        beta_images = (read_images(args.beta_images[0]), read_images(args.beta_images[1])) \
            if args.beta_images else None
        if beta_images is None:
            raise UsageError("give --beta, or --beta-images OLD NEW (images of a category "
                             f"{args.onto!r} already serves, and of {teacher.name!r})")
    grown, report = net.transplant(teacher, onto=args.onto, method=args.method,
                                   samples=samples, beta=args.beta, beta_images=beta_images,
                                   settings=_settings(args))
    print(json.dumps(_brief(report)))
    _write_net(grown, args.out, args.overwrite)


def cmd_connect(args) -> None:
    net = load_net(args.net)
    task = net.task_module(args.task_module).task
    samples = read_samples(args.samples, task) if args.samples else None
    grown, report = net.connect(args.category, args.task_module, reference=args.reference,
                                method=args.method, samples=samples,
                                beta=args.beta if args.beta is not None else 1.0,
                                settings=_settings(args))
    print(json.dumps(_brief(report)))
    _write_net(grown, args.out, args.overwrite)


def cmd_add_task(args) -> None:
    net = load_net(args.net)
    task = tasks.TASKS[args.task]
    data = {}
    for item in args.data:
        category, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--data {item!r}: expected CATEGORY=FILE.npz")
        data[category] = read_samples(path, task)
        net.category(category)
    # The new module has the architecture of a task module of the same task
    # already in the net that takes the categories' features.
    template = next((node for node in net.task_modules.values() if node.task is task), None)
    if template is None:
        raise UsageError(f"--task {args.task}: the net has no {args.task} task module to copy "
                         "the architecture from")
    grown, report = net.add_task(args.name, template.module, data=data,
                                 settings=TaskTrainingSettings(num_steps=args.steps,
                                                               seed=args.seed))
    print(json.dumps(_brief(report)))
    _write_net(grown, args.out, args.overwrite)


def cmd_info(args) -> None:
    net = load_net(args.net)
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


def cmd_predict(args) -> None:
    net = load_net(args.net)
    images = read_images(args.images)
    task = net.task_module(args.task).task
    predictions = net.predict(images, category=args.category, task=args.task)
    field = task.target_field
    _atomic_npz(Path(args.out), {field: np.asarray(predictions)})
    print(f"wrote {args.out}: {field} {tuple(predictions.shape)}")
    if args.overlays:
        if task.name != "segmentation":
            raise UsageError(f"--overlays: {args.task!r} is a {task.name} module; overlays are "
                             "drawn for segmentation")
        write_overlays(images, np.asarray(predictions), Path(args.overlays))
        print(f"wrote {len(images)} overlays to {args.overlays}")


def write_overlays(images: np.ndarray, masks: np.ndarray, folder: Path,
                   min_side: int = 128) -> None:
    """A PNG per image: the image beside its prediction (background darkened, object tinted).

    Darkening the background shows the mask whatever the image's colours; small
    images are enlarged (nearest neighbour) to at least ``min_side`` pixels.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
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
        with atomic_path(folder / f"{i:05d}.png") as staging:
            Image.fromarray(panel.astype(np.uint8)).save(staging, format="PNG")


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging, open(staging, "wb") as f:
        np.savez(f, **arrays)


def _brief(report: dict) -> dict:
    keep = ("operation", "method", "samples", "alpha", "beta", "lambda0", "metrics",
            "train_fit", "warm_start_residual", "final_loss", "categories")
    return {k: report[k] for k in keep if k in report}


# --------------------------------------------------------------------------- parser


def _add_growth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="back-distill")
    parser.add_argument("--samples", help="labelled samples .npz (default: 0 samples)")
    parser.add_argument("--steps", type=int, default=35, help="Adam steps")
    parser.add_argument("--cold", action="store_true",
                        help="start back-distill from random init, not the closed form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder of the grown net")
    parser.add_argument("--overwrite", action="store_true")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    p = sub.add_parser("samples", help="labelled samples of the embedded benchmark → .npz")
    p.add_argument("--category", required=True)
    p.add_argument("--task", choices=sorted(tasks.TASKS), required=True)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_samples)

    p = sub.add_parser("transplant", help="transplant a teacher's category module onto a task "
                                          "module of the net")
    p.add_argument("--net", required=True)
    p.add_argument("--teacher", required=True, help="the teacher checkpoint")
    p.add_argument("--name", help="the new category module's id (default: the teacher's)")
    p.add_argument("--onto", required=True, help="the task module g_S")
    p.add_argument("--beta", type=float, help="the re-scaling β (default: estimated)")
    p.add_argument("--beta-images", nargs=2, metavar=("OLD", "NEW"),
                   help="images of a category the task module serves, and of the new one")
    _add_growth_args(p)
    p.set_defaults(run=cmd_transplant)

    p = sub.add_parser("connect", help="connect a category module to a task module")
    p.add_argument("--net", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--task-module", required=True)
    p.add_argument("--reference", help="the category's own task module used as g_T")
    p.add_argument("--beta", type=float)
    _add_growth_args(p)
    p.set_defaults(run=cmd_connect)

    p = sub.add_parser("add-task", help="learn a new task module on category features")
    p.add_argument("--net", required=True)
    p.add_argument("--name", required=True, help="the new task module's id")
    p.add_argument("--task", choices=sorted(tasks.TASKS), required=True)
    p.add_argument("--data", action="append", required=True, metavar="CATEGORY=FILE.npz")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_add_task)

    p = sub.add_parser("info", help="routes, module sizes, provenance")
    p.add_argument("--net", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("predict", help="labels / masks of uint8 RGB images")
    p.add_argument("--net", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--task", required=True, help="a task module id connected to the category")
    p.add_argument("--images", required=True, help=".npz with 'images', or a PNG/JPEG folder")
    p.add_argument("--out", required=True, help=".npz of labels or masks")
    p.add_argument("--overlays", help="folder for PNG mask overlays (segmentation)")
    p.set_defaults(run=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code (2: bad input, one line)."""
    args = make_parser().parse_args(argv)
    return run_main(lambda: args.run(args), interrupted="interrupted; the input net is unchanged")
