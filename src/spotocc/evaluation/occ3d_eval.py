"""Occ3D-nuScenes scoring of model outputs: :class:`Occ3DMetrics` and :class:`RayIoU` together.

Takes labels in the model's ids (0 free, 1 others .. 17 vegetation; see :mod:`spotocc.data.classes`)
and scores them in the files' ids (0 others .. 16 vegetation, 17 free), as the metrics expect. One
object holds both metrics' counts, moves them between processes as one flat tensor, and reports
the keys the field uses: ``mIoU``, ``IoU`` and ``<class>_IoU`` inside ``mask_camera``, the same
prefixed ``unmasked_`` over every voxel, and ``RayIoU``, ``RayIoU@1``, ``RayIoU@2``, ``RayIoU@4``,
``<class>_RayIoU@<t>`` plus how many ray origins were used. RayIoU needs cubic voxels; on any
other grid it is left out (:attr:`Occ3DEvaluation.ray_iou` is None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from spotocc.data.classes import IGNORE_INDEX, model_to_occ3d_ids
from spotocc.evaluation.occ3d import OCC3D_CLASS_NAMES, UNMASKED_PREFIX, Occ3DMetrics
from spotocc.evaluation.ray_iou import RAY_THRESHOLDS, RayIoU

__all__ = ["Occ3DEvaluation", "format_occ3d_table"]

Origins = Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[float]] | None]


class Occ3DEvaluation:
    """Camera-mask mIoU / IoU, their unmasked variant and RayIoU of model-id labels on one grid.

    Args:
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the grid, metres.
        occ_size: ``(X, Y, Z)`` voxels.
        ray_iou: also count RayIoU (only possible with cubic voxels).
    """

    def __init__(self, point_cloud_range: Sequence[float], occ_size: Sequence[int], *, ray_iou: bool = True):
        lo, hi = np.asarray(point_cloud_range[:3], float), np.asarray(point_cloud_range[3:], float)
        voxel = (hi - lo) / np.asarray(occ_size, float)
        self.voxels = Occ3DMetrics()
        self.ray_iou: RayIoU | None = None
        if ray_iou and np.allclose(voxel, voxel[0]):
            self.ray_iou = RayIoU(pc_min=tuple(lo), voxel_size=float(voxel[0]))

    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        gt: torch.Tensor | np.ndarray,
        mask_camera: torch.Tensor | np.ndarray,
        origins: Origins | None = None,
    ) -> None:
        """Add ``[B, X, Y, Z]`` model-id labels, their GT (255 = ignored) and ``mask_camera``.

        ``origins``: one entry per sample, ``[T, 3]`` metres in its grid frame, or None there (its
        own LiDAR origin); None for every sample alike. Ignored GT voxels are left out of both voxel
        counts; RayIoU needs every voxel labelled and refuses them.
        """
        pred_ids, gt_ids = model_to_occ3d_ids(pred), model_to_occ3d_ids(gt)  # [B, X, Y, Z] file ids
        self.voxels.update(pred_ids, gt_ids, mask_camera)
        if self.ray_iou is None:
            return
        if bool((gt_ids == IGNORE_INDEX).any()):
            raise ValueError(
                "RayIoU needs the unmasked ground truth, but it has ignored voxels (255): read the "
                "evaluation set with data.gt_mask=none (the metrics apply mask_camera themselves)"
            )
        batch = gt_ids.shape[0]
        if origins is None or all(o is None for o in origins):
            self.ray_iou.update(pred_ids, gt_ids, None)
        elif any(o is None for o in origins):  # mixed: cast each sample with what it has
            for i in range(batch):
                found = None if origins[i] is None else [torch.as_tensor(origins[i], dtype=torch.float64)]
                self.ray_iou.update(pred_ids[i : i + 1], gt_ids[i : i + 1], found)
        else:
            self.ray_iou.update(pred_ids, gt_ids, [torch.as_tensor(o, dtype=torch.float64) for o in origins])

    # ----------------------------------------------------------------------------------------------
    # moving counts between processes

    def counts_tensor(self) -> torch.Tensor:
        """Both metrics' counts as one flat int64 tensor (for ``all_reduce``)."""
        parts = [self.voxels.counts_tensor()]
        if self.ray_iou is not None:
            parts.append(self.ray_iou.counts_tensor())
        return torch.cat(parts)

    def load_counts_tensor(self, flat: torch.Tensor) -> None:
        """Replace the counts by a flat tensor from :meth:`counts_tensor`."""
        n = self.voxels.counts_tensor().numel()
        self.voxels.load_counts_tensor(flat[:n])
        if self.ray_iou is not None:
            self.ray_iou.load_counts_tensor(flat[n:])
        elif flat.numel() != n:
            raise ValueError(f"load_counts_tensor: expected {n} values, got {flat.numel()}")

    def export_counts(self) -> dict[str, np.ndarray]:
        """Raw counts: the voxel confusions (GT x prediction) and RayIoU's per-class ray counts."""
        counts = self.voxels.export_counts()
        ray = self.ray_iou
        if ray is not None:
            counts.update(
                ray_gt_count=ray.gt_count.copy(),  # [C] rays whose GT label is c
                ray_pred_count=ray.pred_count.copy(),  # [C] rays predicted c
                ray_tp_count=ray.tp_count.copy(),  # [K, C] both c, depth error < threshold k
                ray_samples=np.array([ray.samples, ray.origins, ray.single_origin_samples], dtype=np.int64),
            )
        return counts

    def compute(self) -> dict[str, float]:
        """The voxel metrics, then RayIoU's (percent, 2 decimals; NaN where a class has no data)."""
        results = self.voxels.compute()
        if self.ray_iou is not None:
            results.update(self.ray_iou.compute())
        return results


def format_occ3d_table(
    metrics: Mapping[str, float], class_names: Sequence[str] = OCC3D_CLASS_NAMES[:-1]
) -> str:
    """A plain-text table of :meth:`Occ3DEvaluation.compute`: one row per summary and per class; columns
    camera-mask IoU, unmasked IoU and RayIoU at each threshold ("-": not computed, "n/a": NaN)."""
    rays = [f"RayIoU@{t:g}" for t in RAY_THRESHOLDS]
    headers = ["mask_camera", "unmasked", *rays]
    rows: list[tuple[str, list[str | None]]] = [
        ("mIoU", ["mIoU", f"{UNMASKED_PREFIX}mIoU", *rays]),
        ("IoU (occupied vs free)", ["IoU", f"{UNMASKED_PREFIX}IoU", None, None, None]),
    ]
    rows += [
        (f"  {name}", [f"{name}_IoU", f"{UNMASKED_PREFIX}{name}_IoU", *(f"{name}_{r}" for r in rays)])
        for name in class_names
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(8, len(h)) for h in headers]
    lines = ["  ".join([" " * label_width] + [h.rjust(w) for h, w in zip(headers, widths)])]
    lines.append("-" * len(lines[0]))
    for label, keys in rows:
        cells = [_cell(None if key is None else metrics.get(key)).rjust(w) for key, w in zip(keys, widths)]
        lines.append("  ".join([label.ljust(label_width)] + cells))
        if label == "IoU (occupied vs free)":
            lines.append("  per-class IoU")
    lines.append("-" * len(lines[0]))
    ray = metrics.get("RayIoU")
    if ray is None:
        lines.append("RayIoU: not computed (skipped, or the grid's voxels are not cubic)")
    else:
        origins = metrics.get("ray_origins_per_sample", 0.0)
        single = int(metrics.get("ray_samples_single_origin", 0))
        lines.append(
            f"RayIoU (mean over {', '.join(f'{t:g}' for t in RAY_THRESHOLDS)} m): {_cell(ray)}; "
            f"{origins:.2f} ray origins per sample, {single} of {int(metrics.get('ray_samples', 0))} "
            "samples cast from their own LiDAR only"
        )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.2f}"
