"""The embedded benchmark's report: counts, balance, example grids, pixel baselines.

:func:`data_report` is what ``nettransplant data-report`` calls. In the
returned dict, in percent: ``threshold_baseline_pixel_acc`` (the best single
global intensity threshold — on luminance or one channel, threshold and
polarity chosen on ``train`` — evaluated on ``test``),
``threshold_upper_bound_pixel_acc`` (the same choice made on ``test`` itself)
``majority_baseline_pixel_acc`` (all background) and ``stride8_oracle_pixel_acc``
(the true masks at FCN-8s's finest score resolution, 1/8, bilinearly
up-sampled back: :func:`~nettransplant.data.baselines.coarse_mask_oracle`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from nettransplant.data.baselines import coarse_mask_oracle, majority_baseline, threshold_baseline
from nettransplant.data.silhouettes import (
    CATEGORIES,
    ImageSet,
    build_silhouettes,
    load_silhouettes,
)
from nettransplant.runtime.files import write_atomically

OVERLAY_COLOUR = np.array([255, 40, 40], np.float32)


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed, with the mask's object pixels tinted red: ``(H, W, 3)`` uint8."""
    out = image.astype(np.float32) * 0.45
    obj = mask == 1
    out[obj] = out[obj] * 0.4 + OVERLAY_COLOUR * 0.6
    return out.astype(np.uint8)


def example_grid(split: ImageSet, per_category: int = 4, tile: int = 96) -> Image.Image:
    """One row per category: ``per_category`` (image, mask overlay) pairs, ``tile`` px each."""
    label_w, header_h, gap = 72, 16, 4
    pair_w = 2 * tile + gap
    canvas = Image.new("RGB", (label_w + per_category * pair_w,
                               header_h + len(CATEGORIES) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for col in range(per_category):
        x = label_w + col * pair_w
        draw.text((x + 2, 2), "image", fill="black")
        draw.text((x + tile + 2, 2), "mask", fill="black")
    for row, name in enumerate(CATEGORIES):
        y = header_h + row * tile
        draw.text((4, y + tile // 2 - 5), name, fill="black")
        for col, i in enumerate(np.flatnonzero(split.categories == row)[:per_category]):
            x = label_w + col * pair_w
            for offset, pixels in ((0, split.images[i]),
                                   (tile, mask_overlay(split.images[i], split.masks[i]))):
                canvas.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST),
                             (x + offset, y))
    return canvas


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def data_report(*, json_path: str | Path, out: str | Path, image_size: int = 32, seed: int = 0,
                data_dir: str | None = None) -> dict:
    """Build the dataset if needed, print counts and baselines, write grids and the JSON.

    Returns what it writes to ``json_path``; the PNG grids go to ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    builder = build_silhouettes(image_size, seed, data_dir)
    splits = load_silhouettes(image_size, seed, data_dir)
    report: dict = {
        "image_size": image_size, "seed": seed,
        "dataset_dir": str(builder.data_dir),
        "dataset_megabytes": _dir_bytes(Path(builder.data_dir)) / 2**20,
        "build_and_load_seconds": time.perf_counter() - start,
        "splits": {},
    }
    for name, split in splits.items():
        counts = {c: int((split.categories == i).sum()) for i, c in enumerate(CATEGORIES)}
        coverage = {c: 100 * float(split.masks[split.categories == i].mean())
                    for i, c in enumerate(CATEGORIES)}
        report["splits"][name] = {
            "examples": len(split), "per_category": counts,
            "class_balance_pct": {c: 100 * n / len(split) for c, n in counts.items()},
            "object_pixels_pct": 100 * float(split.masks.mean()),
            "object_pixels_pct_per_category": coverage}
        print(f"{name:>5}: {len(split)} examples, {100 * split.masks.mean():.1f} % object "
              "pixels; per category " + ", ".join(f"{c} {n}" for c, n in counts.items()))

    train, test = splits["train"], splits["test"]
    baseline = threshold_baseline(
        train.images, train.masks, test.images, test.masks,
        progress=lambda chunks: tqdm(chunks, desc="threshold baseline", leave=False))
    report["threshold_baseline_pixel_acc"] = 100 * baseline["test_acc"]
    report["threshold_upper_bound_pixel_acc"] = 100 * baseline["upper_bound"]
    report["threshold_rule"] = baseline["rule"]
    report["majority_baseline_pixel_acc"] = 100 * majority_baseline(test.masks)
    # What FCN-8s's resolution costs at this size: its finest scores are 8× coarser.
    report["stride8_oracle_pixel_acc"] = 100 * coarse_mask_oracle(test.masks, 8)

    tile = max(96, image_size)
    report["grids"] = []
    for name, split in splits.items():
        path = out / f"examples_{name}.png"
        example_grid(split, tile=tile).save(path)
        report["grids"].append(str(path))

    print(f"threshold baseline (test): {report['threshold_baseline_pixel_acc']:.1f} % "
          f"(best rule on test: {report['threshold_upper_bound_pixel_acc']:.1f} %), "
          f"majority baseline: {report['majority_baseline_pixel_acc']:.1f} %; true masks "
          f"at FCN-8s's 1/8 resolution, up-sampled back: "
          f"{report['stride8_oracle_pixel_acc']:.1f} %")
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(json_file, json.dumps(report, indent=2))
    print(f"wrote {json_path} and {', '.join(report['grids'])}")
    return report

