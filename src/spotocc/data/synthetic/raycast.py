"""Exact ray casting through a voxel grid, vectorised over rays in numpy.

A 3D DDA (Amanatides & Woo) with empty-space skipping: a precomputed chessboard distance ``D`` to
the nearest solid voxel says that the cube of voxels within ``D - 1`` of the current voxel is empty,
so a ray jumps straight to where it leaves that cube (``D = 1`` is a plain DDA step). The first solid
voxel can only be entered across the boundary of such a cube, so the result is the exact first hit.
Rays that hit or leave the grid are dropped from the working set after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class RayHits:
    """First solid voxel along each ray; ``t`` is the metric distance along the (unit) direction."""

    t: np.ndarray  # float64 [R], inf where the ray hits nothing before max_t / the grid boundary
    voxel: np.ndarray  # int64 [R], flat C-order index of the hit voxel, -1 where nothing was hit
    axis: np.ndarray  # int8 [R], axis of the face the ray entered the hit voxel through, -1: started inside
    step: np.ndarray  # int8 [R, 3], direction sign per axis (the entered face's normal is -step[axis])


class VoxelRaycaster:
    """Casts rays through a boolean grid ``solid`` [X, Y, Z]; voxel ``[i, j, k]`` spans
    ``grid_min + [i, j, k] * voxel_size`` to ``grid_min + [i + 1, j + 1, k + 1] * voxel_size``."""

    def __init__(self, solid: np.ndarray, grid_min: np.ndarray, voxel_size: np.ndarray) -> None:
        self.shape = tuple(int(s) for s in solid.shape)
        self.grid_min = np.asarray(grid_min, dtype=np.float64)
        self.voxel_size = np.asarray(voxel_size, dtype=np.float64)
        self.any_solid = bool(solid.any())
        # Chessboard distance (in voxels) to the nearest solid voxel; 0 on solid voxels.
        if self.any_solid:
            dist = ndimage.distance_transform_cdt(~solid, metric="chessboard")
        else:
            dist = np.full(solid.shape, 1, dtype=np.int32)
        self.dist = np.minimum(dist, 1 << 14).astype(np.int16).reshape(-1)

    def cast(
        self, origins: np.ndarray, directions: np.ndarray, max_t: float = np.inf, chunk: int = 131072
    ) -> RayHits:
        """First hits of rays from ``origins`` ([R, 3] or [3], metric) along unit ``directions`` [R, 3]."""
        directions = np.asarray(directions, dtype=np.float64)
        origins = np.broadcast_to(np.asarray(origins, dtype=np.float64), directions.shape)
        n = directions.shape[0]
        out = RayHits(
            t=np.full(n, np.inf),
            voxel=np.full(n, -1, dtype=np.int64),
            axis=np.full(n, -1, dtype=np.int8),
            step=np.where(directions >= 0, 1, -1).astype(np.int8),
        )
        if self.any_solid:
            for start in range(0, n, chunk):
                sl = slice(start, min(n, start + chunk))
                self._cast_chunk(origins[sl], directions[sl], max_t, out, start)
        return out

    def _cast_chunk(self, origins, directions, max_t, out: RayHits, base: int) -> None:
        shape = np.asarray(self.shape, dtype=np.int64)
        strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1], dtype=np.int64)
        p0 = (origins - self.grid_min) / self.voxel_size  # ray origins in voxel units, [R, 3]
        dv = directions / self.voxel_size  # voxel units per metre, [R, 3]
        moving = dv != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(moving, 1.0 / dv, np.inf)  # [R, 3]
            # Slab test against the box [0, shape]: entry and exit distances per ray.
            t_a = np.where(moving, -p0 * inv, -np.inf)
            t_b = np.where(moving, (shape - p0) * inv, np.inf)
        outside = ~moving & ((p0 < 0) | (p0 > shape))  # parallel to a slab and outside it: never enters
        t_near = np.minimum(t_a, t_b)
        t_far = np.maximum(t_a, t_b)
        axis = np.argmax(t_near, axis=1).astype(np.int64)
        t_cur = t_near.max(axis=1)
        t_end = np.minimum(t_far.min(axis=1), max_t)
        started_inside = t_cur <= 0
        t_cur = np.maximum(t_cur, 0.0)
        axis[started_inside] = -1
        rays = np.nonzero((t_cur < t_end) & ~outside.any(axis=1))[0]
        if rays.size == 0:
            return
        p0, dv, inv, moving = p0[rays], dv[rays], inv[rays], moving[rays]  # [R', 3]
        t_cur, t_end, axis = t_cur[rays], t_end[rays], axis[rays]
        step_up = dv >= 0  # [R', 3]
        # Voxel containing the entry point; a ray entering through a face lies on the inner side of it.
        idx = np.floor(p0 + t_cur[:, None] * dv).astype(np.int64)
        rows = np.nonzero(axis >= 0)[0]
        if rows.size:
            a = axis[rows]
            face = np.rint(p0[rows, a] + t_cur[rows] * dv[rows, a]).astype(np.int64)
            idx[rows, a] = np.where(step_up[rows, a], face, face - 1)
        idx = np.clip(idx, 0, shape - 1)
        # Axis-first [3, R'] arrays keep the per-step arithmetic on contiguous rows.
        pos, vel, idx = p0.T.copy(), dv.T.copy(), idx.T.copy()
        up = step_up.T.astype(np.int64)
        # Crossing time of boundary b on an axis: (b - pos) * inv_vel + never, with never = 1e30 on axes
        # the ray does not move along (avoids inf * 0).
        inv_vel = np.where(moving, inv, 0.0).T.copy()
        never = np.where(moving, 0.0, 1e30).T.copy()
        shape_col = shape[:, None]
        while rays.size:
            flat = idx[0] * strides[0] + idx[1] * strides[1] + idx[2]  # [R']
            dist = self.dist[flat].astype(np.int64)
            hit = dist == 0
            if hit.any():
                r = base + rays[hit]
                out.t[r] = t_cur[hit]
                out.voxel[r] = flat[hit]
                out.axis[r] = axis[hit]
            # Leave the empty cube of half size dist - 1 around the current voxel.
            ext = np.maximum(dist - 1, 0)  # [R']
            bound = (
                idx - ext + up * (1 + 2 * ext)
            )  # boundary to cross: idx + 1 + ext going up, idx - ext down
            t_axes = (bound - pos) * inv_vel + never  # [3, R']
            a = np.argmin(t_axes, axis=0)
            n = np.arange(rays.size)
            t_new = t_axes[a, n]
            new_idx = np.floor(pos + t_new * vel).astype(np.int64)
            np.clip(new_idx, idx - ext, idx + ext, out=new_idx)
            new_idx[a, n] = bound[a, n] - 1 + up[a, n]
            keep = ~hit & (t_new < t_end) & ((new_idx >= 0) & (new_idx < shape_col)).all(axis=0)
            if keep.all():
                idx, t_cur, axis = new_idx, t_new, a
                continue
            rays, t_end, t_cur, axis = rays[keep], t_end[keep], t_new[keep], a[keep]
            pos, vel, up, inv_vel, never = (
                pos[:, keep],
                vel[:, keep],
                up[:, keep],
                inv_vel[:, keep],
                never[:, keep],
            )
            idx = new_idx[:, keep]
