"""The whole model: camera images -> LSS voxel volume -> sparse encoder and pyramid -> occupancy head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spotocc.config import Config
from spotocc.errors import ConfigError, SpotoccError
from spotocc.models.backbones import ImageBackbone
from spotocc.models.heads.sparseocc import SparseOccHead
from spotocc.models.heads.spot import SpotOccHead
from spotocc.models.image_neck import SECONDFPN
from spotocc.models.sparse.encoder import SparseLatentDiffuser
from spotocc.models.sparse.pyramid import SparseFeaturePyramid
from spotocc.models.view_transform import ViewTransformer

HEADS: dict[str, type[nn.Module]] = {"spot": SpotOccHead, "sparseocc": SparseOccHead}

CAMERA_KEYS = ("rots", "trans", "intrins", "post_rots", "post_trans", "bda")


class OccupancyModel(nn.Module):
    """SPOT-Occ (or the SparseOcc baseline, by its head): batch dict -> losses or labels.

    Submodules, in data order: ``image_backbone`` -> ``image_neck`` (SECONDFPN, stride 16) ->
    ``view_transformer`` (camera-aware depth, LSS lift and sum-pool) -> ``voxel_encoder``
    (SparseLatentDiffuser) -> ``voxel_neck`` (SparseFeaturePyramid) -> ``head``.
    The batch dict is the one of :mod:`spotocc.data.batch`.
    """

    def __init__(
        self,
        *,
        image_backbone: ImageBackbone,
        image_neck: SECONDFPN,
        view_transformer: ViewTransformer,
        voxel_encoder: SparseLatentDiffuser,
        voxel_neck: SparseFeaturePyramid,
        head: nn.Module,
        occ_size: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.image_backbone = image_backbone
        self.image_neck = image_neck
        self.view_transformer = view_transformer
        self.voxel_encoder = voxel_encoder
        self.voxel_neck = voxel_neck
        self.head = head
        self.occ_size = tuple(int(s) for s in occ_size)
        # share of the depth targets mixed into the lift in training (train.depth_teacher_forcing);
        # set by the trainer every step, 0 = the released behaviour
        self.depth_teacher_weight = 0.0

    @classmethod
    def from_config(cls, cfg: Config, *, load_pretrained: bool = True) -> OccupancyModel:
        """Build the model of ``cfg``; ``load_pretrained`` loads ``image_backbone.weights`` if set."""
        head_type = cfg.model.head.type
        if head_type not in HEADS:
            raise ValueError(f"model.head.type must be one of {sorted(HEADS)}, got {head_type!r}")
        return cls(
            image_backbone=ImageBackbone.from_config(cfg.model.image_backbone, load_weights=load_pretrained),
            image_neck=SECONDFPN.from_config(cfg.model.image_neck),
            view_transformer=ViewTransformer.from_config(
                cfg.model.view_transformer, cfg.grid, cfg.data.input_size, cfg.model.head.num_classes
            ),
            voxel_encoder=SparseLatentDiffuser.from_config(cfg.model),
            voxel_neck=SparseFeaturePyramid.from_config(cfg.model),
            head=HEADS[head_type].from_config(cfg.model.head),
            occ_size=cfg.grid.occ_size,
        )

    # ---------------------------------------------------------------------------------------------
    # stages

    def encode_images(self, img: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, H, W] -> image features [B, N, C, H/16, W/16]."""
        if img.dim() != 5 or img.shape[2] != 3:
            raise ValueError(f"img must be [B, N, 3, H, W], got {tuple(img.shape)}")
        b, n = img.shape[:2]
        feats = self.image_neck(self.image_backbone(img.flatten(0, 1)))  # [B*N, C, fH, fW]
        return feats.unflatten(0, (b, n))

    def lift(self, feats: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features -> (LSS volume [B, C, X, Y, Z] fp32, depth probabilities [B*N, D, fH, fW])."""
        return self.view_transformer(feats, *(batch[key] for key in CAMERA_KEYS))

    def encode_voxels(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """LSS volume -> the neck's 4 dense volumes (index 0 = mask features, 1..3 coarser memories)."""
        with torch.autocast(volume.device.type, enabled=False):  # released: the 3D encoder runs in fp32
            return self.voxel_neck(self.voxel_encoder(volume.float()))

    def extract_features(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Batch -> (voxel features for the head, depth probabilities)."""
        volume, depth_prob = self.lift(self.encode_images(batch["img"]), batch)
        return self.encode_voxels(volume), depth_prob

    # ---------------------------------------------------------------------------------------------
    # public entry points

    def forward_train(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss: ``loss_depth`` (when the batch has ``gt_depth``), ``loss_image_semantic`` (under
        ``view_transformer.semantic_loss_weight``) and the head's losses."""
        if "gt_occ" not in batch:
            raise KeyError("forward_train needs 'gt_occ' in the batch (a training split with labels)")
        vt = self.view_transformer
        cams = [batch[key] for key in CAMERA_KEYS]
        targets = teacher = None
        if "gt_depth" in batch:
            targets = self.depth_target_bins(batch)  # (bins, valid) [B*N*fH*fW]
            if self.depth_teacher_weight > 0.0:  # the lift takes the true bins, released binning or not
                fixed = vt.fix_depth_bin_offset
                bins = targets if fixed else self.depth_target_bins(batch, fix_bin_offset=True)
                teacher = (*bins, self.depth_teacher_weight)
        volume, depth_prob, context = vt(
            self.encode_images(batch["img"]), *cams, with_context=True, teacher=teacher
        )
        voxel_feats = self.encode_voxels(volume)
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses["loss_depth"] = self.depth_loss(batch, depth_prob, targets)
        if vt.context_classifier is not None:
            points = vt.geometry(*cams)  # [B, N, D, fH, fW, 3]
            losses["loss_image_semantic"] = vt.semantic_loss(context, batch["gt_occ"], points)
        losses.update(self.head.forward_train(voxel_feats, batch["gt_occ"]))
        return losses

    def depth_target_bins(
        self, batch: dict[str, Any], *, fix_bin_offset: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The depth net's targets of a batch with ``gt_depth``: (bins, valid) [B*N*fH*fW]
        (:meth:`ViewTransformer.depth_target_bins`; ``fix_bin_offset`` None = the configured binning)."""
        vt = self.view_transformer
        points = vt.geometry(*(batch[key] for key in CAMERA_KEYS)) if vt.depth_from_occupancy else None
        return vt.depth_target_bins(
            batch["gt_depth"], gt_occ=batch.get("gt_occ"), points=points, fix_bin_offset=fix_bin_offset
        )

    def depth_loss(
        self,
        batch: dict[str, Any],
        depth_prob: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The depth net's weighted loss on a batch with ``gt_depth`` (and ``gt_occ`` under
        ``view_transformer.depth_from_occupancy``); depth_prob [B*N, D, fH, fW] from :meth:`lift`;
        ``targets``: the batch's :meth:`depth_target_bins` when already computed."""
        bins, valid = self.depth_target_bins(batch) if targets is None else targets
        return self.view_transformer.weighted_depth_loss(depth_prob, bins, valid)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """int64 labels [B, X, Y, Z] at the configured occupancy size (``cfg.grid.occ_size``)."""
        voxel_feats, _ = self.extract_features(batch)
        return self.head.predict(voxel_feats, self.occ_size)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | torch.Tensor:
        """``forward_train`` in training mode, ``predict`` in eval mode."""
        return self.forward_train(batch) if self.training else self.predict(batch)


def build_model(cfg: Config, *, load_pretrained: bool = True) -> OccupancyModel:
    """The model of a config (``spotocc.config.get_config``); see :class:`OccupancyModel`.

    The modules check their arguments, which come from the config: a value they refuse (e.g. a
    negative ``view_transformer.depth_distance_weighting``) is a :class:`ConfigError`, i.e. one line
    for the user and exit status 2 on the command line, not a traceback."""
    try:
        return OccupancyModel.from_config(cfg, load_pretrained=load_pretrained)
    except SpotoccError:
        raise
    except ValueError as err:
        raise ConfigError(f"config {cfg.name!r}: {err}") from err
