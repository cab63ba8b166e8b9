"""Where RayIoU's rays start: the LiDAR origins of a scene's key frames in one sample's ego frame.

Data-side geometry shared by the Occ3D reader (which puts each sample's origins in ``meta``) and
:mod:`spotocc.evaluation.ray_iou` (which casts the rays); the reference's conventions, with their
sources, are in that module's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "NUSCENES_LIDAR_ORIGIN",
    "OCC3D_PC_MIN",
    "OCC3D_VOXEL_SIZE",
    "inside_grid",
    "lidar_origins_in_ego",
    "select_ray_origins",
    "to_voxel_units",
]

OCC3D_PC_MIN: tuple[float, float, float] = (-40.0, -40.0, -1.0)
OCC3D_VOXEL_SIZE = 0.4
NUSCENES_LIDAR_ORIGIN: tuple[float, float, float] = (0.9858, 0.0, 1.8402)


def lidar_origins_in_ego(
    ego_to_global: torch.Tensor | np.ndarray, lidar_to_global: torch.Tensor | np.ndarray
):
    """LiDAR origins of several frames ``[N, 3]`` (float64, metres) in the ego frame of one sample.

    Args:
        ego_to_global: ``[4, 4]`` pose of the sample's ego frame.
        lidar_to_global: ``[N, 4, 4]`` LiDAR poses (``ego2global @ lidar2ego``) of the frames.
    """
    ego = torch.as_tensor(ego_to_global, dtype=torch.float64)
    lidar = torch.as_tensor(lidar_to_global, dtype=torch.float64)
    if ego.shape != (4, 4) or lidar.dim() != 3 or lidar.shape[1:] != (4, 4):
        raise ValueError(
            f"lidar_origins_in_ego: expected [4, 4] and [N, 4, 4] poses, got {tuple(ego.shape)} and "
            f"{tuple(lidar.shape)}"
        )
    return (torch.linalg.inv(ego) @ lidar[:, :, 3].T).T[:, :3]  # [N, 3]


def select_ray_origins(
    frame_origins: torch.Tensor | np.ndarray,
    grid_shape: Sequence[int] = (200, 200, 16),
    pc_min: Sequence[float] = OCC3D_PC_MIN,
    voxel_size: float = OCC3D_VOXEL_SIZE,
    max_origins: int = 8,
    xy_limit: float = 39.0,
) -> torch.Tensor:
    """The reference's choice of ray origins among a scene's frames (``[N, 3]`` in time order).

    Keeps origins with ``|x| < xy_limit`` and ``|y| < xy_limit`` (and, unlike the reference, only
    those inside the grid), then, of more than ``max_origins``, those at
    ``round(linspace(0, n - 1, max_origins))`` (NumPy's half-to-even rounding). Returns ``[T, 3]``.
    """
    origins = torch.as_tensor(frame_origins, dtype=torch.float64).reshape(-1, 3)
    keep = (origins[:, 0].abs() < xy_limit) & (origins[:, 1].abs() < xy_limit)
    keep &= inside_grid(to_voxel_units(origins, pc_min, voxel_size), grid_shape)
    origins = origins[keep]
    if origins.shape[0] > max_origins:
        index = np.round(np.linspace(0, origins.shape[0] - 1, max_origins)).astype(np.int64)
        origins = origins[torch.from_numpy(index)]
    return origins


def to_voxel_units(points: torch.Tensor, pc_min: Sequence[float], voxel_size: float) -> torch.Tensor:
    """``(p - pc_min) / voxel_size`` with float32 ``pc_min`` and ``voxel_size``, rounded to float32."""
    offset = torch.tensor(pc_min, dtype=torch.float32, device=points.device).to(points.dtype)
    scale = torch.tensor(voxel_size, dtype=torch.float32, device=points.device).to(points.dtype)
    return ((points - offset) / scale).to(torch.float32)


def inside_grid(voxel_coords: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """Voxel-unit coordinates ``[..., 3]`` -> ``[...]`` bool: inside ``[0, grid_shape)`` on every axis."""
    size = torch.tensor(list(grid_shape), dtype=voxel_coords.dtype, device=voxel_coords.device)
    return ((voxel_coords >= 0) & (voxel_coords < size)).all(dim=-1)
