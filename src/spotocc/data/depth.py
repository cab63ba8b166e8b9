"""LiDAR points -> per-pixel depth targets at network input resolution (spec 04 sections 1.9, 2.5).

Two released rules, kept apart because they differ:

* KITTI (:func:`lidar_depth_targets`): project velodyne points with the sample's own geometry
  (after image augmentation), keep ``0 <= u <= W-1``, ``0 <= v <= H-1``, ``d > 0``, write at the
  **rounded** pixel, **nearest point wins**.
* nuScenes (:func:`pixel_depth_targets`): precomputed ``(u, v, d)`` rows in original pixels, moved
  through the image augmentation with the released arithmetic, **truncated** to int16, kept if
  ``0 <= u < W``, ``0 <= v < H``, written in file order (**last write wins**, no z-buffer).

0 means "no measurement".
"""

from __future__ import annotations

import numpy as np
import torch

from spotocc.data.transforms import ImageAugmentation


def project_points(
    points: torch.Tensor,
    rots: torch.Tensor,
    trans: torch.Tensor,
    intrins: torch.Tensor,
    post_rots: torch.Tensor,
    post_trans: torch.Tensor,
) -> torch.Tensor:
    """Grid-frame points ``[P, 3]`` -> ``[P, N, 3]`` (u, v, depth) in each of N augmented images.

    ``rots``/``trans`` map camera to grid frame; ``intrins`` is 4x4 (its 4th column, the KITTI P2
    stereo offset, is added, so depth = z_cam + P[2, 3]); ``post_*`` is the image augmentation.
    """
    points = points.to(torch.float32).reshape(-1, 1, 3) - trans.reshape(1, -1, 3)  # [P, N, 3]
    cam = (torch.linalg.inv(rots).unsqueeze(0) @ points.unsqueeze(-1)).squeeze(-1)  # [P, N, 3]
    cam_h = torch.cat([cam, torch.ones_like(cam[..., :1])], dim=-1)  # [P, N, 4]
    img = (intrins.unsqueeze(0) @ cam_h.unsqueeze(-1)).squeeze(-1)  # [P, N, 4]
    depth = img[..., 2:3]  # [P, N, 1]
    uv = img[..., :2] / depth  # [P, N, 2]
    uv = (post_rots[:, :2, :2].unsqueeze(0) @ uv.unsqueeze(-1)).squeeze(-1) + post_trans[:, :2].unsqueeze(0)
    return torch.cat([uv, depth], dim=-1)  # [P, N, 3]


def nearest_depth_map(uvd: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[H, W]`` map of the nearest depth per rounded pixel (KITTI rule) from ``[P, 3]`` (u, v, d)."""
    u, v, d = uvd[:, 0], uvd[:, 1], uvd[:, 2]
    keep = (u >= 0) & (v >= 0) & (u <= width - 1) & (v <= height - 1) & (d > 0)
    u, v, d = u[keep], v[keep], d[keep]
    # The released code sorts by descending depth and lets the last (nearest) write win; a scatter
    # minimum gives the same map deterministically on every device.
    flat = v.round().long() * width + u.round().long()
    depth = torch.full((height * width,), float("inf"), dtype=torch.float32)
    depth.scatter_reduce_(0, flat, d.to(torch.float32), reduce="amin")
    depth[torch.isinf(depth)] = 0.0
    return depth.reshape(height, width)


def lidar_depth_targets(
    points: torch.Tensor,
    rots: torch.Tensor,
    trans: torch.Tensor,
    intrins: torch.Tensor,
    post_rots: torch.Tensor,
    post_trans: torch.Tensor,
    input_size: tuple[int, int],
) -> torch.Tensor:
    """KITTI depth targets ``[N, H, W]`` from grid-frame points ``[P, >=3]`` (xyz used)."""
    height, width = input_size
    uvd = project_points(points[:, :3], rots, trans, intrins, post_rots, post_trans)  # [P, N, 3]
    return torch.stack([nearest_depth_map(uvd[:, n], height, width) for n in range(uvd.shape[1])])


def pixel_depth_targets(
    pixels: np.ndarray, params: ImageAugmentation, input_size: tuple[int, int]
) -> torch.Tensor:
    """nuScenes depth target ``[H, W]`` from ``[P, 3]`` rows (u, v, depth) in original pixels.

    Follows the released arithmetic (float32 coordinates, float64 rotation, int16 truncation toward
    zero, so ``u`` in (-1, 0) lands in column 0) and keeps the last row written to each pixel.
    """
    height, width = input_size
    pts = np.array(pixels, dtype=np.float32).reshape(-1, 3)
    pts[:, :2] = pts[:, :2] * params.resize
    pts[:, 0] -= params.crop[0]
    pts[:, 1] -= params.crop[1]
    if params.flip:
        pts[:, 0] = width - pts[:, 0]
    pts[:, 0] -= width / 2.0
    pts[:, 1] -= height / 2.0
    h = params.rotate / 180 * np.pi
    rot = np.array([[np.cos(h), np.sin(h)], [-np.sin(h), np.cos(h)]])
    pts[:, :2] = (rot @ pts[:, :2].T).T
    pts[:, 0] += width / 2.0
    pts[:, 1] += height / 2.0
    coords = np.trunc(pts[:, :2])  # int16 conversion truncates toward zero
    u, v = coords[:, 0], coords[:, 1]
    keep = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    flat = (v[keep].astype(np.int64) * width + u[keep].astype(np.int64))[::-1]
    values = pts[keep, 2][::-1]
    # Last write wins: the first occurrence in reversed order is the last in file order.
    _, first = np.unique(flat, return_index=True)
    depth = np.zeros(height * width, dtype=np.float32)
    depth[flat[first]] = values[first]
    return torch.from_numpy(depth.reshape(height, width))
