"""SECONDFPN image neck and the image encoder (backbone + neck) used by the occupancy models."""

from __future__ import annotations

import torch
import torch.nn as nn

from spotocc.config import ImageBackboneConfig, ImageNeckConfig
from spotocc.models.backbones import ImageBackbone


class SECONDFPN(nn.Module):
    """Resample every level to one stride, BN + ReLU, and concatenate along channels (mmdet3d SECONDFPN).

    Level i uses, for ``upsample_strides[i] = s``: ``s >= 1`` -> ``ConvTranspose2d(k=s, stride=s)``;
    ``s < 1`` -> ``Conv2d(k=round(1/s), stride=round(1/s))`` (non-overlapping patch downsampling). All
    without bias, then BatchNorm (eps 1e-3, momentum 0.01) and ReLU. Module names follow the released
    checkpoint (``deblocks.{i}.{0: conv, 1: bn}``).
    """

    def __init__(
        self,
        *,
        in_channels: tuple[int, ...],
        out_channels: tuple[int, ...],
        upsample_strides: tuple[float, ...],
    ) -> None:
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(upsample_strides):
            raise ValueError(
                "image_neck: in_channels, out_channels and upsample_strides must have the same length, got "
                f"{in_channels}, {out_channels}, {upsample_strides}"
            )
        self.upsample_strides = tuple(upsample_strides)
        self.out_channels = sum(out_channels)
        self.deblocks = nn.ModuleList()
        for c_in, c_out, stride in zip(in_channels, out_channels, upsample_strides):
            if stride <= 0:
                raise ValueError(f"image_neck.upsample_strides must be positive, got {upsample_strides}")
            if stride >= 1:
                k = int(round(stride))
                if k != stride:
                    raise ValueError(f"image_neck.upsample_strides: {stride} >= 1 must be an integer")
                resample: nn.Module = nn.ConvTranspose2d(c_in, c_out, kernel_size=k, stride=k, bias=False)
                nn.init.kaiming_normal_(resample.weight, mode="fan_out", nonlinearity="relu")
            else:
                k = int(round(1 / stride))
                resample = nn.Conv2d(c_in, c_out, kernel_size=k, stride=k, bias=False)
            self.deblocks.append(
                nn.Sequential(resample, nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))
            )

    @classmethod
    def from_config(cls, cfg: ImageNeckConfig) -> SECONDFPN:
        return cls(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, upsample_strides=cfg.upsample_strides
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Feature maps (strides s_i) -> [B, sum(out_channels), H / s, W / s] at the common stride s."""
        if len(feats) != len(self.deblocks):
            raise ValueError(f"SECONDFPN expects {len(self.deblocks)} feature maps, got {len(feats)}")
        outs = [block(f) for block, f in zip(self.deblocks, feats)]
        sizes = {tuple(o.shape[-2:]) for o in outs}
        if len(sizes) > 1:
            raise ValueError(
                f"SECONDFPN: levels resampled to different sizes {sorted(sizes)}; the input image size "
                "must be a multiple of the backbone's largest stride"
            )
        return torch.cat(outs, dim=1)


class ImageEncoder(nn.Module):
    """Backbone + SECONDFPN on every camera: [B, N, 3, H, W] -> [B, N, C, H / 16, W / 16]."""

    def __init__(self, *, backbone: ImageBackbone, neck: SECONDFPN) -> None:
        super().__init__()
        if tuple(neck.deblocks[i][0].in_channels for i in range(len(neck.deblocks))) != backbone.out_channels:
            raise ValueError(
                f"image_neck.in_channels must equal the backbone's output channels {backbone.out_channels}"
            )
        self.backbone = backbone
        self.neck = neck
        self.out_channels = neck.out_channels

    @classmethod
    def from_config(
        cls, backbone: ImageBackboneConfig, neck: ImageNeckConfig, *, load_weights: bool = True
    ) -> ImageEncoder:
        return cls(
            backbone=ImageBackbone.from_config(backbone, load_weights=load_weights),
            neck=SECONDFPN.from_config(neck),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 5 or img.shape[2] != 3:
            raise ValueError(f"ImageEncoder expects images [B, N, 3, H, W], got {tuple(img.shape)}")
        b, n = img.shape[:2]
        feats = self.neck(self.backbone(img.flatten(0, 1)))  # [B*N, C, fH, fW]
        return feats.unflatten(0, (b, n))  # [B, N, C, fH, fW]
