"""Report on the embedded benchmark: counts, balance, example grids, pixel baselines.

    python -m launch.data_report --json data_report.json --out data_report/

Prints per-split counts and class balance, writes PNG grids of composited
examples with their masks to ``--out``, and reports in the JSON, in percent:
``threshold_baseline_pixel_acc`` (the best single global intensity threshold —
on luminance or one channel, threshold and polarity chosen on ``train`` —
evaluated on ``test``), ``threshold_upper_bound_pixel_acc`` (the same choice made
on ``test`` itself) and ``majority_baseline_pixel_acc`` (all background).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from nettransplant.data import CATEGORIES, load_silhouettes

LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)


def intensity_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel intensities in 0..255: luminance and each channel."""
    feats = {"luminance": np.clip(np.round(images.astype(np.float32) @ LUMINANCE), 0, 255)}
    for i, name in enumerate("RGB"):
        feats[name] = images[..., i].astype(np.float32)
    return {k: v.astype(np.int64) for k, v in feats.items()}


def threshold_accuracies(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Pixel accuracy of every rule ``pred = v > t`` (row 0) and ``v <= t`` (row 1), t in 0..255."""
    fg = np.bincount(values[masks == 1], minlength=256)[:256]
    bg = np.bincount(values[masks == 0], minlength=256)[:256]
    fg_le, bg_le = np.cumsum(fg), np.cumsum(bg)  # counts with v <= t
    total = fg.sum() + bg.sum()
    above_is_fg = (fg.sum() - fg_le + bg_le) / total
    below_is_fg = (fg_le + bg.sum() - bg_le) / total
    return np.stack([above_is_fg, below_is_fg])


def threshold_baseline(train_images, train_masks, test_images, test_masks) -> dict:
    """Choose feature, threshold and polarity on train; evaluate on test."""
    train_feats = intensity_features(train_images)
    test_feats = intensity_features(test_images)
    best_train, best_test = None, None
    for name in train_feats:
        acc_train = threshold_accuracies(train_feats[name], train_masks)
        acc_test = threshold_accuracies(test_feats[name], test_masks)
        pol, t = np.unravel_index(np.argmax(acc_train), acc_train.shape)
        if best_train is None or acc_train[pol, t] > best_train["train_acc"]:
            best_train = {"feature": name, "threshold": int(t),
                          "foreground": "above" if pol == 0 else "at or below",
                          "train_acc": float(acc_train[pol, t]),
                          "test_acc": float(acc_test[pol, t])}
        best_test = max(best_test or 0.0, float(acc_test.max()))
    return {"rule": best_train, "test_acc": best_train["test_acc"], "upper_bound": best_test}


def example_grid(split, per_category: int = 6, scale: int = 3) -> Image.Image:
    """One row per category: images, then the same images with their masks overlaid."""
    size = split.images.shape[1] * scale
    label_w = 70
    canvas = Image.new("RGB", (label_w + 2 * per_category * size, len(CATEGORIES) * size),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(CATEGORIES):
        members = np.flatnonzero(split.categories == row)[:per_category]
        draw.text((4, row * size + size // 2 - 5), name, fill="black")
        for col, i in enumerate(members):
            image = Image.fromarray(split.images[i]).resize((size, size), Image.NEAREST)
            canvas.paste(image, (label_w + col * size, row * size))
            overlay = split.images[i].astype(np.float32) * 0.45
            overlay[split.masks[i] == 1] = overlay[split.masks[i] == 1] * 0.4 + np.array(
                [255, 40, 40]) * 0.6
            overlay_img = Image.fromarray(overlay.astype(np.uint8)).resize((size, size),
                                                                          Image.NEAREST)
            canvas.paste(overlay_img, (label_w + (per_category + col) * size, row * size))
    return canvas


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", required=True)
    parser.add_argument("--out", metavar="DIR", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="data report")
    splits = load_silhouettes(args.image_size, args.seed, args.data_dir)
    steps.update()
    report: dict = {"image_size": args.image_size, "seed": args.seed, "splits": {}}
    for name, split in splits.items():
        counts = {c: int((split.categories == i).sum()) for i, c in enumerate(CATEGORIES)}
        report["splits"][name] = {"examples": len(split), "per_category": counts,
                                  "foreground_pixels_pct": 100 * float(split.masks.mean())}
        print(f"{name:>5}: {len(split)} examples, "
              f"{100 * split.masks.mean():.1f} % foreground pixels, per category "
              + ", ".join(f"{c} {n}" for c, n in counts.items()))
    steps.update()
    train, test = splits["train"], splits["test"]
    baseline = threshold_baseline(train.images, train.masks, test.images, test.masks)
    report["threshold_baseline_pixel_acc"] = 100 * baseline["test_acc"]
    report["threshold_upper_bound_pixel_acc"] = 100 * baseline["upper_bound"]
    report["threshold_rule"] = baseline["rule"]
    report["majority_baseline_pixel_acc"] = 100 * float(1 - test.masks.mean())
    steps.update()
    for name, split in splits.items():
        path = out / f"examples_{name}.png"
        example_grid(split).save(path)
        report.setdefault("grids", []).append(str(path))
    steps.update()
    steps.close()
    print(f"threshold baseline (test): {report['threshold_baseline_pixel_acc']:.1f} % "
          f"(upper bound {report['threshold_upper_bound_pixel_acc']:.1f} %), "
          f"majority baseline: {report['majority_baseline_pixel_acc']:.1f} %")
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} and {', '.join(report['grids'])}")
    return report


if __name__ == "__main__":
    main()
