"""Occ3D's two visibility masks for a synthetic scene, by casting rays through it.

Occ3D labels a voxel observed by the LiDAR (``mask_lidar``) when an accumulated LiDAR scan hits it
or a beam passes through it, and observed by the cameras (``mask_camera``) when it is LiDAR-observed
and a ray from a camera centre through a pixel reaches it before (or as) its first hit. Here:

* the accumulated scans are spinning scans from a few LiDAR positions along the ego car's path
  (``origins``), with fixed azimuths (no random draws);
* camera rays go through a regular subset of pixel centres (every ``stride``-th pixel, so that a
  camera casts at most about ``max_rays`` rays).

A ray marks every GT voxel its segment [0, first hit) passes through, sampled at a third of the
smallest voxel side, and the hit voxel itself. A few scans hit a surface only along rings, while
Occ3D accumulates a whole sequence of scans; so :func:`with_exposed_surfaces` also counts as observed
every solid voxel sharing a face with an observed empty voxel (its face is in plain view from there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from spotocc.data.synthetic.geometry import Camera, WorldGrid
from spotocc.data.synthetic.raycast import VoxelRaycaster

_SAMPLES_PER_CHUNK = 1 << 21


def mark_rays(
    mask: np.ndarray,
    world: WorldGrid,
    origins: np.ndarray,
    dirs: np.ndarray,
    t_end: np.ndarray,
    hit_voxel: np.ndarray,
) -> None:
    """Set ``mask`` (bool GT grid [X, Y, Z]) on the voxels of segments ``origins + t dirs``, t in [0,
    t_end), and on the hit voxels (flat world indices, -1 = none). origins/dirs [R, 3], t_end [R]."""
    lo = world.grid_min + np.asarray(world.gt_offset) * world.voxel_size  # GT box corner
    hi = lo + np.asarray(world.gt_shape) * world.voxel_size
    with np.errstate(divide="ignore", invalid="ignore"):  # slab test: where each ray is inside the box
        t0 = (lo - origins) / dirs
        t1 = (hi - origins) / dirs
    parallel = dirs == 0  # [R, 3]: no bound on t along that axis if inside the slab, else never inside
    inside = (origins >= lo) & (origins < hi)
    near = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(t0, t1))
    far = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(t0, t1))
    t_in = near.max(axis=1).clip(min=0.0)
    t_out = far.min(axis=1)
    t_out = np.minimum(t_out, t_end)
    step = float(world.voxel_size.min()) / 3.0
    counts = np.ceil(np.maximum(t_out - t_in, 0.0) / step).astype(np.int64)  # samples per ray
    gt_shape = np.asarray(world.gt_shape)
    order = np.flatnonzero(counts)
    start = 0
    while start < order.size:  # chunks of rays holding at most _SAMPLES_PER_CHUNK samples
        cum = np.cumsum(counts[order[start:]])
        stop = start + max(1, int(np.searchsorted(cum, _SAMPLES_PER_CHUNK)))
        rays = order[start:stop]
        n = counts[rays]
        ray = np.repeat(np.arange(rays.size), n)
        k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # sample index along its ray
        t = t_in[rays][ray] + (k + 0.5) * step
        keep = t < t_out[rays][ray]
        points = origins[rays][ray[keep]] + t[keep, None] * dirs[rays][ray[keep]]  # [P, 3]
        idx = np.floor((points - lo) / world.voxel_size).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < gt_shape), axis=1)
        mask[tuple(idx[ok].T)] = True
        start = stop
    hits = hit_voxel[hit_voxel >= 0]
    idx = np.stack(np.unravel_index(hits, world.shape), axis=1) - np.asarray(world.gt_offset)
    ok = np.all((idx >= 0) & (idx < gt_shape), axis=1)
    mask[tuple(idx[ok].T)] = True


def lidar_mask(
    caster: VoxelRaycaster,
    world: WorldGrid,
    origins: Sequence[Sequence[float]],
    elevations_deg: np.ndarray,
    azimuth_steps: int,
    max_range: float = 120.0,
) -> np.ndarray:
    """bool GT grid: voxels hit or passed through by spinning scans from each of ``origins``."""
    mask = np.zeros(world.gt_shape, dtype=bool)
    elev = np.radians(np.asarray(elevations_deg, dtype=np.float64))
    azim = 2 * np.pi * (np.arange(azimuth_steps) + 0.5) / azimuth_steps
    e, a = np.meshgrid(elev, azim, indexing="ij")
    dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
    for origin in origins:
        o = np.asarray(origin, dtype=np.float64)
        hits = caster.cast(o, dirs, max_range)
        t_end = np.where(hits.voxel >= 0, hits.t, max_range)
        mark_rays(mask, world, np.broadcast_to(o, dirs.shape), dirs, t_end, hits.voxel)
    return mask


def camera_mask(
    caster: VoxelRaycaster, world: WorldGrid, cameras: Sequence[Camera], max_rays: int = 160 * 90
) -> np.ndarray:
    """bool GT grid: voxels a camera ray reaches before or at its first hit (no LiDAR condition)."""
    mask = np.zeros(world.gt_shape, dtype=bool)
    for cam in cameras:
        stride = max(1, math.ceil(math.sqrt(cam.height * cam.width / max_rays)))
        dirs, _ = cam.pixel_rays()  # [H*W, 3], row-major pixels
        keep = np.zeros((cam.height, cam.width), dtype=bool)
        keep[stride // 2 :: stride, stride // 2 :: stride] = True
        dirs = dirs[keep.reshape(-1)]
        origin = cam.centre_grid
        hits = caster.cast(origin, dirs)
        t_end = np.where(hits.voxel >= 0, hits.t, np.inf)
        mark_rays(mask, world, np.broadcast_to(origin, dirs.shape), dirs, t_end, hits.voxel)
    return mask


def with_exposed_surfaces(mask: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """``mask`` plus the solid voxels (bool [X, Y, Z]) sharing a face with an observed empty voxel."""
    air = mask & ~solid
    near = ndimage.binary_dilation(air, structure=ndimage.generate_binary_structure(3, 1))
    return mask | (solid & near)
