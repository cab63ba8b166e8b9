"""Occ3D-nuScenes voxel metrics: camera-mask mIoU, occupied-vs-free IoU, and their unmasked variants.

Conventions, each as in the benchmark's own evaluation (``Metric_mIoU`` in
``projects/mmdet3d_plugin/datasets/occ_metrics.py`` of CVPR2023-3D-Occupancy-Prediction, the same
class in Tsinghua-MARS-Lab/Occ3D ``tools/eval.py`` and in FlashOCC/BEVDet
``projects/mmdet3d_plugin/core/evaluation/occ_metrics.py``):

- Labels are the file's ids: 0 ``others`` .. 16 ``vegetation``, 17 ``free`` (:data:`OCC3D_CLASS_NAMES`).
- One ``[18, 18]`` confusion matrix (GT row, prediction column) is summed over the whole dataset, over
  the voxels where ``mask_camera`` is set (``use_image_mask=True``, what every Occ3D-nuScenes number
  in the literature uses). GT values outside ``0..17`` are skipped there; here only ``ignore_index``
  is, and any other value is an error.
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. A class that appears in neither GT nor prediction gives
  ``0 / 0 = NaN`` and is left out of the mean (``np.nanmean``); a class predicted but absent from the
  GT has IoU 0 and counts. (MCG-NJU/SparseOcc ``loaders/old_metrics.py`` differs: it sets NaN for
  every class absent from the GT, predicted or not. On the full val split every class is present and
  the two agree.)
- ``mIoU`` is the mean over the 17 non-free classes 0..16 (``free`` is left out).
- ``IoU`` is occupied (ids 0..16) against ``free`` (17) on the same voxels: the geometric IoU that
  papers print beside mIoU, e.g. ``compute_occ_iou`` of mmdet3d-1.x ``OccMetric`` ports.
- Values are percent rounded to 2 decimals (``round(100 * x, 2)`` as the reference prints them).

Result keys: ``mIoU``, ``IoU``, ``<class>_IoU`` (camera mask); the same with the prefix ``unmasked_``
for every voxel of the grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from spotocc.data.classes import OCC3D_FILE_CLASSES, OCC3D_FREE
from spotocc.evaluation.ssc import round_percent, with_prefix

__all__ = ["OCC3D_CLASS_NAMES", "OCC3D_FREE_INDEX", "Occ3DMetrics", "class_iou", "geometry_iou"]

OCC3D_CLASS_NAMES: tuple[str, ...] = OCC3D_FILE_CLASSES  # file ids: 0 others .. 16 vegetation, 17 free
OCC3D_FREE_INDEX = OCC3D_FREE

UNMASKED_PREFIX = "unmasked_"


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU of a ``[C, C]`` (GT x prediction) confusion: ``TP / (TP + FP + FN)``, NaN for 0/0."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return tp / union


def geometry_iou(confusion: np.ndarray, free_index: int = OCC3D_FREE_INDEX) -> float:
    """IoU of occupied (every class but ``free_index``) against free; NaN when nothing is occupied."""
    confusion = np.asarray(confusion, dtype=np.int64)
    occupied = np.arange(confusion.shape[0]) != free_index
    tp = int(confusion[np.ix_(occupied, occupied)].sum())
    fp = int(confusion[free_index, occupied].sum())
    fn = int(confusion[occupied, free_index].sum())
    return tp / (tp + fp + fn) if tp + fp + fn > 0 else float("nan")


class Occ3DMetrics:
    """Dataset-level Occ3D counts: one confusion inside ``mask_camera``, one over every voxel.

    Args:
        class_names: one name per label id, the last one ``free`` (default :data:`OCC3D_CLASS_NAMES`).
        ignore_index: GT value left out of both counts (the Occ3D files have none; must be >= C).

    ``update(pred, gt, mask_camera)`` takes integer labels and a boolean (or 0/1) mask of one equal
    shape: one sample ``[X, Y, Z]`` or a batch ``[B, X, Y, Z]``; NumPy arrays or tensors on any device.
    """

    def __init__(self, class_names: Sequence[str] = OCC3D_CLASS_NAMES, ignore_index: int = 255):
        if len(class_names) < 2:
            raise ValueError(f"Occ3DMetrics needs at least 2 classes (one + free), got {list(class_names)}")
        if ignore_index < len(class_names):
            raise ValueError(
                f"ignore_index {ignore_index} collides with a class id (0..{len(class_names) - 1})"
            )
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.free_index = self.num_classes - 1
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Forget every count."""
        c = self.num_classes
        self.confusion_masked = np.zeros((c, c), dtype=np.int64)  # [GT, pred] where mask_camera
        self.confusion_all = np.zeros((c, c), dtype=np.int64)  # [GT, pred] over every voxel
        self.samples = 0

    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        gt: torch.Tensor | np.ndarray,
        mask_camera: torch.Tensor | np.ndarray,
    ) -> None:
        """Add one sample ``[X, Y, Z]`` or a batch ``[B, X, Y, Z]`` of labels with its camera mask."""
        pred_t = as_label_tensor(pred, "pred", "Occ3DMetrics.update")
        gt_t = as_label_tensor(gt, "gt", "Occ3DMetrics.update")
        mask_t = _as_mask(mask_camera)
        if not (pred_t.shape == gt_t.shape == mask_t.shape):
            raise ValueError(
                f"Occ3DMetrics.update: pred {tuple(pred_t.shape)}, gt {tuple(gt_t.shape)} and "
                f"mask_camera {tuple(mask_t.shape)} must have one shape"
            )
        if gt_t.dim() not in (3, 4):
            raise ValueError(
                "Occ3DMetrics.update: expected [X, Y, Z] or [B, X, Y, Z] labels, "
                f"got shape {tuple(gt_t.shape)}"
            )
        self.samples += 1 if gt_t.dim() == 3 else gt_t.shape[0]
        if gt_t.numel() == 0:
            return
        device = gt_t.device
        pred_t, mask_t = pred_t.to(device), mask_t.to(device)
        c = self.num_classes
        p_min, p_max = (int(v) for v in torch.aminmax(pred_t))
        if p_min < 0 or p_max >= c:
            raise ValueError(
                f"Occ3DMetrics.update: predictions must lie in 0..{c - 1}, found {p_min}..{p_max}"
            )
        known = (gt_t >= 0) & (gt_t < c)
        ignored = gt_t == self.ignore_index
        if not bool((known | ignored).all()):
            bad = torch.unique(gt_t[~(known | ignored)])[:8].tolist()
            raise ValueError(
                f"Occ3DMetrics.update: GT labels must be 0..{c - 1} or ignore_index {self.ignore_index}, "
                f"found {bad}"
            )
        # Combined index GT * C + prediction; ignored voxels go to one extra bin (C * C).
        index = gt_t.reshape(-1).long() * c + pred_t.reshape(-1).long()  # [N]
        index = torch.where(known.reshape(-1), index, torch.full_like(index, c * c))
        everything = torch.bincount(index, minlength=c * c + 1)[: c * c]
        masked = torch.bincount(index[mask_t.reshape(-1)], minlength=c * c + 1)[: c * c]
        self.confusion_all += everything.reshape(c, c).cpu().numpy().astype(np.int64)
        self.confusion_masked += masked.reshape(c, c).cpu().numpy().astype(np.int64)

    # ----------------------------------------------------------------------------------------------
    # moving counts between processes

    def counts_tensor(self) -> torch.Tensor:
        """All counts as one flat int64 tensor (for ``all_reduce``); see :meth:`load_counts_tensor`."""
        flat = np.concatenate(
            [self.confusion_masked.reshape(-1), self.confusion_all.reshape(-1), [self.samples]]
        )
        return torch.from_numpy(flat.astype(np.int64))

    def load_counts_tensor(self, flat: torch.Tensor) -> None:
        """Replace the counts by a flat tensor from :meth:`counts_tensor` (e.g. after ``all_reduce``)."""
        values = flat.detach().cpu().numpy().astype(np.int64)
        c2 = self.num_classes**2
        if values.shape != (2 * c2 + 1,):
            raise ValueError(f"load_counts_tensor: expected {2 * c2 + 1} values, got {values.shape}")
        c = self.num_classes
        self.confusion_masked = values[:c2].reshape(c, c).copy()
        self.confusion_all = values[c2 : 2 * c2].reshape(c, c).copy()
        self.samples = int(values[-1])

    def export_counts(self) -> dict[str, np.ndarray]:
        """Raw counts: ``confusion_masked``, ``confusion_all`` ``[C, C]`` (GT x pred), ``samples`` [1]."""
        return {
            "confusion_masked": self.confusion_masked.copy(),
            "confusion_all": self.confusion_all.copy(),
            "samples": np.array([self.samples], dtype=np.int64),
        }

    def merge_counts(self, counts: Mapping[str, Any]) -> None:
        """Add counts exported by another ``Occ3DMetrics`` with the same classes."""
        for key in ("confusion_masked", "confusion_all"):
            values = np.asarray(counts[key], dtype=np.int64)
            if values.shape != self.confusion_all.shape:
                raise ValueError(
                    f"merge_counts: {key} of shape {values.shape}, expected {self.confusion_all.shape}"
                )
        self.confusion_masked += np.asarray(counts["confusion_masked"], dtype=np.int64)
        self.confusion_all += np.asarray(counts["confusion_all"], dtype=np.int64)
        self.samples += int(np.asarray(counts["samples"]).sum())

    # ----------------------------------------------------------------------------------------------
    # results

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``IoU``, ``<class>_IoU`` (camera mask), then the same keys prefixed ``unmasked_``.

        Percent, rounded to 2 decimals; NaN for a class in neither GT nor prediction (and for a mean
        with no class to average).
        """
        results = self._results(self.confusion_masked)
        results.update(with_prefix(self._results(self.confusion_all), UNMASKED_PREFIX))
        return results

    def _results(self, confusion: np.ndarray) -> dict[str, float]:
        iou = class_iou(confusion)
        non_free = [i for i in range(self.num_classes) if i != self.free_index]
        values = {"mIoU": _nanmean(iou[non_free]), "IoU": geometry_iou(confusion, self.free_index)}
        values.update({f"{self.class_names[i]}_IoU": float(iou[i]) for i in non_free})
        return {key: round_percent(value) for key, value in values.items()}


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _as_mask(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"Occ3DMetrics.update: mask_camera must be a numpy array or a torch tensor, got {type(mask)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"Occ3DMetrics.update: mask_camera must be boolean or 0/1 integers, got dtype {mask.dtype}"
        )
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("Occ3DMetrics.update: mask_camera must hold only 0 and 1")
    return mask != 0


def as_label_tensor(values: torch.Tensor | np.ndarray, name: str, caller: str) -> torch.Tensor:
    """Integer labels as a tensor (NumPy arrays are wrapped without a copy where possible)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise TypeError(f"{caller}: {name} must hold integer labels, got dtype {values.dtype}")
        if values.dtype in (np.uint16, np.uint32, np.uint64):
            values = values.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(values))
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{caller}: {name} must hold integer labels, got dtype {values.dtype}")
        return values.detach()
    raise TypeError(f"{caller}: {name} must be a numpy array or a torch tensor, got {type(values)}")
