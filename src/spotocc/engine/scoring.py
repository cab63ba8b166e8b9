"""What the evaluation loops score, chosen by the config: SSC metrics, or the Occ3D-nuScenes metrics.

A scorer takes the model's labels with the batch they belong to and keeps dataset-level counts that
:func:`spotocc.engine.evaluator` sums across ranks (``counts_tensor`` / ``load_counts_tensor``)
before ``compute`` runs once. Occ3D configs (``data.format == "occ3d-nuscenes"`` or the class set
``occ3d``) get :class:`~spotocc.evaluation.occ3d_eval.Occ3DEvaluation`: camera-mask mIoU from the
batch's ``mask_camera``, and RayIoU cast from ``meta["ray_origins"]`` where the reader gives them
(else from each sample's own LiDAR; the result counts those samples). Every other config keeps
:class:`~spotocc.evaluation.SSCMetrics` exactly as before.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from spotocc.config import Config
from spotocc.evaluation import SSCMetrics
from spotocc.evaluation.field_of_view import ignore_outside_camera_view
from spotocc.models.occupancy import CAMERA_KEYS

__all__ = [
    "Occ3DScorer",
    "SSCScorer",
    "build_scorer",
    "evaluation_config",
    "scored_ground_truth",
    "uses_occ3d",
]


def uses_occ3d(cfg: Config) -> bool:
    """True when ``cfg`` is scored with the Occ3D-nuScenes metrics."""
    return cfg.data.format == "occ3d-nuscenes" or cfg.data.class_set == "occ3d"


def evaluation_config(cfg: Config) -> Config:
    """The config an evaluation set is read with: for Occ3D, ``data.gt_mask=none`` (the metrics apply
    ``mask_camera`` themselves, and the unmasked variant and RayIoU need every voxel); else ``cfg``."""
    if not uses_occ3d(cfg) or cfg.data.gt_mask == "none":
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.gt_mask = "none"
    return cfg


def scored_ground_truth(batch: dict[str, Any], cfg: Config) -> torch.Tensor:
    """The batch's ``gt_occ`` [B, X, Y, Z] as scored: with ``eval.camera_view_only``, every voxel outside
    all cameras' views is ignored (255)."""
    if not cfg.eval.camera_view_only:
        return batch["gt_occ"]
    cams = [batch[key] for key in CAMERA_KEYS]
    return ignore_outside_camera_view(batch["gt_occ"], cams, cfg.grid, tuple(cfg.data.input_size))


class SSCScorer:
    """:class:`SSCMetrics` fed from batches (``eval.camera_view_only`` applied)."""

    def __init__(self, cfg: Config):
        from spotocc.data.classes import class_set

        self.cfg = cfg
        self.metrics = SSCMetrics(class_set(cfg.data.class_set)[0], class0_quirk=cfg.eval.class0_quirk)

    def update(
        self, pred: torch.Tensor | np.ndarray, batch: dict[str, Any], index: int | None = None
    ) -> None:
        """Score ``pred`` [B, X, Y, Z] against the batch, or [X, Y, Z] against its sample ``index``."""
        gt = scored_ground_truth(batch, self.cfg)
        self.metrics.update(pred, gt if index is None else gt[index])

    def counts_tensor(self) -> torch.Tensor:
        return self.metrics.counts_tensor()

    def load_counts_tensor(self, flat: torch.Tensor) -> None:
        self.metrics.load_counts_tensor(flat)

    def export_counts(self) -> dict[str, np.ndarray]:
        return self.metrics.export_counts()

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()


class Occ3DScorer(SSCScorer):
    """:class:`~spotocc.evaluation.occ3d_eval.Occ3DEvaluation` fed from batches of an Occ3D reader."""

    def __init__(self, cfg: Config, *, ray_iou: bool = True):
        from spotocc.evaluation.occ3d_eval import Occ3DEvaluation

        self.cfg = cfg
        self.metrics = Occ3DEvaluation(cfg.grid.point_cloud_range, cfg.grid.occ_size, ray_iou=ray_iou)

    def update(
        self, pred: torch.Tensor | np.ndarray, batch: dict[str, Any], index: int | None = None
    ) -> None:
        if "mask_camera" not in batch:
            raise ValueError("the Occ3D metrics need the batch's mask_camera (an Occ3D-nuScenes reader)")
        gt, mask = batch["gt_occ"], batch["mask_camera"]  # [B, X, Y, Z]
        origins = [m.get("ray_origins") for m in batch["meta"]]  # B entries of [T, 3] or None
        if index is not None:
            gt, mask, origins = gt[index : index + 1], mask[index : index + 1], origins[index : index + 1]
            pred = pred[None]
        self.metrics.update(_as_tensor(pred, gt.device), gt, mask, origins)


def build_scorer(cfg: Config, *, ray_iou: bool = True) -> SSCScorer:
    """The scorer of ``cfg``: :class:`Occ3DScorer` for Occ3D configs, else :class:`SSCScorer`."""
    return Occ3DScorer(cfg, ray_iou=ray_iou) if uses_occ3d(cfg) else SSCScorer(cfg)


def _as_tensor(values: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    return values.to(device)
