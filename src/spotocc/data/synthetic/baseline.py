"""The best image-blind prediction and the SC / SSC scores it gets (a sanity check of scene variety).

A model that ignores its images can at best predict, for every voxel, the label most frequent there
over the training set. If the held-out scores of that prediction are close to perfect, the scenes do
not vary enough to show that a model learned from its images.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE = 255


def most_frequent_labels(volumes: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """uint8 [X, Y, Z]: per voxel the most frequent label in 0..num_classes-1 over ``volumes`` (255 is
    skipped; ties go to the smaller label; a voxel that is never labelled gets 0)."""
    counts: np.ndarray | None = None
    for vol in volumes:
        vol = np.asarray(vol)
        if counts is None:
            counts = np.zeros((num_classes, *vol.shape), dtype=np.int32)  # [C, X, Y, Z]
        elif vol.shape != counts.shape[1:]:
            raise ValueError(f"label volumes differ in shape: {vol.shape} vs {counts.shape[1:]}")
        bad = (vol >= num_classes) & (vol != IGNORE)
        if bad.any():
            raise ValueError(
                f"labels must be in 0..{num_classes - 1} or {IGNORE}, found {np.unique(vol[bad])}"
            )
        for c in range(num_classes):
            counts[c] += vol == c
    if counts is None:
        raise ValueError("most_frequent_labels: no label volumes given")
    return np.argmax(counts, axis=0).astype(np.uint8)  # argmax returns the first (smallest) label on ties


def ssc_scores(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> dict[str, float | list[float]]:
    """SC IoU and SSC mIoU of (prediction, ground truth) volumes as the released metric sums them
    (spec 04, section 3): 255 is ignored, counts are summed over samples, mIoU over classes 1..C-1."""
    tp_sc = fp_sc = fn_sc = 0
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    fn = np.zeros(num_classes, dtype=np.int64)
    for pred, gt in pairs:
        valid = gt != IGNORE
        g, p = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
        tp_sc += int(np.sum((g > 0) & (p > 0)))
        fp_sc += int(np.sum((g == 0) & (p > 0)))
        fn_sc += int(np.sum((g > 0) & (p == 0)))
        both = np.bincount(g[g == p], minlength=num_classes)[:num_classes]
        tp += both
        fp += np.bincount(p, minlength=num_classes)[:num_classes] - both
        fn += np.bincount(g, minlength=num_classes)[:num_classes] - both
    denom = tp_sc + fp_sc + fn_sc
    iou = tp / (tp + fp + fn + 1e-5)
    return {
        "sc_iou": tp_sc / denom if denom else 0.0,
        "ssc_miou": float(iou[1:].mean()),
        "class_iou": [float(v) for v in iou],
    }
