"""RayIoU, the ray-based occupancy metric of SparseOcc (MCG-NJU/SparseOcc, ECCV 2024), in plain PyTorch.

The reference needs a CUDA extension (``lib/dvr/dvr.cu``); this module traverses all rays at once
with vectorised tensor code (an exact voxel traversal, one step per loop iteration for every ray
still in flight) and runs on CPU and GPU. What it reproduces, with the source of each fact (paths
in MCG-NJU/SparseOcc; FlashOCC ``projects/mmdet3d_plugin/core/evaluation/ray_metrics.py`` holds the
same code):

- **Ray directions** (``loaders/ray_metrics.py``, ``generate_lidar_rays``): 39 pitch angles, the
  first ten ``-(pi/2 - atan(k + 1))`` for ``k = 0..9``, then continued with the last spacing while
  the last angle is below 0.21 rad (the nuScenes LiDAR's upper field of view); 360 azimuths at
  whole degrees 0..359. 14,040 unit rays per origin (the "15840" in a comment there is stale).
- **Ray origins** (``loaders/ego_pose_dataset.py``, ``EgoPoseDataset``): the LiDAR origin of every
  keyframe of the same scene, the sample's own and its neighbours' (earlier and later), expressed in
  the sample's ego frame; only those with ``|x| < 39`` and ``|y| < 39`` m are kept, and of more than
  8 the ones at ``round(linspace(0, n - 1, 8))`` are used. :func:`lidar_origins_in_ego` and
  :func:`select_ray_origins` do this. The reference does not check z; an origin outside the grid
  would start its traversal in the wrong voxel there (``int()`` truncates toward zero), so
  :func:`select_ray_origins` also drops origins outside the grid, and :class:`RayIoU` refuses them.
- **Missing neighbours**: ``RayIoU.update(..., origins=None)`` casts from the sample's own LiDAR
  origin only, :data:`NUSCENES_LIDAR_ORIGIN` = (0.9858, 0, 1.8402) m in the ego frame (the constant
  noted in ``process_one_sample``). ``compute()`` reports ``ray_origins_per_sample`` and
  ``ray_samples_single_origin`` so a result says how many origins it used; fewer origins mean fewer
  rays, and numbers are then comparable only with runs of the same origins.
- **Traversal** (``lib/dvr/dvr.cu``, ``render_forward`` in ``"test"`` mode): coordinates in voxel
  units ``(p - pc_min) / voxel_size`` rounded to float32 (origin and ``origin + direction``), the
  direction renormalised in float64 (the same formula; a CUDA build that fuses multiply-adds may
  differ in the last bit); Amanatides-Woo stepping from the origin's voxel, ties broken
  toward z, then y (``tMaxX < tMaxY ? (tMaxX < tMaxZ ? x : z) : (tMaxY < tMaxZ ? y : z)``). A voxel
  is occupied when its label is not ``free`` (17); labels outside 0..17 are refused (the reference
  would count, e.g., 255 as occupied). A ray's **depth** is the distance at which it
  *leaves* its first occupied voxel, in float32 metres (``dist * voxel_size``); its **label** is
  that voxel's. A ray that meets no occupied voxel gets the distance at which it leaves the grid and
  the label of its last voxel, ``free``. The reference stops after 1000 steps, which never binds on
  200 x 200 x 16 from an origin inside the grid; here there is no cap.
- **Counting** (``loaders/ray_metrics.py``, ``main_rayiou`` and ``calc_rayiou``): only rays whose GT
  label is not ``free`` (the GT ray hit something inside the grid) count; the others are dropped,
  whatever the prediction does along them. Per class ``c``: ``gt_c`` rays with GT label ``c``,
  ``pred_c`` rays with predicted label ``c``, and at each threshold ``tp_c`` rays with both labels
  ``c`` and ``|depth_pred - depth_gt| < threshold`` (strict). ``IoU_c = tp_c / (gt_c + pred_c -
  tp_c)``, counts summed over the whole dataset. ``RayIoU@1``, ``RayIoU@2``, ``RayIoU@4`` are the
  ``nanmean`` over the 17 non-free classes (``free`` dropped; a class in no GT and no predicted ray
  is 0/0 = NaN and left out, a class only predicted has IoU 0); ``RayIoU`` is the ``nanmean`` over
  all thresholds and classes (the mean of the three).
- The reference returns fractions; ``compute()`` reports percent rounded to 2 decimals like every
  other spotocc metric (SparseOcc's README prints 36.8 for 0.368).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from spotocc.data.ray_origins import (
    NUSCENES_LIDAR_ORIGIN,
    OCC3D_PC_MIN,
    OCC3D_VOXEL_SIZE,
    inside_grid,
    lidar_origins_in_ego,
    select_ray_origins,
    to_voxel_units,
)
from spotocc.evaluation.occ3d import OCC3D_CLASS_NAMES, as_label_tensor
from spotocc.evaluation.ssc import round_percent

__all__ = [
    "NUSCENES_LIDAR_ORIGIN",
    "OCC3D_PC_MIN",
    "OCC3D_VOXEL_SIZE",
    "RayIoU",
    "cast_rays",
    "first_hits",
    "lidar_origins_in_ego",
    "lidar_ray_directions",
    "ray_starts_and_directions",
    "select_ray_origins",
]

RAY_THRESHOLDS: tuple[float, ...] = (1.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------------
# rays and origins


def lidar_ray_directions() -> torch.Tensor:
    """The reference's 14,040 unit ray directions ``[R, 3]`` (float32), pitch-major, azimuth-minor."""
    pitches = [-(math.pi / 2 - math.atan(k + 1)) for k in range(10)]
    while pitches[-1] < 0.21:  # continue the spacing up to the LiDAR's upper field of view
        pitches.append(pitches[-1] + (pitches[-1] - pitches[-2]))
    pitch = np.array(pitches, dtype=np.float64)[:, None]  # [P, 1]
    azimuth = np.deg2rad(np.arange(0, 360, 1))[None, :]  # [1, 360]
    xyz = np.stack(
        np.broadcast_arrays(np.cos(pitch) * np.cos(azimuth), np.cos(pitch) * np.sin(azimuth), np.sin(pitch)),
        axis=-1,
    )  # [P, 360, 3]
    return torch.from_numpy(xyz.reshape(-1, 3).astype(np.float32))


def ray_starts_and_directions(
    origins: torch.Tensor,
    directions: torch.Tensor,
    pc_min: Sequence[float] = OCC3D_PC_MIN,
    voxel_size: float = OCC3D_VOXEL_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ray of every origin in voxel units, as the reference builds them.

    Args:
        origins: ``[T, 3]`` metres in the grid's frame.
        directions: ``[R, 3]`` unit vectors.

    Returns ``start`` ``[T * R, 3]`` and unit ``direction`` ``[T * R, 3]``, both float64, origin-major.
    Origin and end point ``origin + direction`` are rounded to float32 voxel units first.
    """
    origins = origins.to(torch.float64)  # [T, 3]
    start = to_voxel_units(origins, pc_min, voxel_size).to(torch.float64)  # [T, 3]
    ends = directions.to(torch.float32).to(torch.float64)[None] + origins[:, None]  # [T, R, 3]
    end = to_voxel_units(ends, pc_min, voxel_size).to(torch.float64)  # [T, R, 3]
    start = start[:, None].expand_as(end)  # [T, R, 3]
    r = end - start
    norm = torch.sqrt(r[..., 0] * r[..., 0] + r[..., 1] * r[..., 1] + r[..., 2] * r[..., 2])  # [T, R]
    direction = r / norm[..., None]
    return start.reshape(-1, 3).contiguous(), direction.reshape(-1, 3).contiguous()


# --------------------------------------------------------------------------------------------------
# traversal


def first_hits(
    occupied: torch.Tensor, sample: torch.Tensor, start: torch.Tensor, direction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each ray's first occupied voxel by exact voxel traversal, all rays in step.

    Args:
        occupied: ``[B, X, Y, Z]`` bool.
        sample: ``[N]`` long, which of the B grids each ray runs through.
        start: ``[N, 3]`` float64 voxel units, inside the grid.
        direction: ``[N, 3]`` float64 unit vectors.

    Returns ``distance`` ``[N]`` float64 (voxel units, where the ray leaves its first occupied voxel,
    or the grid when there is none), ``voxel`` ``[N, 3]`` long (that voxel, or the last one inside),
    and ``hit`` ``[N]`` bool.
    """
    b, x, y, z = occupied.shape
    device = occupied.device
    n = start.shape[0]
    size = torch.tensor([x, y, z], device=device)
    strides = torch.tensor([y * z, z, 1], device=device)
    flat = occupied.reshape(-1)

    voxel = start.floor().long()  # [N, 3]
    if n and not bool(((voxel >= 0) & (voxel < size)).all()):
        raise ValueError("first_hits: every ray must start inside the grid")
    step = torch.where(direction >= 0, 1, -1)  # [N, 3]
    moving = direction != 0
    safe = torch.where(moving, direction, torch.ones_like(direction))
    inf = torch.full_like(direction, math.inf)
    t_max = torch.where(moving, ((voxel + (step > 0).long()).double() - start) / safe, inf)  # [N, 3]
    t_delta = torch.where(moving, step.double() / safe, inf)  # [N, 3]
    base = sample.long() * (x * y * z)  # [N]

    distance = torch.empty(n, dtype=torch.float64, device=device)
    out_voxel = torch.empty(n, 3, dtype=torch.long, device=device)
    hit = torch.zeros(n, dtype=torch.bool, device=device)
    ray = torch.arange(n, device=device)  # [A] ids of the rays still in flight
    while ray.numel():
        rows = torch.arange(ray.numel(), device=device)
        tx, ty, tz = t_max.unbind(1)
        axis = torch.where(tx < ty, torch.where(tx < tz, 0, 2), torch.where(ty < tz, 1, 2))  # [A]
        leave = t_max[rows, axis]  # [A] distance at which the ray leaves its current voxel
        is_occupied = flat[base + (voxel * strides).sum(1)]  # [A]
        next_voxel = voxel.clone()
        next_voxel[rows, axis] += step[rows, axis]
        left_grid = ((next_voxel < 0) | (next_voxel >= size)).any(1)  # [A]
        done = is_occupied | left_grid
        if bool(done.any()):
            finished = ray[done]
            distance[finished] = leave[done]
            out_voxel[finished] = voxel[done]
            hit[finished] = is_occupied[done]
        t_max[rows, axis] += t_delta[rows, axis]
        keep = ~done
        ray, voxel, t_max = ray[keep], next_voxel[keep], t_max[keep]
        t_delta, step, base = t_delta[keep], step[keep], base[keep]
    return distance, out_voxel, hit


def cast_rays(
    labels: torch.Tensor,
    origins: Sequence[torch.Tensor],
    directions: torch.Tensor,
    free_index: int,
    pc_min: Sequence[float] = OCC3D_PC_MIN,
    voxel_size: float = OCC3D_VOXEL_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-hit label and depth of every ray of every origin, per grid.

    Args:
        labels: ``[B, X, Y, Z]`` integer labels; ``free_index`` marks free voxels.
        origins: B tensors ``[T_b, 3]`` (metres, grid frame, inside the grid).
        directions: ``[R, 3]`` unit vectors.

    Returns ``label`` ``[N]`` long and ``depth`` ``[N]`` float32 metres, ``N = R * sum(T_b)``, ordered
    grid, origin, direction.
    """
    device = labels.device
    b = labels.shape[0]
    if len(origins) != b:
        raise ValueError(f"cast_rays: {len(origins)} origin sets for {b} grids")
    starts, dirs, samples = [], [], []
    for i, origin in enumerate(origins):
        origin = origin.to(device=device, dtype=torch.float64).reshape(-1, 3)
        voxel_origin = to_voxel_units(origin, pc_min, voxel_size)
        outside = ~inside_grid(voxel_origin, labels.shape[1:])
        if bool(outside.any()):
            raise ValueError(
                f"cast_rays: ray origin {origin[outside][0].tolist()} (m) of sample {i} lies outside the "
                f"grid [{list(pc_min)} + {list(labels.shape[1:])} x {voxel_size} m]"
            )
        start, direction = ray_starts_and_directions(origin, directions.to(device), pc_min, voxel_size)
        starts.append(start)
        dirs.append(direction)
        samples.append(torch.full((start.shape[0],), i, dtype=torch.long, device=device))
    start, direction, sample = torch.cat(starts), torch.cat(dirs), torch.cat(samples)
    distance, voxel, _ = first_hits(labels != free_index, sample, start, direction)
    label = labels[sample, voxel[:, 0], voxel[:, 1], voxel[:, 2]].long()  # [N]
    depth = distance.to(torch.float32) * torch.tensor(voxel_size, dtype=torch.float32, device=device)
    return label, depth


# --------------------------------------------------------------------------------------------------
# the metric


class RayIoU:
    """Dataset-level RayIoU counts and the reference's results.

    Args:
        class_names: one name per label id, the last one ``free`` (default Occ3D's 18).
        thresholds: depth tolerances in metres (default 1, 2, 4).
        pc_min, voxel_size: the grid's lower corner and voxel edge in metres (default Occ3D's).
        directions: ``[R, 3]`` unit rays (default :func:`lidar_ray_directions`).

    ``update(pred, gt, origins)``: labels ``[X, Y, Z]`` or ``[B, X, Y, Z]`` (file ids, 0..free), and
    ray origins in metres in the sample's ego frame: ``[T, 3]`` for one sample, ``[B, T, 3]`` or a
    list of B ``[T_b, 3]`` for a batch, or None for the sample's own LiDAR origin only.
    """

    def __init__(
        self,
        class_names: Sequence[str] = OCC3D_CLASS_NAMES,
        thresholds: Sequence[float] = RAY_THRESHOLDS,
        pc_min: Sequence[float] = OCC3D_PC_MIN,
        voxel_size: float = OCC3D_VOXEL_SIZE,
        directions: torch.Tensor | None = None,
    ):
        if len(class_names) < 2:
            raise ValueError(f"RayIoU needs at least 2 classes (one + free), got {list(class_names)}")
        if not thresholds or any(t <= 0 for t in thresholds):
            raise ValueError(f"RayIoU: thresholds must be positive, got {list(thresholds)}")
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.free_index = self.num_classes - 1
        self.thresholds = tuple(float(t) for t in thresholds)
        self.pc_min = tuple(float(v) for v in pc_min)
        self.voxel_size = float(voxel_size)
        self.directions = lidar_ray_directions() if directions is None else directions.to(torch.float32)
        if self.directions.dim() != 2 or self.directions.shape[1] != 3:
            raise ValueError(f"RayIoU: directions must be [R, 3], got {tuple(self.directions.shape)}")
        self.reset()

    def reset(self) -> None:
        """Forget every count."""
        c, k = self.num_classes, len(self.thresholds)
        self.gt_count = np.zeros(c, dtype=np.int64)  # valid rays whose GT label is c
        self.pred_count = np.zeros(c, dtype=np.int64)  # valid rays whose predicted label is c
        self.tp_count = np.zeros((k, c), dtype=np.int64)  # both c and depth error < threshold
        self.samples = 0
        self.origins = 0
        self.single_origin_samples = 0

    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        gt: torch.Tensor | np.ndarray,
        origins: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray] | None = None,
    ) -> None:
        """Cast every ray through prediction and GT and add the counts (see the class docstring)."""
        pred_t = as_label_tensor(pred, "pred", "RayIoU.update")
        gt_t = as_label_tensor(gt, "gt", "RayIoU.update")
        if pred_t.shape != gt_t.shape or gt_t.dim() not in (3, 4):
            raise ValueError(
                f"RayIoU.update: pred {tuple(pred_t.shape)} and gt {tuple(gt_t.shape)} must be one shape, "
                "[X, Y, Z] or [B, X, Y, Z]"
            )
        single = gt_t.dim() == 3
        if single:
            pred_t, gt_t = pred_t[None], gt_t[None]
        device = gt_t.device
        pred_t = pred_t.to(device)
        for name, values in (("pred", pred_t), ("gt", gt_t)):
            if values.numel() == 0:
                raise ValueError(f"RayIoU.update: {name} is empty")
            low, high = (int(v) for v in torch.aminmax(values))
            if low < 0 or high > self.free_index:
                raise ValueError(
                    f"RayIoU.update: {name} labels must lie in 0..{self.free_index} (free = "
                    f"{self.free_index}), found {low}..{high}"
                )
        origin_sets = self._origin_sets(origins, gt_t.shape[0], single)
        labels = torch.cat([pred_t, gt_t]).long()  # [2B, X, Y, Z]: one traversal for both
        label, depth = cast_rays(
            labels, origin_sets + origin_sets, self.directions, self.free_index, self.pc_min, self.voxel_size
        )
        half = label.shape[0] // 2
        self._count(label[:half], depth[:half], label[half:], depth[half:])
        self.samples += len(origin_sets)
        self.origins += sum(o.shape[0] for o in origin_sets)
        self.single_origin_samples += sum(o.shape[0] == 1 for o in origin_sets)

    def _origin_sets(self, origins, batch: int, single: bool) -> list[torch.Tensor]:
        if origins is None:
            return [torch.tensor([NUSCENES_LIDAR_ORIGIN], dtype=torch.float64)] * batch
        if isinstance(origins, (torch.Tensor, np.ndarray)):
            origins = torch.as_tensor(origins, dtype=torch.float64)
            if single and origins.dim() == 2:
                origins = origins[None]
            if origins.dim() != 3 or origins.shape[-1] != 3:
                raise ValueError(
                    f"RayIoU.update: origins must be [T, 3] per sample ([B, T, 3] for a batch), got "
                    f"{tuple(origins.shape)}"
                )
            origins = list(origins)
        sets = [torch.as_tensor(o, dtype=torch.float64).reshape(-1, 3) for o in origins]
        if len(sets) != batch:
            raise ValueError(f"RayIoU.update: {len(sets)} origin sets for a batch of {batch}")
        if any(o.shape[0] == 0 for o in sets):
            raise ValueError("RayIoU.update: a sample has no ray origin")
        return sets

    def _count(self, pred_label, pred_depth, gt_label, gt_depth) -> None:
        c = self.num_classes
        valid = gt_label != self.free_index  # the GT ray hit something inside the grid
        g, p = gt_label[valid], pred_label[valid]
        error = (pred_depth[valid] - gt_depth[valid]).abs()  # float32 metres
        self.gt_count += torch.bincount(g, minlength=c).cpu().numpy()
        self.pred_count += torch.bincount(p, minlength=c).cpu().numpy()
        same = g == p
        for j, threshold in enumerate(self.thresholds):
            self.tp_count[j] += torch.bincount(g[same & (error < threshold)], minlength=c).cpu().numpy()

    # ----------------------------------------------------------------------------------------------
    # moving counts between processes

    def counts_tensor(self) -> torch.Tensor:
        """All counts as one flat int64 tensor (for ``all_reduce``); see :meth:`load_counts_tensor`."""
        extra = [self.samples, self.origins, self.single_origin_samples]
        flat = np.concatenate([self.gt_count, self.pred_count, self.tp_count.reshape(-1), extra])
        return torch.from_numpy(flat.astype(np.int64))

    def load_counts_tensor(self, flat: torch.Tensor) -> None:
        """Replace the counts by a flat tensor from :meth:`counts_tensor` (e.g. after ``all_reduce``)."""
        values = flat.detach().cpu().numpy().astype(np.int64)
        c, k = self.num_classes, len(self.thresholds)
        if values.shape != ((2 + k) * c + 3,):
            raise ValueError(f"load_counts_tensor: expected {(2 + k) * c + 3} values, got {values.shape}")
        self.gt_count, self.pred_count = values[:c].copy(), values[c : 2 * c].copy()
        self.tp_count = values[2 * c : (2 + k) * c].reshape(k, c).copy()
        self.samples, self.origins, self.single_origin_samples = (int(v) for v in values[-3:])

    # ----------------------------------------------------------------------------------------------
    # results

    def class_iou(self) -> np.ndarray:
        """``[K, C - 1]`` ray IoU per threshold and non-free class (fractions; NaN for 0 / 0)."""
        union = self.gt_count[None] + self.pred_count[None] - self.tp_count  # [K, C]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.tp_count / union.astype(np.float64)
        return np.delete(iou, self.free_index, axis=1)

    def compute(self) -> dict[str, float]:
        """``RayIoU``, ``RayIoU@<t>`` and ``<class>_RayIoU@<t>`` in percent (2 decimals), then
        ``ray_samples``, ``ray_origins_per_sample`` and ``ray_samples_single_origin``."""
        iou = self.class_iou()
        names = [n for i, n in enumerate(self.class_names) if i != self.free_index]
        values = {"RayIoU": _nanmean(iou)}
        for j, threshold in enumerate(self.thresholds):
            values[f"RayIoU@{threshold:g}"] = _nanmean(iou[j])
        for j, threshold in enumerate(self.thresholds):
            values.update({f"{name}_RayIoU@{threshold:g}": float(iou[j, i]) for i, name in enumerate(names)})
        results = {key: round_percent(value) for key, value in values.items()}
        results["ray_samples"] = float(self.samples)
        results["ray_origins_per_sample"] = self.origins / self.samples if self.samples else 0.0
        results["ray_samples_single_origin"] = float(self.single_origin_samples)
        return results


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
