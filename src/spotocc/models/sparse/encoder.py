"""SparseLatentDiffuser: the sparse 3D encoder between the LSS volume and the feature pyramid.

"Diffusion" here is spatial growth of the active set: regular (non-submanifold) stride-1 sparse convs
write outputs at every site of their kernel footprint, so empty voxels near observed ones become
active ("completion"). Four levels, each ending in a context-aggregation block whose output is one
skip level: L0 (C ch, full LSS grid), L1 (2C, /2), L2 (4C, /4), L3 (8C, /8). Norms are BatchNorm1d
over the [N, C] feature matrix of active voxels, as the released model really trained (SyncBN under
distributed training; the released config's GroupNorm never reached this module).

Module names follow spotocc's style; the released names map one to one (see ``RELEASED_NAME_MAP``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from spotocc.models.sparse.conv import (
    SparseConv3d,
    SparseModule,
    SparseSequential,
    SparseTensor,
    SubMConv3d,
)

if TYPE_CHECKING:
    from spotocc.config import ModelConfig

# released (SpotOcc / SparseOcc) module prefix -> spotocc module prefix; everything below a block
# keeps its released name and layout (conv weights [out, kx, ky, kz, in] in both).
RELEASED_NAME_MAP = {
    "resBlock0": "res_block",
    "complBlock1": "completion1",
    "complBlock2": "completion2",
    "complBlock3": "completion3",
    "complBlock4": "completion4",
    "aggreBlock1": "aggregation1",
    "aggreBlock2": "aggregation2",
    "aggreBlock3": "aggregation3",
    "aggreBlock4": "aggregation4",
}

# (kernel, padding) of the three plane-wise submanifold / completion convs
_XY = ((3, 3, 1), (1, 1, 0))
_XZ = ((3, 1, 3), (1, 0, 1))
_YZ = ((1, 3, 3), (0, 1, 1))


def _norm(channels: int, norm: str) -> nn.Module:
    if norm != "batch":
        raise ValueError(f"voxel_encoder.norm must be 'batch' (the released BatchNorm1d), got {norm!r}")
    return nn.BatchNorm1d(channels, eps=1e-5, momentum=0.1)


def _subm(
    c_in: int, c_out: int, plane: tuple[tuple[int, int, int], tuple[int, int, int]], backend: str
) -> SubMConv3d:
    kernel, padding = plane
    return SubMConv3d(c_in, c_out, kernel, padding=padding, bias=False, backend=backend)


class SparseBasicBlock(SparseModule):
    """Residual block: subm 3x3x3 -> BN -> ReLU -> subm 3x3x3 -> BN, + input, ReLU. Active set unchanged.

    ``net`` indices as released: 0 conv, 1 norm, 2 ReLU, 3 conv, 4 norm.
    """

    def __init__(self, channels: int, *, norm: str = "batch", backend: str = "auto") -> None:
        super().__init__()
        self.net = SparseSequential(
            SubMConv3d(channels, channels, 3, padding=1, bias=False, backend=backend),
            _norm(channels, norm),
            nn.ReLU(),
            SubMConv3d(channels, channels, 3, padding=1, bias=False, backend=backend),
            _norm(channels, norm),
        )
        self.relu = nn.ReLU()

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.net(x)
        return out.replace_feature(self.relu(out.features + x.features))


class CompletionLayer(SparseModule):
    """Regular stride-1 sparse conv (dilates the active set by (k-1)/2 per axis) -> BN -> LeakyReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int],
        padding: tuple[int, int, int],
        *,
        norm: str = "batch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.conv = SparseSequential(
            SparseConv3d(in_channels, out_channels, kernel_size, 1, padding, bias=False, backend=backend),
            _norm(out_channels, norm),
            nn.LeakyReLU(0.01),
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.conv(x)


class CompletionBlock(SparseModule):
    """``num_layers`` (3,3,1) completion layers, then (unless ``only_xy``) a (3,1,3) and a (1,3,3) one.

    Active-set growth: only_xy: +-n in x, y; otherwise +-(n+1) in x, y and +-2 in z.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        only_xy: bool,
        num_layers: int,
        norm: str = "batch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CompletionBlock: num_layers must be >= 1, got {num_layers}")
        self.only_xy = only_xy
        self.layers1 = SparseSequential(
            *[
                CompletionLayer(
                    in_channels,
                    out_channels if (only_xy and i == num_layers - 1) else in_channels,
                    *_XY,
                    norm=norm,
                    backend=backend,
                )
                for i in range(num_layers)
            ]
        )
        if not only_xy:
            self.layers2 = SparseSequential(
                CompletionLayer(in_channels, in_channels, *_XZ, norm=norm, backend=backend),
                CompletionLayer(in_channels, out_channels, *_YZ, norm=norm, backend=backend),
            )

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.layers1(x)
        if not self.only_xy:
            x = self.layers2(x)
        return x


class ContextAggregationBlock(SparseModule):
    """Two plane-wise branches summed (no activation after the sum), then a k3 s2 p1 regular conv.

    branch ``conv1``: xy -> BN -> LeakyReLU -> xz -> BN; branch ``conv2``: yz -> BN -> LeakyReLU -> xy -> BN.
    Returns (pooled to the next level, the sum = this level's skip output).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, norm: str = "batch", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.conv1 = SparseSequential(
            _subm(in_channels, in_channels, _XY, backend),
            _norm(in_channels, norm),
            nn.LeakyReLU(0.01),
            _subm(in_channels, out_channels, _XZ, backend),
            _norm(out_channels, norm),
        )
        self.conv2 = SparseSequential(
            _subm(in_channels, in_channels, _YZ, backend),
            _norm(in_channels, norm),
            nn.LeakyReLU(0.01),
            _subm(in_channels, out_channels, _XY, backend),
            _norm(out_channels, norm),
        )
        self.pool = SparseConv3d(out_channels, out_channels, 3, 2, 1, bias=False, backend=backend)

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, SparseTensor]:
        branch_a = self.conv1(x)
        branch_b = self.conv2(x)
        skip = branch_b.replace_feature(branch_b.features + branch_a.features)
        return self.pool(skip), skip


class ContextAggregationBlock2d(SparseModule):
    """BEV-plane block: subm (k,k,1)+bias -> BN -> LeakyReLU -> subm (k,k,1)+bias -> BN.

    ``pooling``: a k3 s2 p1 regular conv follows and (pooled, skip) is returned; otherwise a subm
    1x1x1 conv (spconv's 1x1 weight quirk applies) and only its output is returned.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 5,
        pooling: bool = True,
        norm: str = "batch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        kernel = (kernel_size, kernel_size, 1)
        padding = (kernel_size // 2, kernel_size // 2, 0)
        self.pooling = pooling
        # bias=True as released (spconv's default), although a BatchNorm follows
        self.conv1 = SparseSequential(
            SubMConv3d(in_channels, in_channels, kernel, padding=padding, bias=True, backend=backend),
            _norm(in_channels, norm),
            nn.LeakyReLU(0.01),
            SubMConv3d(in_channels, out_channels, kernel, padding=padding, bias=True, backend=backend),
            _norm(out_channels, norm),
        )
        if pooling:
            self.pool = SparseConv3d(out_channels, out_channels, 3, 2, 1, bias=False, backend=backend)
        else:
            self.pool = SubMConv3d(out_channels, out_channels, 1, bias=False, backend=backend)

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, SparseTensor] | SparseTensor:
        out = self.conv1(x)
        if self.pooling:
            return self.pool(out), out
        return self.pool(out)


class SparseLatentDiffuser(nn.Module):
    """Sparse 3D encoder: dense LSS volume [B, C, X, Y, Z] -> 4 :class:`SparseTensor` skip levels.

    Level channels: C, 2C, 4C, 8C; spatial shapes: the input's, then ``(n - 1) // 2 + 1`` per axis per
    level (nuScenes Z 10/5/3/2, KITTI 16/8/4/2). 42,153,984 parameters at C=128, num_layers=(3,2,2,1).
    """

    def __init__(
        self,
        *,
        in_channels: int = 128,
        num_layers: Sequence[int] = (3, 2, 2, 1),
        norm: str = "batch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(num_layers) != 4:
            raise ValueError(f"SparseLatentDiffuser: num_layers needs 4 entries, got {tuple(num_layers)}")
        c = in_channels
        kw = dict(norm=norm, backend=backend)
        self.in_channels = in_channels
        self.res_block = SparseBasicBlock(c, **kw)
        self.completion1 = CompletionBlock(c, c, only_xy=False, num_layers=num_layers[0], **kw)
        self.aggregation1 = ContextAggregationBlock(c, c, **kw)
        self.completion2 = CompletionBlock(c, c, only_xy=False, num_layers=num_layers[1], **kw)
        self.aggregation2 = ContextAggregationBlock(c, 2 * c, **kw)
        self.completion3 = CompletionBlock(2 * c, 2 * c, only_xy=True, num_layers=num_layers[2], **kw)
        self.aggregation3 = ContextAggregationBlock2d(2 * c, 4 * c, kernel_size=5, pooling=True, **kw)
        self.completion4 = CompletionBlock(4 * c, 4 * c, only_xy=True, num_layers=num_layers[3], **kw)
        self.aggregation4 = ContextAggregationBlock2d(4 * c, 8 * c, kernel_size=5, pooling=False, **kw)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SparseLatentDiffuser:
        """Build from ``cfg.voxel_encoder`` with ``cfg.sparse_backend``."""
        enc = cfg.voxel_encoder
        return cls(
            in_channels=enc.in_channels, num_layers=enc.num_layers, norm=enc.norm, backend=cfg.sparse_backend
        )

    def forward(self, volume: Tensor) -> list[SparseTensor]:
        """volume [B, C, X, Y, Z] (exact zeros = empty voxels) -> [skip1 (L0), skip2, skip3, skip4 (L3)]."""
        if volume.dim() != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(
                f"SparseLatentDiffuser: expected a volume [B, {self.in_channels}, X, Y, Z], "
                f"got {tuple(volume.shape)}"
            )
        x = SparseTensor.from_dense(volume)
        x = self.res_block(x)
        x = self.completion1(x)
        down1, skip1 = self.aggregation1(x)
        down1 = self.completion2(down1)
        down2, skip2 = self.aggregation2(down1)
        down2 = self.completion3(down2)
        down3, skip3 = self.aggregation3(down2)
        down3 = self.completion4(down3)
        skip4 = self.aggregation4(down3)
        return [skip1, skip2, skip3, skip4]


__all__ = [
    "RELEASED_NAME_MAP",
    "CompletionBlock",
    "CompletionLayer",
    "ContextAggregationBlock",
    "ContextAggregationBlock2d",
    "SparseBasicBlock",
    "SparseLatentDiffuser",
]
