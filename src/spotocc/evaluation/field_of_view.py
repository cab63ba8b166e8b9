"""Which voxels the cameras can see at all: the field-of-view mask of an evaluation option.

SemanticKITTI's and nuScenes-Occupancy's valid masks come from LiDAR, so they label voxels that no
camera sees (about a third of the buildings of a KITTI frame lie left or right of the front camera).
``eval.camera_view_only=true`` scores only the labelled voxels whose centre lies in front of some
camera and projects inside its network input image; every other voxel is ignored (label 255).

This is a field-of-view test, not an occlusion test: a voxel behind a wall but inside the image still
counts. Occ3D's ``mask_camera`` also removes occluded voxels; this mask does not. It is an option for
users who want to separate "did not see" from "saw wrongly", never the default: the papers' numbers
score every labelled voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spotocc.config import GridConfig
from spotocc.data.classes import IGNORE_INDEX

__all__ = ["camera_view_mask", "ignore_outside_camera_view", "points_in_view", "project_points"]

_CHUNK = 1 << 20  # voxels projected at a time (bounds the memory of nuScenes-size grids)


def project_points(
    points: torch.Tensor,
    rots: torch.Tensor,
    trans: torch.Tensor,
    intrins: torch.Tensor,
    post_rots: torch.Tensor,
    post_trans: torch.Tensor,
    bda: torch.Tensor,
) -> torch.Tensor:
    """Grid-frame points [P, 3] -> network-image (u', v', d') [N, P, 3] in each of a sample's N cameras.

    The inverse of :func:`spotocc.models.view_transform.frustum_to_grid`: undo ``bda`` [4, 4], LiDAR ->
    camera (R^-1 (p - t)), (u d, v d, d) = K c + the projection's 4th column, then the image
    augmentation (post_rots [N, 3, 3], post_trans [N, 3]). Points with d <= 0 get d' <= 0 and finite u', v'.
    """
    f64 = torch.float64
    rots, trans, intrins, post_rots, post_trans, bda = (
        t.to(f64) for t in (rots, trans, intrins, post_rots, post_trans, bda)
    )
    lidar = torch.linalg.solve(bda[:3, :3], (points.to(f64) - bda[:3, 3]).T)  # [3, P]
    cam = torch.linalg.solve(rots, lidar[None] - trans[..., None])  # [N, 3, P]
    img = intrins[:, :3, :3] @ cam + intrins[:, :3, 3:4]  # [N, 3, P]: (u d, v d, d)
    depth = img[:, 2:3]  # [N, 1, P]
    safe = torch.where(depth > 0, depth, torch.ones_like(depth))
    uvd = torch.cat([img[:, :2] / safe, depth], dim=1)  # [N, 3, P]
    return (post_rots @ uvd + post_trans[..., None]).transpose(1, 2)  # [N, P, 3]


def points_in_view(
    points: torch.Tensor,
    cams: Sequence[torch.Tensor],
    input_size: tuple[int, int],
    depth_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Grid-frame points [P, 3] -> [P] bool: in front of some camera and inside its (H, W) input image.

    ``cams``: one sample's (rots, trans, intrins, post_rots, post_trans, bda), without batch axis. With
    ``depth_range`` (min, max) the depth must also satisfy ``min <= d < max``.
    """
    h, w = input_size
    seen = torch.zeros(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], _CHUNK):
        u, v, d = project_points(points[start : start + _CHUNK], *cams).unbind(-1)  # [N, p] each
        ok = (d > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        if depth_range is not None:
            ok &= (d >= depth_range[0]) & (d < depth_range[1])
        seen[start : start + _CHUNK] = ok.any(dim=0).cpu()
    return seen


def voxel_centres(voxels: torch.Tensor, grid: GridConfig) -> torch.Tensor:
    """Integer voxel indices [P, 3] of the GT grid -> their centres [P, 3] (float64, grid frame, m)."""
    lower = torch.tensor(grid.point_cloud_range[:3], dtype=torch.float64)
    size = torch.tensor(grid.occ_voxel_size, dtype=torch.float64)
    return lower + (voxels.cpu().to(torch.float64) + 0.5) * size


def camera_view_mask(
    gt_occ: torch.Tensor, cams: Sequence[torch.Tensor], grid: GridConfig, input_size: tuple[int, int]
) -> torch.Tensor:
    """Labels [B, X, Y, Z] and batched camera tensors -> [B, X, Y, Z] bool: labelled and in a camera's view.

    Only labelled voxels (not 255) are projected; unlabelled ones are False.
    """
    mask = torch.zeros(gt_occ.shape, dtype=torch.bool)
    for b in range(gt_occ.shape[0]):
        voxels = (gt_occ[b] != IGNORE_INDEX).nonzero().cpu()  # [P, 3]
        seen = points_in_view(voxel_centres(voxels, grid), [t[b].cpu() for t in cams], input_size)  # [P]
        mask[b][voxels[seen].unbind(-1)] = True
    return mask.to(gt_occ.device)


def ignore_outside_camera_view(
    gt_occ: torch.Tensor, cams: Sequence[torch.Tensor], grid: GridConfig, input_size: tuple[int, int]
) -> torch.Tensor:
    """A copy of ``gt_occ`` [B, X, Y, Z] with every voxel outside all cameras' views set to 255."""
    return gt_occ.masked_fill(~camera_view_mask(gt_occ, cams, grid, input_size), IGNORE_INDEX)
