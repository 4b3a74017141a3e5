"""The numbers reported by Zhang et al., *Network Transplanting* (Tables 2-4), for comparison.

Classification cells are test error (%), segmentation cells pixel accuracy (%),
on Pascal VOC 2011 + SBD with VGG-16 / FCN-8s. Layout matches ``results.json``:
``{method: {samples: {category: value, "avg": value}}}`` with sample counts as
strings. Methods the paper did not run are absent.
"""

from __future__ import annotations

MAMMALS = ("cat", "cow", "dog", "horse", "sheep")
TARGETS = ("cat", "cow", "horse", "sheep")


def _row(categories, values):
    *cells, avg = values
    return {**dict(zip(categories, cells, strict=True)), "avg": avg}


TEACHERS = {
    "cls_error": {"cat": 1.6, "cow": 0.6, "dog": 4.1, "horse": 1.6, "sheep": 1.0},
    "seg_pixel_acc": {"cat": 95.0, "cow": 94.7, "dog": 95.8, "horse": 94.6, "sheep": 95.6},
}

# Table 2: adapters inside each teacher (Exp. 1).
EXP1 = {
    "1conv": {
        "direct-learn": {
            "100": _row(MAMMALS, (12.89, 3.09, 12.89, 10.82, 9.28, 9.79)),
            "50": _row(MAMMALS, (13.92, 15.98, 12.37, 16.49, 15.46, 14.84)),
            "20": _row(MAMMALS, (16.49, 26.80, 28.35, 32.47, 25.77, 25.98)),
            "10": _row(MAMMALS, (39.18, 39.18, 35.05, 41.75, 38.66, 38.76)),
        },
        "back-distill": {
            "100": _row(MAMMALS, (1.55, 0.52, 3.61, 1.55, 1.03, 1.65)),
            "50": _row(MAMMALS, (1.55, 0.52, 3.61, 1.55, 1.03, 1.65)),
            "20": _row(MAMMALS, (1.55, 0.52, 3.09, 1.55, 1.03, 1.55)),
            "10": _row(MAMMALS, (1.55, 0.52, 3.61, 1.55, 1.03, 1.65)),
            "0": _row(MAMMALS, (1.55, 0.52, 4.12, 1.55, 1.03, 1.75)),
        },
    },
    "3conv": {
        "direct-learn": {
            "100": _row(MAMMALS, (9.28, 6.70, 12.37, 11.34, 3.61, 8.66)),
            "50": _row(MAMMALS, (14.43, 13.92, 15.46, 8.76, 7.22, 11.96)),
            "20": _row(MAMMALS, (22.16, 25.77, 32.99, 22.68, 22.16, 25.15)),
            "10": _row(MAMMALS, (36.08, 32.99, 31.96, 34.54, 34.02, 33.92)),
        },
        "back-distill": {
            "100": _row(MAMMALS, (1.03, 2.58, 4.12, 1.55, 2.58, 2.37)),
            "50": _row(MAMMALS, (3.09, 3.09, 4.12, 2.06, 4.64, 3.40)),
            "20": _row(MAMMALS, (7.22, 6.70, 7.22, 2.58, 5.15, 5.77)),
            "10": _row(MAMMALS, (8.25, 15.46, 10.31, 13.92, 10.31, 11.65)),
            "0": _row(MAMMALS, (50.00, 50.00, 50.00, 49.48, 50.00, 49.90)),
        },
    },
}

# Table 3 (top): to the dog's classification module (Exp. 2).
EXP2 = {
    "direct-learn": {
        "100": _row(TARGETS, (20.10, 12.37, 18.56, 11.86, 15.72)),
        "50": _row(TARGETS, (22.68, 19.59, 19.07, 14.95, 19.07)),
        "20": _row(TARGETS, (31.96, 37.11, 39.69, 35.57, 36.08)),
        "10": _row(TARGETS, (41.75, 37.63, 44.33, 33.51, 39.31)),
    },
    "back-distill": {
        "100": _row(TARGETS, (9.79, 5.67, 8.25, 4.64, 7.09)),
        "50": _row(TARGETS, (10.82, 18.04, 13.92, 5.15, 11.98)),
        "20": _row(TARGETS, (21.13, 35.57, 32.47, 22.68, 27.96)),
        "10": _row(TARGETS, (34.02, 42.27, 44.85, 33.51, 38.66)),
    },
}

# Table 3 (bottom): to the dog's segmentation module (Exp. 3).
EXP3 = {
    "direct-learn": {
        "100": _row(TARGETS, (76.54, 74.60, 81.00, 78.37, 77.63)),
        "50": _row(TARGETS, (71.30, 74.76, 76.83, 78.47, 75.34)),
        "20": _row(TARGETS, (71.13, 74.82, 76.83, 77.81, 75.15)),
        "10": _row(TARGETS, (70.46, 74.74, 76.49, 78.25, 74.99)),
    },
    "distill": {
        "100": _row(TARGETS, (74.65, 80.18, 78.05, 80.50, 78.35)),
        "50": _row(TARGETS, (68.32, 76.50, 78.58, 80.62, 76.01)),
        "20": _row(TARGETS, (71.17, 74.82, 76.05, 78.10, 75.04)),
        "10": _row(TARGETS, (70.47, 74.74, 76.83, 78.32, 75.09)),
    },
    "back-distill": {
        "100": _row(TARGETS, (85.17, 90.04, 90.13, 86.53, 87.97)),
        "50": _row(TARGETS, (83.14, 90.02, 90.46, 85.58, 87.30)),
        "20": _row(TARGETS, (84.03, 88.37, 89.22, 85.01, 86.66)),
        "10": _row(TARGETS, (82.32, 89.49, 85.97, 83.50, 85.32)),
    },
}

# Table 4: to leave-one-out modules trained on mammals + dissimilar categories.
TABLE4 = {
    "classification": {
        "direct-learn": {
            "100": _row(TARGETS, (14.43, 20.62, 17.01, 11.86, 15.98)),
            "50": _row(TARGETS, (21.13, 23.71, 15.46, 10.31, 17.65)),
            "20": _row(TARGETS, (25.26, 24.23, 39.18, 23.71, 28.10)),
            "10": _row(TARGETS, (42.27, 36.60, 40.72, 39.18, 39.69)),
        },
        "back-distill": {
            "100": _row(TARGETS, (5.67, 3.61, 6.70, 2.58, 4.64)),
            "50": _row(TARGETS, (7.22, 9.28, 8.76, 5.67, 7.73)),
            "20": _row(TARGETS, (17.01, 19.59, 23.71, 14.95, 18.82)),
            "10": _row(TARGETS, (42.27, 32.99, 28.35, 30.41, 33.51)),
        },
    },
    "segmentation": {
        "direct-learn": {
            "20": _row(TARGETS, (68.69, 81.02, 71.88, 72.65, 73.56)),
            "10": _row(TARGETS, (64.97, 69.65, 80.26, 69.87, 71.19)),
        },
        "back-distill": {
            "20": _row(TARGETS, (73.34, 84.78, 81.40, 81.04, 80.14)),
            "10": _row(TARGETS, (74.59, 83.51, 82.08, 80.21, 80.10)),
        },
    },
}
