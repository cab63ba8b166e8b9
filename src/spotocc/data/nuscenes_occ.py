"""nuScenes-Occupancy (OpenOccupancy) samples, read from the released info files (spec 04 section 2).

Inputs:

* ``info_file``: a pickle ``{"infos": [...], "metadata": {...}}`` as OpenOccupancy ships it (or as
  ``spotocc prepare nuscenes`` writes it). It is loaded with a **restricted unpickler** that accepts
  only plain containers, strings, numbers and numpy arrays; anything else is refused with an error
  before it is constructed. Infos are sorted by timestamp (stable), as mmdet3d does.
* images: ``info["cams"][name]["data_path"]``; the released ``./data/nuscenes`` prefix is replaced by
  ``data_root``, other relative paths are taken relative to ``data_root``.
* ground truth: ``occ_root/scene_<scene_token>/occupancy/<lidar_token>.npy``, rows
  ``(z, y, x, label)`` of occupied voxels. Label 0 (noise) -> 255, unlisted voxels -> 0 (empty),
  several rows on one voxel -> the most frequent label (ties: the smallest id).
* depth targets (training only): ``depth_root/<image file name>.bin``, float32 rows ``(u, v, d)`` at
  the original resolution, moved through the image augmentation, truncated, last write wins.

Cameras are picked by name in the configured order. ``rots``/``trans`` = ``sensor2lidar`` (the
released float64 round trip through ``lidar2cam``), intrinsics = ``cam_intrinsic`` padded to 4x4
(4th column 0). The image channel order follows ``bgr_input`` (True as released, see
:func:`spotocc.data.transforms.normalize_image`). BEV augmentation is off as released; if enabled it
flips x and y about the range centre (the released nuScenes loader has no z flip).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spotocc.config import AugmentationConfig
from spotocc.data.camera_views import CameraView, intrinsics_4x4, load_views
from spotocc.data.camera_views import depth_path as depth_path  # re-exported: check.py and users
from spotocc.data.camera_views import read_depth_points as read_depth_points
from spotocc.data.files import DataFileError, check_matrix, load_npy, load_restricted_pickle
from spotocc.data.transforms import (
    BevFlips,
    bev_matrix,
    check_grid,
    check_input_size,
    flip_occupancy,
    sample_bev_flips,
)

CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
INFO_KEYS = ("token", "timestamp", "scene_token", "lidar_token", "cams")
CAMERA_KEYS = ("data_path", "cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation")
RELEASED_ROOT_PREFIXES = ("./data/nuscenes", "data/nuscenes")
IGNORE = 255


# --------------------------------------------------------------------------------------------------
# Info files


def check_info(info: Any, index: int, path: Path, cameras: Sequence[str]) -> None:
    """Raise :class:`DataFileError` naming ``path`` and the sample if ``info`` lacks what the reader needs."""
    where = f"infos[{index}]"
    if not isinstance(info, dict):
        raise DataFileError(path, f"{where} is a {type(info).__name__}, expected a dict")
    missing = [k for k in INFO_KEYS if k not in info]
    if missing:
        raise DataFileError(path, f"{where} (token {info.get('token', '?')}) is missing keys {missing}")
    where = f"infos[{index}] (token {info['token']})"
    if not isinstance(info["cams"], dict):
        raise DataFileError(path, f"{where}['cams'] is not a dict")
    for camera in cameras:
        if camera not in info["cams"]:
            raise DataFileError(path, f"{where} has no camera {camera} (has {sorted(info['cams'])})")
        cam = info["cams"][camera]
        if not isinstance(cam, dict):
            raise DataFileError(path, f"{where}['cams'][{camera!r}] is not a dict")
        missing = [k for k in CAMERA_KEYS if k not in cam]
        if missing:
            raise DataFileError(path, f"{where}['cams'][{camera!r}] is missing keys {missing}")
        check_matrix(cam["cam_intrinsic"], (3, 3), f"{where} {camera} cam_intrinsic", path)
        rot = check_matrix(
            cam["sensor2lidar_rotation"], (3, 3), f"{where} {camera} sensor2lidar_rotation", path
        )
        check_matrix(
            cam["sensor2lidar_translation"], (3,), f"{where} {camera} sensor2lidar_translation", path
        )
        if abs(np.linalg.det(rot)) < 1e-6:
            raise DataFileError(path, f"{where} {camera} sensor2lidar_rotation is singular")


def read_info_list(path: str | Path) -> list[Any]:
    """The (unchecked) ``infos`` list of an info pickle, loaded with the restricted unpickler."""
    path = Path(path)
    data = load_restricted_pickle(path, "info file")
    if isinstance(data, dict):
        if "infos" not in data:
            raise DataFileError(path, f"info file has no 'infos' entry (keys: {sorted(map(str, data))})")
        infos = data["infos"]
    else:
        infos = data
    if not isinstance(infos, list):
        raise DataFileError(path, f"'infos' is a {type(infos).__name__}, expected a list")
    return infos


def load_infos(path: str | Path, cameras: Sequence[str] = CAMERAS) -> list[dict[str, Any]]:
    """The checked info list of an info pickle, sorted by timestamp (stable)."""
    path = Path(path)
    infos = read_info_list(path)
    for i, info in enumerate(infos):
        check_info(info, i, path, cameras)
    return sorted(infos, key=lambda info: info["timestamp"])


def resolve_data_path(path: str, data_root: str | Path) -> Path:
    """An info file's image/LiDAR path on this machine (the released prefix replaced by ``data_root``)."""
    for prefix in RELEASED_ROOT_PREFIXES:
        if path.startswith(prefix + "/"):
            return Path(data_root) / path[len(prefix) + 1 :]
    return Path(path) if os.path.isabs(path) else Path(data_root) / path


def occupancy_path(occ_root: str | Path, info: dict[str, Any]) -> Path:
    return Path(occ_root) / f"scene_{info['scene_token']}" / "occupancy" / f"{info['lidar_token']}.npy"


# --------------------------------------------------------------------------------------------------
# Ground truth


def read_sparse_occupancy(path: str | Path, occ_size: Sequence[int], num_classes: int = 17) -> np.ndarray:
    """The sparse GT rows ``[M, 4]`` (z, y, x, label) of a ``.npy`` file, checked; int64."""
    rows = load_npy(path, "occupancy file")
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise DataFileError(
            path, f"occupancy array has shape {rows.shape}, expected [N, 4] rows (z, y, x, label)"
        )
    if not np.issubdtype(rows.dtype, np.number) or np.issubdtype(rows.dtype, np.complexfloating):
        raise DataFileError(path, f"occupancy array has dtype {rows.dtype}, expected integers")
    floating = np.issubdtype(rows.dtype, np.floating)
    if floating and rows.size and not (np.isfinite(rows).all() and (rows == np.round(rows)).all()):
        raise DataFileError(path, "occupancy array holds non-integer values")
    rows = rows.astype(np.int64)
    size_zyx = (occ_size[2], occ_size[1], occ_size[0])
    for column, (name, size) in enumerate(zip("zyx", size_zyx)):
        values = rows[:, column]
        if values.size and (values.min() < 0 or values.max() >= size):
            raise DataFileError(
                path,
                f"occupancy {name} indices span {values.min()}..{values.max()}, "
                f"outside the grid 0..{size - 1} (occ_size {tuple(occ_size)})",
            )
    labels = rows[:, 3]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFileError(
            path, f"occupancy labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    return rows


def densify_occupancy(rows: np.ndarray, occ_size: Sequence[int]) -> np.ndarray:
    """Sparse rows (z, y, x, label) -> uint8 ``[X, Y, Z]``: noise 0 -> 255, unlisted -> 0.

    Several rows on one voxel: the most frequent label wins, ties go to the smallest label (the
    released per-voxel 256-slot count and argmax).
    """
    size_x, size_y, size_z = (int(v) for v in occ_size)
    dense = np.zeros((size_x, size_y, size_z), dtype=np.uint8)
    if rows.shape[0] == 0:
        return dense
    if rows[:, 3].min() < 0 or rows[:, 3].max() > 255:
        raise ValueError("densify_occupancy: labels must be in 0..255")
    labels = rows[:, 3].astype(np.uint8)
    labels[labels == 0] = IGNORE
    flat = (rows[:, 2] * size_y + rows[:, 1]) * size_z + rows[:, 0]
    flat_dense = dense.reshape(-1)
    flat_dense[flat] = labels
    if np.array_equal(flat_dense[flat], labels):
        # Every row agrees with what its voxel holds, so all rows of a voxel share one label: that
        # label is also the most frequent one. This is the usual case (no conflicting duplicates).
        return dense
    # Vote only where rows disagree: the voxels of the rows whose label did not stick.
    conflicted = np.zeros(flat_dense.shape, dtype=bool)
    conflicted[flat[flat_dense[flat] != labels]] = True
    in_conflict = conflicted[flat]
    flat, labels = flat[in_conflict], labels[in_conflict].astype(np.int64)
    keys, counts = np.unique(flat * 256 + labels, return_counts=True)  # sorted by (voxel, label)
    cells, cell_labels = keys // 256, keys % 256
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
    best = counts == np.maximum.reduceat(counts, starts)[run]
    candidates = np.flatnonzero(best)  # per voxel the first maximum is the smallest label
    first = candidates[np.r_[True, run[candidates][1:] != run[candidates][:-1]]]
    flat_dense[cells[first]] = cell_labels[first]
    return dense


def load_occupancy(path: str | Path, occ_size: Sequence[int], num_classes: int = 17) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` ground truth of one OpenOccupancy ``.npy`` file."""
    return densify_occupancy(read_sparse_occupancy(path, occ_size, num_classes), occ_size)


# --------------------------------------------------------------------------------------------------
# Dataset


class NuScenesOccupancy(Dataset):
    """nuScenes-Occupancy samples in the :mod:`spotocc.data.batch` layout.

    Args:
        data_root: nuScenes root (``samples/...``); replaces ``./data/nuscenes`` in info paths.
        info_file: OpenOccupancy info pickle (see module docstring).
        occ_root: nuScenes-Occupancy GT root (``scene_<token>/occupancy/<lidar token>.npy``).
        depth_root: depth_gt folder, needed when ``train``.
        cameras: camera names in network order.
        input_size: network input ``(H, W)``; occ_size / point_cloud_range: the GT grid.
        augmentation: image-view (and optional BEV) augmentation settings, used when ``train``.
        train: random augmentation and depth targets; otherwise the fixed test transform.
        bgr_input: the released channel-order quirk (default True).
        load_gt: read the occupancy GT (``gt_occ``); False for data without annotations.
        num_classes: label range of the GT files (17: 0 noise + 16 classes).
    """

    def __init__(
        self,
        data_root: str | Path,
        info_file: str | Path,
        occ_root: str | Path,
        *,
        depth_root: str | Path | None = None,
        cameras: Sequence[str] = CAMERAS,
        input_size: Sequence[int] = (256, 704),
        occ_size: Sequence[int] = (512, 512, 40),
        point_cloud_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        augmentation: AugmentationConfig | None = None,
        train: bool = False,
        bgr_input: bool = True,
        load_gt: bool = True,
        num_classes: int = 17,
    ) -> None:
        self.data_root = Path(data_root)
        self.occ_root = Path(occ_root)
        self.depth_root = Path(depth_root) if depth_root is not None else None
        if not cameras:
            raise ValueError("NuScenesOccupancy needs at least one camera")
        self.cameras = tuple(cameras)
        self.input_size = check_input_size(input_size)
        check_grid(point_cloud_range, occ_size)
        self.occ_size = tuple(int(v) for v in occ_size)
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.augmentation = augmentation if augmentation is not None else AugmentationConfig()
        self.train = train
        self.bgr_input = bgr_input
        self.load_gt = load_gt
        self.num_classes = num_classes
        if train and self.depth_root is None:
            raise ValueError(
                "NuScenesOccupancy(train=True) needs depth_root (the depth_gt folder) for depth targets"
            )
        self.info_file = Path(info_file)
        self.infos = load_infos(self.info_file, self.cameras)
        if not self.infos:
            raise ValueError(f"{self.info_file}: the info file holds no samples")

    def __len__(self) -> int:
        return len(self.infos)

    def _rng(self) -> np.random.Generator:
        # Seeded from torch so torch.manual_seed and DataLoader workers govern it (see SemanticKITTI).
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def camera_geometry(self, cam: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rots [3, 3], trans [3], intrins [4, 4])`` of one camera, as the released loader forms them."""
        rot = np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64)
        tran = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64)
        # The released dataset builds lidar2cam in float64 and the loader inverts it back before the
        # float32 cast; keep that round trip so the numbers match to the last bit.
        lidar2cam_r = np.linalg.inv(rot)
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = lidar2cam_r
        lidar2cam[:3, 3] = -(tran @ lidar2cam_r.T)
        cam2lidar = torch.linalg.inv(torch.from_numpy(lidar2cam)).to(torch.float32)
        return cam2lidar[:3, :3].clone(), cam2lidar[:3, 3].clone(), intrinsics_4x4(cam["cam_intrinsic"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.infos[index]
        rng = self._rng()
        views = []
        for camera in self.cameras:
            cam = info["cams"][camera]
            rot, tran, intrin = self.camera_geometry(cam)
            path = resolve_data_path(str(cam["data_path"]), self.data_root)
            views.append(CameraView(path, str(cam["data_path"]), rot, tran, intrin))
        sample, paths = load_views(
            views,
            input_size=self.input_size,
            augmentation=self.augmentation,
            train=self.train,
            rng=rng,
            bgr_input=self.bgr_input,
            depth_root=self.depth_root if self.train else None,
        )
        flips = BevFlips()
        if self.train and self.augmentation.bda:
            flips = sample_bev_flips(self.augmentation, rng, allow_z=False)
        if self.load_gt:
            gt = load_occupancy(occupancy_path(self.occ_root, info), self.occ_size, self.num_classes)
            sample["gt_occ"] = torch.from_numpy(flip_occupancy(gt, flips))  # uint8 [X, Y, Z]
        sample["bda"] = bev_matrix(flips, self.point_cloud_range)  # [4, 4]
        sample["meta"] = {
            "sample_id": str(info["token"]),
            "dataset": "nuscenes-occupancy",
            "scene_token": str(info["scene_token"]),
            "lidar_token": str(info["lidar_token"]),
            "timestamp": int(info["timestamp"]),
            "image_paths": paths,
            "bev_flips": (flips.x, flips.y, flips.z),
        }
        return sample
