"""SparseFeaturePyramid: the neck between the sparse encoder and the mask-classification head.

Not a cascaded FPN (spec 02 section 3). The three coarse levels L1..L3 are projected to
``feat_channels`` per voxel, each voxel receives the mean feature of all L1..L3 voxels sharing its L3
ancestor cell (a parameter-free "top-down" step), then L3 -> L2 and L2 -> L1 are each upsampled one
step by a transposed sparse conv and merged with the level by averaging. The finest level L0 goes
through a dense FPN step with the trilinearly resized L1 result and becomes the mask features.

Returns 4 dense tensors [B, out/feat channels, X, Y, Z], index 0 finest: mask features (dense
everywhere), then L1, L2, L3 with zeros outside their active sets. Parameter names are the released
ones (``input_convs``, ``lateral_convs``, ``output_convs``, ``mask_feature``, ``up_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spotocc.models.sparse.conv import SparseConvTranspose3d, SparseSequential, SparseTensor, SubMConv3d

if TYPE_CHECKING:
    from spotocc.config import ModelConfig


class ConvGNReLU3d(nn.Module):
    """Dense 1x1x1 Conv3d (no bias) -> GroupNorm over the whole volume -> ReLU (mmcv ConvModule names)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.activate = nn.ReLU()
        # mmcv ConvModule's init: kaiming-normal, fan_out, relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.gn(self.conv(x)))


def _batched_keys(x: SparseTensor, shape: Sequence[int], divisor: int = 1) -> Tensor:
    """Linear index into a [B, *shape] grid of each voxel's coordinates floor-divided by ``divisor``."""
    idx = x.indices.long()
    coords = torch.div(idx[:, 1:], divisor, rounding_mode="floor")  # [N, 3]
    return ((idx[:, 0] * shape[0] + coords[:, 0]) * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2]


class SparseFeaturePyramid(nn.Module):
    """Neck: 4 sparse levels [L0 (finest) .. L3] -> 4 dense tensors [B, C, X, Y, Z], index 0 finest.

    ``up_kernel_size`` / ``up_stride`` / ``up_padding`` configure both transposed convs; they must map
    L3's grid onto L2's and L2's onto L1's (nuScenes Z 2 -> 3 -> 5 needs (2,2,3)/(2,2,2)/(0,0,1)).
    ``up_kernel_size_l1`` / ``up_padding_l1`` give the L2 -> L1 conv its own (Occ3D's 50 x 50 x 4
    LSS grid: 1 -> 1 -> 2 in z needs kernel 3, padding 1, then kernel 2, padding 0).
    Parameters: 1,330,176 (nuScenes settings) / 1,035,264 (KITTI defaults).
    """

    num_sparse_levels = 3

    def __init__(
        self,
        *,
        in_channels: Sequence[int] = (128, 256, 512, 1024),
        feat_channels: int = 192,
        out_channels: int = 192,
        num_groups: int = 32,
        up_kernel_size: Sequence[int] = (2, 2, 2),
        up_stride: Sequence[int] = (2, 2, 2),
        up_padding: Sequence[int] = (0, 0, 0),
        up_kernel_size_l1: Sequence[int] | None = None,
        up_padding_l1: Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SparseFeaturePyramid: in_channels needs 4 levels, got {tuple(in_channels)}")
        if feat_channels % num_groups:
            raise ValueError(
                f"SparseFeaturePyramid: feat_channels {feat_channels} is not divisible by "
                f"num_groups {num_groups}"
            )
        self.in_channels = tuple(in_channels)
        self.feat_channels = feat_channels

        def group_norm() -> nn.GroupNorm:
            # on the [N, C] matrix of a sparse level this normalises every voxel on its own
            return nn.GroupNorm(num_groups, feat_channels)

        # L3, L2, L1 (coarse to fine). The released padding=1 is a no-op for submanifold 1x1 convs.
        self.input_convs = nn.ModuleList(
            SparseSequential(
                SubMConv3d(in_channels[level], feat_channels, 1, bias=False, backend=backend), group_norm()
            )
            for level in (3, 2, 1)
        )
        self.lateral_convs = nn.ModuleList(
            [
                SparseSequential(
                    SubMConv3d(in_channels[0], feat_channels, 1, bias=True, backend=backend), group_norm()
                )
            ]
        )
        self.output_convs = nn.ModuleList([ConvGNReLU3d(feat_channels, feat_channels, num_groups)])
        self.mask_feature = nn.Conv3d(feat_channels, out_channels, kernel_size=1)
        # up_sample[0]: L3 -> L2, up_sample[1]: L2 -> L1 (its own kernel / padding if given)
        kernels = (tuple(up_kernel_size), tuple(up_kernel_size_l1 or up_kernel_size))
        paddings = (tuple(up_padding), tuple(up_padding_l1 or up_padding))
        self.up_sample = nn.ModuleList(
            SparseSequential(
                SparseConvTranspose3d(
                    feat_channels,
                    feat_channels,
                    kernel,
                    tuple(up_stride),
                    padding,
                    bias=False,
                    backend=backend,
                ),
                group_norm(),
            )
            for kernel, padding in zip(kernels, paddings)
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SparseFeaturePyramid:
        """Build from ``cfg.voxel_neck`` with ``cfg.sparse_backend``."""
        neck = cfg.voxel_neck
        return cls(
            in_channels=neck.in_channels,
            feat_channels=neck.feat_channels,
            out_channels=neck.out_channels,
            num_groups=neck.num_groups,
            up_kernel_size=neck.up_kernel_size,
            up_stride=neck.up_stride,
            up_padding=neck.up_padding,
            up_kernel_size_l1=neck.up_kernel_size_l1,
            up_padding_l1=neck.up_padding_l1,
            backend=cfg.sparse_backend,
        )

    def forward(self, levels: Sequence[SparseTensor]) -> list[Tensor]:
        """levels [L0, L1, L2, L3] (encoder skips) -> [mask features, D1, D2, D3] dense, finest first."""
        if len(levels) != 4:
            raise ValueError(f"SparseFeaturePyramid: expected 4 sparse levels, got {len(levels)}")
        for i, (level, channels) in enumerate(zip(levels, self.in_channels)):
            if level.features.shape[1] != channels:
                raise ValueError(
                    f"SparseFeaturePyramid: level {i} has {level.features.shape[1]} channels, "
                    f"expected {channels}"
                )
        skip0, skip1, skip2, skip3 = levels
        proj3 = self.input_convs[0](skip3)
        proj2 = self.input_convs[1](skip2)
        proj1 = self.input_convs[2](skip1)
        proj1, proj2, proj3 = self._add_coarse_cell_mean(proj1, proj2, proj3)

        dense3 = proj3.dense()
        up2 = self.up_sample[0](proj3)
        dense2 = self._merge_mean_dense(proj2, up2, "L3 -> L2")
        up1 = self.up_sample[1](proj2)  # from L2 before its merge, as released
        dense1 = self._merge_mean_dense(proj1, up1, "L2 -> L1")

        lateral = self.lateral_convs[0](skip0).dense()  # [B, C, X0, Y0, Z0], zeros off the active set
        y = lateral + F.interpolate(dense1, size=lateral.shape[-3:], mode="trilinear", align_corners=False)
        mask_features = self.mask_feature(self.output_convs[0](y))
        return [mask_features, dense1, dense2, dense3]

    @staticmethod
    def _add_coarse_cell_mean(
        p1: SparseTensor, p2: SparseTensor, p3: SparseTensor
    ) -> tuple[SparseTensor, SparseTensor, SparseTensor]:
        """Add to every L1..L3 voxel the mean feature of all L1..L3 voxels in its L3 cell.

        L1 voxels map to their cell by floor division of (x, y, z) by 4, L2 voxels by 2; each voxel
        counts once, so finer levels dominate the mean.
        """
        cell_shape = p3.spatial_shape
        for level, (p, divisor) in enumerate(((p1, 4), (p2, 2)), start=1):
            if any((n - 1) // divisor >= m for n, m in zip(p.spatial_shape, cell_shape)):
                raise ValueError(
                    f"SparseFeaturePyramid: L{level} grid {p.spatial_shape} does not nest in the L3 grid "
                    f"{cell_shape} (expected the encoder's stride-2 chain)"
                )
        keys = [
            _batched_keys(p1, cell_shape, 4),
            _batched_keys(p2, cell_shape, 2),
            _batched_keys(p3, cell_shape),
        ]
        features = [p1.features, p2.features, p3.features]
        num_cells = p3.batch_size * math.prod(cell_shape)
        channels = p3.features.shape[1]
        sums = p3.features.new_zeros(num_cells, channels)  # [B * cells, C]
        counts = p3.features.new_zeros(num_cells)
        for key, feat in zip(keys, features):
            sums = sums.index_add(0, key, feat)
            counts = counts.index_add(0, key, torch.ones_like(key, dtype=counts.dtype))
        means = sums / counts.clamp(min=1).unsqueeze(1)
        return tuple(  # type: ignore[return-value]
            p.replace_feature(p.features + means[key]) for p, key in zip((p1, p2, p3), keys)
        )

    @staticmethod
    def _merge_mean_dense(level: SparseTensor, upsampled: SparseTensor, step: str) -> Tensor:
        """Dense [B, C, X, Y, Z] of the two sets' union; voxels present in both get the mean."""
        if upsampled.spatial_shape != level.spatial_shape:
            raise ValueError(
                f"SparseFeaturePyramid: the {step} transposed conv gives grid {upsampled.spatial_shape}, "
                f"but the level's grid is {level.spatial_shape}; set voxel_neck.up_kernel_size / up_stride / "
                "up_padding so they match (nuScenes Z 10: (2,2,3) / (2,2,2) / (0,0,1))"
            )
        shape = level.spatial_shape
        num_voxels = math.prod(shape)
        batch, channels = level.batch_size, level.features.shape[1]
        sums = level.features.new_zeros(batch * num_voxels, channels)  # [B * XYZ, C]
        counts = level.features.new_zeros(batch * num_voxels)
        for part in (level, upsampled):
            key = _batched_keys(part, shape)
            sums = sums.index_add(0, key, part.features)
            counts = counts.index_add(0, key, torch.ones_like(key, dtype=counts.dtype))
        merged = sums / counts.clamp(min=1).unsqueeze(1)
        # [B * XYZ, C] -> [B, C, X, Y, Z]
        return (
            merged.view(batch, num_voxels, channels)
            .transpose(1, 2)
            .reshape(batch, channels, *shape)
            .contiguous()
        )


__all__ = ["ConvGNReLU3d", "SparseFeaturePyramid"]
