"""LSS view transformer with the camera-aware depth net (BEVDepth style), as released in SPOT-Occ.

Image features [B, N, C, fH, fW] -> depth distribution over D bins x context features, lifted to a
frustum of 3D points, sum-pooled into the LSS voxel grid [B, C_ctx, X, Y, Z] (spec 01 section 3).

Module and buffer names follow the released checkpoint (``img_view_transformer.*``): ``dx``, ``bx``,
``nx``, ``frustum`` and ``depth_net.{reduce_conv, context_conv, bn, depth_mlp, depth_se, context_mlp,
context_se, depth_conv.{0..5}}``, so a released state dict loads one-to-one after the prefix rename.

Batch 1 x 1 camera in training: the camera-vector BatchNorm1d and ASPP's pooled-branch BatchNorm see one
value per channel, where PyTorch's BatchNorm raises (the released runs relied on SyncBN over 8 GPUs).
:class:`SingleSampleSafeBatchNorm1d`/``2d`` then normalise with the running statistics and update only
the running mean; with more than one value per channel they are plain BatchNorms.

About 780 lines in one module: the frustum, its geometry, the depth net, the pooling and the depth
loss are the parts of the one released view transformer and are used only by it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops

from spotocc.config import GridConfig, ViewTransformerConfig
from spotocc.models.backbones import checkpoint_module
from spotocc.models.deform_conv import deform_conv2d_by_sampling

# --------------------------------------------------------------------------------------------------
# Small building blocks of the depth net


class _SingleSampleSafeBatchNorm:
    """BatchNorm that accepts one value per channel in training (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and x.numel() == x.shape[1]):
            return super().forward(x)  # type: ignore[misc]
        # One value per channel: normalise like eval mode, then update the running mean (the variance of a
        # single value is undefined, so running_var stays as it is).
        # (clones: autograd keeps the statistics for backward, and running_mean is updated in place below)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(x.detach().reshape(-1).to(self.running_mean.dtype), factor)
        return out


class SingleSampleSafeBatchNorm1d(_SingleSampleSafeBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also trains with a single sample."""


class SingleSampleSafeBatchNorm2d(_SingleSampleSafeBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains with a single value per channel ([1, C, 1, 1])."""


class Mlp(nn.Module):
    """Linear -> ReLU -> Linear (dropout 0 in the released model, so omitted)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CameraSE(nn.Module):
    """Channel gating of image features by a camera embedding: x * sigmoid(conv(relu(conv(embedding))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1, bias=True)  # no channel reduction (released)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """x [B*N, C, fH, fW], embedding [B*N, C, 1, 1] -> gated x."""
        return x * torch.sigmoid(self.conv_expand(self.act1(self.conv_reduce(embedding))))


class BasicBlock(nn.Module):
    """ResNet basic block (mmdet ``BasicBlock``): two 3x3 conv-BN with identity shortcut and ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ASPPBranch(nn.Module):
    """Atrous conv (no bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 and 3x3 (dilations 6, 12, 18) branches plus a global-pool
    branch, concatenated -> 1x1 conv -> BN -> ReLU -> Dropout(0.5). Convs Kaiming-normal initialised."""

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.aspp1 = ASPPBranch(in_channels, mid_channels, 1, dilation=1)
        self.aspp2 = ASPPBranch(in_channels, mid_channels, 3, dilation=6)
        self.aspp3 = ASPPBranch(in_channels, mid_channels, 3, dilation=12)
        self.aspp4 = ASPPBranch(in_channels, mid_channels, 3, dilation=18)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            SingleSampleSafeBatchNorm2d(mid_channels),  # one value per channel when B*N == 1
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(5 * mid_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.global_avg_pool(x)  # [B*N, M, 1, 1]
        # bilinear upsampling (align_corners) of a 1x1 map is a broadcast
        pooled = pooled.expand(-1, -1, x.shape[2], x.shape[3])
        out = torch.cat([self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled], dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(out))))


class DeformConv2d(nn.Module):
    """Deformable convolution v1 (mmcv ``DeformConv2dPack``): grouped 3x3 main weight, no bias, offsets
    from a zero-initialised 3x3 conv (so it starts as a plain grouped conv). Offsets are laid out
    (dy, dx) per kernel position, row-major, as in mmcv and ``torchvision.ops.deform_conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, groups: int = 4) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: channels {in_channels}/{out_channels} not divisible by {groups}")
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")  # mmcv DeformConv2d.reset_parameters
        self.conv_offset = nn.Conv2d(
            in_channels, 2 * kernel_size * kernel_size, kernel_size, padding=self.padding
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)  # [B*N, 2*k*k, fH, fW]
        # fp32 always, as torchvision's autocast rule on CUDA (its CPU kernel has no bf16/fp16 version)
        with torch.autocast(x.device.type, enabled=False):
            x, offset, weight = x.float(), offset.float(), self.weight.float()
            if x.device.type == "cpu":  # the same function; torchvision's CPU backward is ~15x slower
                return deform_conv2d_by_sampling(x, offset, weight, padding=self.padding)
            # [B*N, out, fH, fW]
            return torchvision.ops.deform_conv2d(x, offset, weight, padding=self.padding)


class DepthNet(nn.Module):
    """Camera-aware depth net: image features + camera vector -> [depth logits (D), context (Ct)]."""

    def __init__(
        self,
        *,
        in_channels: int,
        context_channels: int,
        depth_channels: int,
        camera_params: int,
        dcn_groups: int = 4,
        aspp_mid_channels: int | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        c = in_channels
        m = aspp_mid_channels or c
        self.activation_checkpointing = activation_checkpointing
        self.reduce_conv = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=True), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.context_conv = nn.Conv2d(c, context_channels, 1)
        self.bn = SingleSampleSafeBatchNorm1d(camera_params)
        self.depth_mlp = Mlp(camera_params, c, c)
        self.depth_se = CameraSE(c)
        self.context_mlp = Mlp(camera_params, c, c)
        self.context_se = CameraSE(c)
        self.depth_conv = nn.Sequential(
            BasicBlock(c),
            BasicBlock(c),
            BasicBlock(c),
            ASPP(c, m),
            DeformConv2d(m, m, groups=dcn_groups),  # no BN / activation after it (released)
            nn.Conv2d(m, depth_channels, 1),
        )

    def forward(self, x: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """x [B*N, C, fH, fW], camera [B*N, camera_params] -> [B*N, D + Ct, fH, fW]."""
        camera = self.bn(camera)
        x = self.reduce_conv(x)
        context = self.context_se(x, self.context_mlp(camera)[..., None, None])
        context = self.context_conv(context)  # [B*N, Ct, fH, fW]
        depth = self.depth_se(x, self.depth_mlp(camera)[..., None, None])
        for layer in self.depth_conv:
            if self.activation_checkpointing and torch.is_grad_enabled() and depth.requires_grad:
                # not in the released model, so numerically neutral: BN statistics updated once
                depth = checkpoint_module(layer, depth, bn_update_once=True)
            else:
                depth = layer(depth)
        return torch.cat([depth, context], dim=1)


# --------------------------------------------------------------------------------------------------
# Geometry


def camera_parameter_vector(
    rots: torch.Tensor,
    trans: torch.Tensor,
    intrins: torch.Tensor,
    post_rots: torch.Tensor,
    post_trans: torch.Tensor,
    bda: torch.Tensor,
    *,
    layout: int,
) -> torch.Tensor:
    """The released depth-net camera input [B, N, 27] (nuScenes layout) or [B, N, 33] (KITTI layout).

    27: fx, fy, cx, cy, post_rot (00, 01), post_tran 0, post_rot (10, 11), post_tran 1,
    bda (00, 01, 10, 11, 22), then [R | t] row-major. 33: the intrinsic part is K (00, 11, 02, 12) and the
    4th column (03, 13, 23) of the 4x4 projection, and the bda translation (03, 13, 23) follows the 5 bda
    entries.
    """
    if layout not in (27, 33):
        raise ValueError(f"view_transformer.camera_params must be 27 or 33, got {layout}")
    n = rots.shape[1]
    bda = bda[:, None].expand(-1, n, -1, -1)  # [B, N, 4, 4]
    k = intrins
    if layout == 27:
        intrinsic = [k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]]
    else:
        intrinsic = [
            k[..., 0, 0],
            k[..., 1, 1],
            k[..., 0, 2],
            k[..., 1, 2],
            k[..., 0, 3],
            k[..., 1, 3],
            k[..., 2, 3],
        ]
    image_aug = [
        post_rots[..., 0, 0],
        post_rots[..., 0, 1],
        post_trans[..., 0],
        post_rots[..., 1, 0],
        post_rots[..., 1, 1],
        post_trans[..., 1],
    ]
    bev_aug = [bda[..., 0, 0], bda[..., 0, 1], bda[..., 1, 0], bda[..., 1, 1], bda[..., 2, 2]]
    if layout == 33:
        bev_aug += [bda[..., 0, 3], bda[..., 1, 3], bda[..., 2, 3]]
    extrinsic = torch.cat([rots, trans[..., None]], dim=-1).flatten(-2)  # [B, N, 12]
    return torch.cat([torch.stack(intrinsic + image_aug + bev_aug, dim=-1), extrinsic], dim=-1)


def make_frustum(
    input_size: tuple[int, int], downsample: int, depth_bound: tuple[float, float, float]
) -> torch.Tensor:
    """Frustum [D, fH, fW, 3] of (u, v, d): pixel positions linspace(0, W - 1, fW) x linspace(0, H - 1, fH)
    (not cell centres, as released) at depths arange(*depth_bound)."""
    h, w = input_size
    fh, fw = h // downsample, w // downsample
    depths = torch.arange(*depth_bound, dtype=torch.float32)
    d = depths.numel()
    us = torch.linspace(0, w - 1, fw, dtype=torch.float32).view(1, 1, fw).expand(d, fh, fw)
    vs = torch.linspace(0, h - 1, fh, dtype=torch.float32).view(1, fh, 1).expand(d, fh, fw)
    ds = depths.view(d, 1, 1).expand(d, fh, fw)
    return torch.stack([us, vs, ds], dim=-1)  # [D, fH, fW, 3]


def frustum_to_grid(
    frustum: torch.Tensor,
    rots: torch.Tensor,
    trans: torch.Tensor,
    intrins: torch.Tensor,
    post_rots: torch.Tensor,
    post_trans: torch.Tensor,
    bda: torch.Tensor,
) -> torch.Tensor:
    """Frustum points (augmented pixel u', v', depth d) -> grid-frame points [B, N, D, fH, fW, 3] (fp32).

    Undo the image augmentation, back-project (u d, v d, d), subtract the projection's 4th column,
    apply K^-1, camera -> LiDAR (R, t), then the 4x4 BEV augmentation ``bda``.
    """
    with torch.autocast(device_type=frustum.device.type, enabled=False):
        b, n = trans.shape[:2]
        rots, trans, intrins, post_rots, post_trans, bda = (
            t.float() for t in (rots, trans, intrins, post_rots, post_trans, bda)
        )
        points = frustum - post_trans.view(b, n, 1, 1, 1, 3)  # [B, N, D, fH, fW, 3]
        points = torch.linalg.inv_ex(post_rots).inverse.view(b, n, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1))
        points = torch.cat([points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]], dim=-2)
        points = points - intrins[..., :3, 3].view(b, n, 1, 1, 1, 3, 1)  # KITTI P2 offset; 0 for nuScenes
        combine = rots.matmul(torch.linalg.inv_ex(intrins[..., :3, :3]).inverse)  # [B, N, 3, 3]
        points = combine.view(b, n, 1, 1, 1, 3, 3).matmul(points).squeeze(-1) + trans.view(b, n, 1, 1, 1, 3)
        points = bda[:, :3, :3].view(b, 1, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
        return points + bda[:, :3, 3].view(b, 1, 1, 1, 1, 3)


def image_aug_transform(
    *,
    resize: float,
    crop: tuple[float, float],
    flip: bool,
    rotate: float,
    input_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``post_rot`` [3, 3] and ``post_tran`` [3] of the released image augmentation (spec 01 section 5.2).

    Operation order: resize by ``resize``, crop at ``crop = (crop_w, crop_h)`` (top-left corner), horizontal
    flip (u -> W - u), rotate by ``rotate`` degrees counter-clockwise about the centre of the
    ``input_size = (H, W)`` result. Maps an original pixel x to the network pixel
    post_rot[:2, :2] x + post_tran[:2].
    """
    h, w = input_size
    a = torch.eye(2, dtype=torch.float64) * resize
    t = -torch.tensor(crop, dtype=torch.float64)
    if flip:
        f = torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        a, t = f @ a, f @ t + torch.tensor([w, 0.0], dtype=torch.float64)
    theta = math.radians(rotate)
    r = torch.tensor(
        [[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]], dtype=torch.float64
    )
    centre = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    a, t = r @ a, r @ t + centre - r @ centre
    post_rot = torch.eye(3, dtype=torch.float64)
    post_rot[:2, :2] = a
    post_tran = torch.zeros(3, dtype=torch.float64)
    post_tran[:2] = t
    return post_rot.float(), post_tran.float()


# --------------------------------------------------------------------------------------------------
# Splat


def voxel_indices(
    points: torch.Tensor, lower: torch.Tensor, voxel_size: torch.Tensor, grid_size: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel of every point [B, N, D, fH, fW, 3] -> (flat index, inside), both [B, N, D, fH, fW].

    i = trunc((p - lower) / voxel_size) per axis (truncation toward zero as released, so points less than
    one voxel below the lower bound land in voxel 0); flat index ((b X + ix) Y + iy) Z + iz, set to 0
    where ``inside`` is False (any i < 0 or i >= grid size: the point is dropped).
    """
    x, y, z = grid_size
    b = points.shape[0]
    ijk = ((points - lower) / voxel_size).long()  # [B, N, D, fH, fW, 3]; .long() truncates toward zero
    size = torch.tensor(grid_size, device=points.device)
    inside = ((ijk >= 0) & (ijk < size)).all(dim=-1)
    batch = torch.arange(b, device=points.device).view(b, *([1] * (points.dim() - 2)))
    flat = ((batch * x + ijk[..., 0]) * y + ijk[..., 1]) * z + ijk[..., 2]
    return torch.where(inside, flat, torch.zeros_like(flat)), inside


def lift_and_pool(
    depth_prob: torch.Tensor,
    context: torch.Tensor,
    index: torch.Tensor,
    inside: torch.Tensor,
    grid_size: tuple[int, int, int],
    *,
    chunk_elements: int = 1 << 23,
    mean: bool = False,
) -> torch.Tensor:
    """Sum of depth_prob x context over the points of every voxel -> [B, C, X, Y, Z] (fp32).

    ``mean``: divide each voxel's sum by the number of frustum points that land in it (a function of the
    geometry only, not of the predicted depth), so a far voxel crossed by one ray and a near voxel
    crossed by hundreds carry features of the same scale (not released: BEVPoolv2 sums).

    depth_prob [B, N, D, fH, fW], context [B, N, C, fH, fW], index / inside [B, N, D, fH, fW] from
    :func:`voxel_indices`. The outer product is formed a few depth bins at a time (about
    ``chunk_elements`` values per chunk) and added straight into the volume with ``index_add_``, so the
    lifted tensor [B, N, D, fH, fW, C] never exists as a whole, in forward or backward. Dropped points get
    depth 0 (they add exact zeros to voxel 0 and receive no gradient), so empty voxels are exactly zero.

    The result is a view of a [B, X, Y, Z, C] buffer, i.e. in ``torch.channels_last_3d`` memory format
    (per-voxel feature vectors are contiguous, which is what sparsification gathers); call
    ``.contiguous()`` where a [B, C, X, Y, Z]-contiguous tensor is needed.
    """
    b, n, d, fh, fw = depth_prob.shape
    c = context.shape[2]
    x, y, z = grid_size
    with torch.autocast(device_type=depth_prob.device.type, enabled=False):
        depth_prob = torch.where(inside, depth_prob.float(), torch.zeros((), device=depth_prob.device))
        context = context.float().permute(0, 1, 3, 4, 2).unsqueeze(2)  # [B, N, 1, fH, fW, C]
        volume = depth_prob.new_zeros(b * x * y * z, c)
        step = max(1, chunk_elements // max(1, b * n * fh * fw * c))
        for d0 in range(0, d, step):
            lifted = depth_prob[:, :, d0 : d0 + step, :, :, None] * context  # [B, N, dk, fH, fW, C]
            volume.index_add_(0, index[:, :, d0 : d0 + step].reshape(-1), lifted.reshape(-1, c))
        if mean:
            counts = torch.zeros(b * x * y * z, device=volume.device)  # [B*X*Y*Z] frustum points per voxel
            counts.index_add_(0, index.reshape(-1), inside.reshape(-1).float())
            volume = volume / counts.clamp(min=1.0)[:, None]
        return volume.view(b, x, y, z, c).permute(0, 4, 1, 2, 3)  # [B, C, X, Y, Z], channels_last_3d


# --------------------------------------------------------------------------------------------------
# Depth supervision


NO_DEPTH = 1e5  # depth of a feature cell without a target: beyond every bin, hence invalid


def nearest_patch_depth(gt_depth: torch.Tensor, downsample: int) -> torch.Tensor:
    """Per feature cell, the nearest LiDAR depth of its ``downsample`` x ``downsample`` patch.

    gt_depth [B, N, H, W] (0 = no point) -> [B*N*fH*fW] fp32 in (camera, row, column) order, 1e5 where
    the patch holds no point.
    """
    b, n, h, w = gt_depth.shape
    if h % downsample or w % downsample:
        raise ValueError(f"gt_depth size {h}x{w} is not a multiple of the feature stride {downsample}")
    patches = gt_depth.float().reshape(b * n, h // downsample, downsample, w // downsample, downsample)
    patches = patches.permute(0, 1, 3, 2, 4).flatten(3)  # [B*N, fH, fW, ds*ds]
    return torch.where(patches == 0.0, torch.full_like(patches, NO_DEPTH), patches).amin(dim=-1).reshape(-1)


def depth_to_bins(
    depth: torch.Tensor, depth_bound: tuple[float, float, float], *, fix_bin_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric depths [M] -> (bins [M] int64, valid [M] bool).

    idx = (d - (min - step / 2)) / step; released (off by one bin): bin = trunc(idx) - 1, valid for
    1 <= idx < D + 1; ``fix_bin_offset``: bin = trunc(idx), 0 <= idx < D.
    """
    dmin, dmax, step = depth_bound
    num_bins = len(torch.arange(dmin, dmax, step))
    idx = (depth - (dmin - step / 2)) / step
    if fix_bin_offset:
        valid = (idx >= 0) & (idx < num_bins)
        bins = idx.long()
    else:
        valid = (idx >= 1) & (idx < num_bins + 1)
        bins = idx.long() - 1
    return torch.where(valid, bins, torch.zeros_like(bins)), valid


def depth_targets(
    gt_depth: torch.Tensor,
    *,
    downsample: int,
    depth_bound: tuple[float, float, float],
    fix_bin_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature cell: the nearest LiDAR depth of its ``downsample`` x ``downsample`` patch as a bin.

    gt_depth [B, N, H, W] (0 = no point) -> (bins [B*N*fH*fW] int64, valid [B*N*fH*fW] bool), rows in
    (camera, row, column) order; binning as in :func:`depth_to_bins`.
    """
    nearest = nearest_patch_depth(gt_depth, downsample)
    return depth_to_bins(nearest, depth_bound, fix_bin_offset=fix_bin_offset)


def first_labelled_hit(
    points: torch.Tensor,
    gt_occ: torch.Tensor,
    point_cloud_range: tuple[float, float, float, float, float, float],
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature cell, the first frustum point along its ray that lies in a labelled occupied voxel.

    points [B, N, D, fH, fW, 3] (grid frame, nearest bin first), gt_occ [B, X, Y, Z] (0 empty,
    ``ignore_index`` unknown) -> (depth-bin index [B, N, fH, fW] int64, label [B, N, fH, fW] int64). The
    label is 0 (and the index meaningless) where the ray leaves the grid without a hit or meets an
    unknown voxel first.
    """
    size = gt_occ.shape[1:]
    lower = points.new_tensor(point_cloud_range[:3])
    voxel = (points.new_tensor(point_cloud_range[3:]) - lower) / points.new_tensor(size)
    index, inside = voxel_indices(points, lower, voxel, tuple(int(s) for s in size))  # [B, N, D, fH, fW]
    labels = torch.where(inside, gt_occ.reshape(-1).long()[index], torch.zeros_like(index))
    nonempty = labels != 0
    first = nonempty.int().argmax(dim=2, keepdim=True)  # [B, N, 1, fH, fW]: first non-empty bin (0 if none)
    hit_label = labels.gather(2, first).squeeze(2)  # [B, N, fH, fW]
    hit = nonempty.any(dim=2) & (hit_label != ignore_index)
    return first.squeeze(2), torch.where(hit, hit_label, torch.zeros_like(hit_label))


def occupancy_depth(
    points: torch.Tensor,
    bin_depths: torch.Tensor,
    gt_occ: torch.Tensor,
    point_cloud_range: tuple[float, float, float, float, float, float],
    ignore_index: int = 255,
) -> torch.Tensor:
    """Per feature cell, the depth of the first frustum point that lies in a labelled occupied voxel.

    points [B, N, D, fH, fW, 3] (grid frame, nearest bin first), bin_depths [D], gt_occ [B, X, Y, Z]
    (0 empty, ``ignore_index`` unknown) -> [B*N*fH*fW] fp32 in (camera, row, column) order;
    :data:`NO_DEPTH` where the ray leaves the grid without a hit or meets an unknown voxel first
    (:func:`first_labelled_hit`).
    """
    first, label = first_labelled_hit(points, gt_occ, point_cloud_range, ignore_index)
    depth = bin_depths.float()[first]  # [B, N, fH, fW]
    return torch.where(label != 0, depth, torch.full_like(depth, NO_DEPTH)).reshape(-1)


def mix_teacher_depth(
    depth_prob: torch.Tensor, bins: torch.Tensor, valid: torch.Tensor, weight: float
) -> torch.Tensor:
    """Teacher forcing of the lift: ``weight`` x one-hot target + (1 - ``weight``) x prediction.

    depth_prob [B*N, D, fH, fW], bins / valid [B*N*fH*fW] in (camera, row, column) order (as from
    :meth:`ViewTransformer.depth_target_bins`) -> [B*N, D, fH, fW]; cells without a valid target keep the
    prediction. Gradients reach the depth net through the (1 - ``weight``) share.
    """
    if weight <= 0.0:
        return depth_prob
    bn, d, fh, fw = depth_prob.shape
    onehot = F.one_hot(bins.reshape(bn, fh, fw), d).permute(0, 3, 1, 2)  # [B*N, D, fH, fW]
    onehot = onehot.to(depth_prob.dtype)
    mixed = weight * onehot + (1.0 - weight) * depth_prob
    return torch.where(valid.reshape(bn, 1, fh, fw), mixed, depth_prob)


def depth_bce_loss(
    depth_prob: torch.Tensor,
    bins: torch.Tensor,
    valid: torch.Tensor,
    cell_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE between softmax probabilities [B*N, D, fH, fW] and one-hot targets, summed over bins and
    averaged over valid cells (fp32, as released); with ``cell_weight`` [B*N*fH*fW], the weighted
    average over valid cells instead (see :func:`depth_distance_weights`)."""
    num_bins = depth_prob.shape[1]
    with torch.autocast(device_type=depth_prob.device.type, enabled=False):
        probs = depth_prob.float().permute(0, 2, 3, 1).reshape(-1, num_bins)  # [B*N*fH*fW, D]
        onehot = F.one_hot(bins, num_bins).float()
        bce = F.binary_cross_entropy(probs, onehot, reduction="none")
        # masking instead of boolean indexing: no host-device synchronisation
        bce = torch.where(valid[:, None], bce, torch.zeros_like(bce))
        if cell_weight is None:
            return bce.sum() / valid.sum().clamp(min=1)
        weight = cell_weight.float() * valid  # [B*N*fH*fW], 0 on invalid cells
        return (bce.sum(dim=1) * weight).sum() / weight.sum().clamp(min=1)


# Cap of the depth-distance weights: cells at 4x the reference distance and beyond weigh the same.
DEPTH_DISTANCE_MAX_WEIGHT = 4.0


def depth_distance_weights(bins: torch.Tensor, bin_depths: torch.Tensor, reference: float) -> torch.Tensor:
    """Per-cell depth-loss weights [M]: the target bin's depth over ``reference`` metres, clamped to
    [1, DEPTH_DISTANCE_MAX_WEIGHT]. Cells up to ``reference`` weigh 1; farther ones, rarer and harder,
    weigh more (``view_transformer.depth_distance_weighting``). bins [M] int64, bin_depths [D] metres."""
    return (bin_depths[bins] / reference).clamp(1.0, DEPTH_DISTANCE_MAX_WEIGHT)


# --------------------------------------------------------------------------------------------------
# The module


class ViewTransformer(nn.Module):
    """Camera-aware LSS: image features -> (volume [B, Ct, X, Y, Z], depth_prob [B*N, D, fH, fW]).

    Buffers ``dx`` (voxel size), ``bx`` (first voxel centre), ``nx`` (grid size, float) and ``frustum``
    [D, fH, fW, 3] are persistent, as in the released checkpoint.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        context_channels: int,
        camera_params: int,
        downsample: int,
        depth_bound: tuple[float, float, float],
        point_cloud_range: tuple[float, float, float, float, float, float],
        grid_size: tuple[int, int, int],
        input_size: tuple[int, int],
        depth_loss_weight: float = 1.0,
        fix_depth_bin_offset: bool = False,
        dcn_groups: int = 4,
        aspp_mid_channels: int | None = None,
        activation_checkpointing: bool = False,
        pool_chunk_elements: int = 1 << 23,
        pool: str = "sum",
        depth_from_occupancy: bool = False,
        semantic_loss_weight: float = 0.0,
        num_classes: int = 0,
        depth_distance_weighting: float = 0.0,
    ) -> None:
        super().__init__()
        if camera_params not in (27, 33):
            raise ValueError(f"view_transformer.camera_params must be 27 or 33, got {camera_params}")
        h, w = input_size
        if h % downsample or w % downsample:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of view_transformer.downsample={downsample}"
            )
        if pool not in ("sum", "mean"):
            raise ValueError(f"view_transformer.pool must be 'sum' or 'mean', got {pool!r}")
        if semantic_loss_weight < 0 or (semantic_loss_weight > 0 and num_classes < 2):
            raise ValueError(
                "view_transformer.semantic_loss_weight must be >= 0 and needs the head's num_classes "
                f"(got weight {semantic_loss_weight}, num_classes {num_classes})"
            )
        if depth_distance_weighting < 0:
            raise ValueError(
                "view_transformer.depth_distance_weighting must be >= 0 (metres), "
                f"got {depth_distance_weighting}"
            )
        self.pool = pool
        self.depth_from_occupancy = depth_from_occupancy
        self.depth_distance_weighting = float(depth_distance_weighting)
        self.semantic_loss_weight = semantic_loss_weight
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.camera_params = camera_params
        self.downsample = downsample
        self.depth_bound = tuple(depth_bound)
        self.grid_size = tuple(int(s) for s in grid_size)
        self.input_size = (h, w)
        self.context_channels = context_channels
        self.depth_loss_weight = depth_loss_weight
        self.fix_depth_bin_offset = fix_depth_bin_offset
        self.pool_chunk_elements = pool_chunk_elements
        lower, upper = point_cloud_range[:3], point_cloud_range[3:]
        voxel = [(upper[i] - lower[i]) / self.grid_size[i] for i in range(3)]
        self.register_buffer("dx", torch.tensor(voxel, dtype=torch.float32))
        self.register_buffer(
            "bx", torch.tensor([lower[i] + voxel[i] / 2 for i in range(3)], dtype=torch.float32)
        )
        self.register_buffer("nx", torch.tensor(self.grid_size, dtype=torch.float32))
        self.register_buffer("frustum", make_frustum(self.input_size, downsample, self.depth_bound))
        self.num_bins = self.frustum.shape[0]
        self.depth_net = DepthNet(
            in_channels=in_channels,
            context_channels=context_channels,
            depth_channels=self.num_bins,
            camera_params=camera_params,
            dcn_groups=dcn_groups,
            aspp_mid_channels=aspp_mid_channels,
            activation_checkpointing=activation_checkpointing,
        )
        # not released (no parameters unless switched on): context features -> class logits per cell
        self.context_classifier = (
            nn.Conv2d(context_channels, num_classes, kernel_size=1) if semantic_loss_weight > 0 else None
        )

    @classmethod
    def from_config(
        cls, cfg: ViewTransformerConfig, grid: GridConfig, input_size: tuple[int, int], num_classes: int = 0
    ) -> ViewTransformer:
        """``input_size`` = the network input (H, W) (``DataConfig.input_size``); the grid is the LSS grid;
        ``num_classes`` (the head's) sizes the context classifier of ``cfg.semantic_loss_weight``."""
        return cls(
            in_channels=cfg.in_channels,
            context_channels=cfg.context_channels,
            camera_params=cfg.camera_params,
            downsample=cfg.downsample,
            depth_bound=cfg.depth_bound,
            point_cloud_range=grid.point_cloud_range,
            grid_size=grid.lss_size,
            input_size=input_size,
            depth_loss_weight=cfg.depth_loss_weight,
            fix_depth_bin_offset=cfg.fix_depth_bin_offset,
            dcn_groups=cfg.deform_groups_conv,
            aspp_mid_channels=cfg.aspp_mid_channels,
            activation_checkpointing=cfg.activation_checkpointing,
            pool_chunk_elements=cfg.pool_chunk_elements,
            pool=cfg.pool,
            depth_from_occupancy=cfg.depth_from_occupancy,
            semantic_loss_weight=cfg.semantic_loss_weight,
            num_classes=num_classes,
            depth_distance_weighting=cfg.depth_distance_weighting,
        )

    def forward(
        self,
        feats: torch.Tensor,
        rots: torch.Tensor,
        trans: torch.Tensor,
        intrins: torch.Tensor,
        post_rots: torch.Tensor,
        post_trans: torch.Tensor,
        bda: torch.Tensor,
        *,
        with_context: bool = False,
        teacher: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """feats [B, N, C, fH, fW] + camera tensors (batch contract) -> (volume [B, Ct, X, Y, Z] fp32 with
        exact zeros at empty voxels, channels_last_3d memory format; depth_prob [B*N, D, fH, fW]), and with
        ``with_context`` also the context features [B*N, Ct, fH, fW] that were lifted.

        ``teacher`` = (target bins [B*N*fH*fW], valid [B*N*fH*fW], weight): the lift uses
        :func:`mix_teacher_depth` of the predicted depth instead of the depth itself (training only, see
        ``train.depth_teacher_forcing``); the returned depth_prob is still the prediction."""
        b, n, c, fh, fw = feats.shape
        self._check_inputs(feats, rots, trans, intrins, post_rots, post_trans, bda)
        camera = camera_parameter_vector(
            rots, trans, intrins, post_rots, post_trans, bda, layout=self.camera_params
        )  # [B, N, Cc]
        out = self.depth_net(feats.flatten(0, 1), camera.flatten(0, 1).to(feats.dtype))  # [B*N, D+Ct, fH, fW]
        depth_prob = out[:, : self.num_bins].softmax(dim=1)  # [B*N, D, fH, fW]
        context = out[:, self.num_bins :]  # [B*N, Ct, fH, fW]
        points = self.geometry(rots, trans, intrins, post_rots, post_trans, bda)  # [B, N, D, fH, fW, 3]
        index, inside = voxel_indices(points, self.bx - self.dx / 2.0, self.dx, self.grid_size)
        lift_prob = depth_prob if teacher is None else mix_teacher_depth(depth_prob, *teacher)
        volume = lift_and_pool(
            lift_prob.unflatten(0, (b, n)),
            context.unflatten(0, (b, n)),
            index,
            inside,
            self.grid_size,
            chunk_elements=self.pool_chunk_elements,
            mean=self.pool == "mean",
        )
        return (volume, depth_prob, context) if with_context else (volume, depth_prob)

    def geometry(
        self,
        rots: torch.Tensor,
        trans: torch.Tensor,
        intrins: torch.Tensor,
        post_rots: torch.Tensor,
        post_trans: torch.Tensor,
        bda: torch.Tensor,
    ) -> torch.Tensor:
        """Grid-frame position of every frustum point: [B, N, D, fH, fW, 3]."""
        return frustum_to_grid(self.frustum, rots, trans, intrins, post_rots, post_trans, bda)

    def depth_target_bins(
        self,
        gt_depth: torch.Tensor,
        *,
        gt_occ: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        fix_bin_offset: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth targets (bins [B*N*fH*fW] int64, valid [B*N*fH*fW] bool) of gt_depth [B, N, H, W].

        A feature cell's target is the nearest LiDAR depth of its patch. With ``depth_from_occupancy``,
        cells without a LiDAR point take the depth of the first labelled voxel along their ray instead
        (:func:`occupancy_depth`; needs ``gt_occ`` [B, X, Y, Z] and the frustum ``points``
        [B, N, D, fH, fW, 3] of :meth:`geometry`). ``fix_bin_offset``: None = the configured binning.
        """
        if gt_depth.dim() != 4 or tuple(gt_depth.shape[-2:]) != self.input_size:
            raise ValueError(
                f"gt_depth must be [B, N, {self.input_size[0]}, {self.input_size[1]}], "
                f"got {tuple(gt_depth.shape)}"
            )
        depth = nearest_patch_depth(gt_depth, self.downsample)  # [B*N*fH*fW]
        if self.depth_from_occupancy:
            if gt_occ is None or points is None:
                raise ValueError("view_transformer.depth_from_occupancy needs gt_occ and the frustum points")
            bin_depths = self.frustum[:, 0, 0, 2]  # [D]
            filled = occupancy_depth(points, bin_depths, gt_occ, self.point_cloud_range)
            depth = torch.where(depth >= NO_DEPTH, filled, depth)
        fix = self.fix_depth_bin_offset if fix_bin_offset is None else fix_bin_offset
        return depth_to_bins(depth, self.depth_bound, fix_bin_offset=fix)

    def depth_loss(
        self,
        gt_depth: torch.Tensor,
        depth_prob: torch.Tensor,
        *,
        gt_occ: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted BCE depth loss: gt_depth [B, N, H, W] (0 = no point), depth_prob [B*N, D, fH, fW];
        targets from :meth:`depth_target_bins`."""
        bins, valid = self.depth_target_bins(gt_depth, gt_occ=gt_occ, points=points)
        return self.weighted_depth_loss(depth_prob, bins, valid)

    def weighted_depth_loss(
        self, depth_prob: torch.Tensor, bins: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """``depth_loss_weight`` x :func:`depth_bce_loss` of depth_prob [B*N, D, fH, fW] against target
        bins / valid [B*N*fH*fW], cells weighted by depth under ``depth_distance_weighting``."""
        cell_weight = None
        if self.depth_distance_weighting > 0:
            bin_depths = self.frustum[:, 0, 0, 2]  # [D]
            cell_weight = depth_distance_weights(bins, bin_depths, self.depth_distance_weighting)
        return self.depth_loss_weight * depth_bce_loss(depth_prob, bins, valid, cell_weight)

    def semantic_loss(
        self, context: torch.Tensor, gt_occ: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """Weighted cross-entropy of the context classifier (``semantic_loss_weight`` > 0).

        context [B*N, Ct, fH, fW] from ``forward(..., with_context=True)``, gt_occ [B, X, Y, Z], points
        [B, N, D, fH, fW, 3] from :meth:`geometry`. A cell's target is the class of the first labelled
        voxel along its ray (:func:`first_labelled_hit`); cells whose ray meets nothing labelled are left out.
        """
        if self.context_classifier is None:
            raise RuntimeError("view_transformer.semantic_loss_weight is 0: there is no context classifier")
        _, label = first_labelled_hit(points, gt_occ, self.point_cloud_range)  # [B, N, fH, fW], 0 = none
        logits = self.context_classifier(context)  # [B*N, K, fH, fW]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce = F.cross_entropy(logits.float(), label.flatten(0, 1), ignore_index=0, reduction="sum")
            return self.semantic_loss_weight * ce / (label != 0).sum().clamp(min=1)

    def _check_inputs(self, feats: torch.Tensor, *cams: torch.Tensor) -> None:
        if feats.dim() != 5:
            raise ValueError(f"view transformer: feats must be [B, N, C, fH, fW], got {tuple(feats.shape)}")
        b, n, _, fh, fw = feats.shape
        if (fh, fw) != tuple(self.frustum.shape[1:3]):
            raise ValueError(
                f"view transformer: feature size {fh}x{fw} does not match the frustum built for input size "
                f"{self.input_size} at stride {self.downsample} ({tuple(self.frustum.shape[1:3])})"
            )
        expected = {
            "rots": (b, n, 3, 3),
            "trans": (b, n, 3),
            "intrins": (b, n, 4, 4),
            "post_rots": (b, n, 3, 3),
            "post_trans": (b, n, 3),
            "bda": (b, 4, 4),
        }
        for (name, shape), tensor in zip(expected.items(), cams):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"view transformer: {name} must be {list(shape)}, got {list(tensor.shape)}")
