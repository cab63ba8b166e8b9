"""Occ3D-nuScenes samples: ``gts/<scene>/<token>/labels.npz`` ground truth with both visibility masks.

Facts (Tsinghua-MARS-Lab/Occ3D and the CVPR 2023 occupancy challenge READMEs):

* ``labels.npz`` holds ``semantics``, ``mask_lidar`` and ``mask_camera``, each ``[200, 200, 16]``
  indexed ``[x, y, z]``; semantics 0 others .. 16 vegetation (the nuScenes-lidarseg classes) and 17
  free; the masks are 0/1 (0 = not observed by the accumulated LiDAR / by the current cameras).
* The grid is 0.4 m over ``[-40, -40, -1, 40, 40, 5.4]`` in the **ego frame at the key frame's
  (LiDAR's) timestamp**, so the camera extrinsics here map camera -> that ego frame.
* Only ``mask_camera`` counts in the standard evaluation; both masks are optional for training.

The reader remaps class ids on reading (see :mod:`spotocc.data.classes`): ``gt_occ`` has 0 = free,
1 = others .. 17 = vegetation, and 255 where ``gt_mask`` ("camera" or "lidar") says the voxel was not
observed ("none": every voxel labelled). Both masks are in every sample as ``mask_camera`` and
``mask_lidar`` (bool ``[X, Y, Z]``) for the metrics; ``meta["ray_origins"]`` holds RayIoU's ray
origins (see :meth:`Occ3DNuScenes.ray_origins`). Images, augmentation and depth targets are as in
:class:`~spotocc.data.NuScenesOccupancy` (depth_gt files keyed by image name); sample lists in both
forms are read by :mod:`spotocc.data.occ3d_samples`.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spotocc.config import AugmentationConfig
from spotocc.data.camera_views import CameraView, intrinsics_4x4, load_views
from spotocc.data.classes import IGNORE_INDEX, OCC3D_FREE, occ3d_to_model_ids
from spotocc.data.files import DataFileError, require_file
from spotocc.data.nuscenes_occ import CAMERAS
from spotocc.data.occ3d_samples import Occ3DRecord, load_sample_list
from spotocc.data.ray_origins import NUSCENES_LIDAR_ORIGIN, lidar_origins_in_ego, select_ray_origins
from spotocc.data.transforms import (
    BevFlips,
    bev_matrix,
    check_grid,
    check_input_size,
    flip_occupancy,
    sample_bev_flips,
)

OCC3D_GRID = ((-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), (200, 200, 16))  # (point_cloud_range, occ_size)
GT_KEYS = ("semantics", "mask_lidar", "mask_camera")
GT_MASKS = ("none", "camera", "lidar")


def read_labels(path: str | Path, occ_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(semantics uint8, mask_lidar bool, mask_camera bool)`` ``[X, Y, Z]`` of a ``labels.npz``, in
    Occ3D's own ids (0..17), checked: keys, shapes, id range, 0/1 masks."""
    path = require_file(path, "Occ3D labels file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in GT_KEYS if k not in npz.files]
            if missing:
                raise DataFileError(path, f"labels file lacks {missing} (has {sorted(npz.files)})")
            arrays = {k: npz[k] for k in GT_KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, DataFileError):
            raise
        raise DataFileError(path, f"labels file is not a readable .npz (truncated?): {err!r}") from err
    size = tuple(int(v) for v in occ_size)
    for key, array in arrays.items():
        if array.shape != size:
            raise DataFileError(path, f"{key} has shape {array.shape}, expected {size} (x, y, z)")
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise DataFileError(path, f"{key} has dtype {array.dtype}, expected integers")
    semantics = arrays["semantics"]
    if semantics.size and (semantics.min() < 0 or semantics.max() > OCC3D_FREE):
        raise DataFileError(
            path, f"semantics span {semantics.min()}..{semantics.max()}, expected 0..{OCC3D_FREE}"
        )
    masks = []
    for key in ("mask_lidar", "mask_camera"):
        mask = arrays[key]
        if mask.dtype != np.bool_ and mask.size and (mask.min() < 0 or mask.max() > 1):
            raise DataFileError(path, f"{key} holds values {mask.min()}..{mask.max()}, expected 0/1")
        masks.append(mask.astype(bool))
    return semantics.astype(np.uint8), masks[0], masks[1]


class Occ3DNuScenes(Dataset):
    """Occ3D-nuScenes samples in the :mod:`spotocc.data.batch` layout.

    Args:
        data_root: BEVDet infos: the nuScenes root (replaces ``./data/nuscenes`` in info paths);
            annotations.json: the folder holding ``imgs/``.
        sample_list: ``annotations.json`` or a BEVDet-style info ``.pkl`` (see :mod:`.occ3d_samples`).
        split: which ``<split>_split`` of an annotations.json (ignored for a .pkl).
        gts_root: the ``gts`` folder (``<scene>/<token>/labels.npz``); None: the list's own paths.
        depth_root: depth_gt folder, needed when ``train``.
        gt_mask: ``"camera"`` / ``"lidar"``: voxels outside that mask -> 255 in ``gt_occ``; ``"none"``.
        cameras, input_size, occ_size, point_cloud_range, augmentation, train, bgr_input, load_gt: as in
            :class:`~spotocc.data.NuScenesOccupancy`.
    """

    def __init__(
        self,
        data_root: str | Path,
        sample_list: str | Path,
        *,
        split: str = "train",
        gts_root: str | Path | None = None,
        depth_root: str | Path | None = None,
        gt_mask: str = "none",
        cameras: Sequence[str] = CAMERAS,
        input_size: Sequence[int] = (256, 704),
        occ_size: Sequence[int] = OCC3D_GRID[1],
        point_cloud_range: Sequence[float] = OCC3D_GRID[0],
        augmentation: AugmentationConfig | None = None,
        train: bool = False,
        bgr_input: bool = True,
        load_gt: bool = True,
    ) -> None:
        if not cameras:
            raise ValueError("Occ3DNuScenes needs at least one camera")
        if gt_mask not in GT_MASKS:
            raise ValueError(f"Occ3DNuScenes: gt_mask must be one of {GT_MASKS}, got {gt_mask!r}")
        self.data_root = Path(data_root)
        self.depth_root = Path(depth_root) if depth_root is not None else None
        if train and self.depth_root is None:
            raise ValueError(
                "Occ3DNuScenes(train=True) needs depth_root (the depth_gt folder) for depth targets"
            )
        self.cameras = tuple(cameras)
        self.input_size = check_input_size(input_size)
        check_grid(point_cloud_range, occ_size)
        self.occ_size = tuple(int(v) for v in occ_size)
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.augmentation = augmentation if augmentation is not None else AugmentationConfig()
        self.train, self.bgr_input, self.load_gt, self.gt_mask = train, bgr_input, load_gt, gt_mask
        self.sample_list = Path(sample_list)
        self.records: list[Occ3DRecord] = load_sample_list(
            self.sample_list, split, data_root=self.data_root, gts_root=gts_root, cameras=self.cameras
        )
        if not self.records:
            raise ValueError(f"{self.sample_list}: the sample list holds no samples for split {split!r}")
        self.scene_frames: dict[str, list[int]] = {}  # scene name -> its key frames' indices, in order
        for i, record in enumerate(self.records):
            if record.scene_name:
                self.scene_frames.setdefault(record.scene_name, []).append(i)

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self) -> np.random.Generator:
        # Seeded from torch so torch.manual_seed and DataLoader workers govern it (see SemanticKITTI).
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def camera_views(self, record: Occ3DRecord) -> list[CameraView]:
        """The cameras of a sample: camera -> ego (key frame) rotation and translation, K padded to 4x4."""
        views = []
        for camera in self.cameras:
            cam = record.cameras[camera]
            pose = torch.from_numpy(cam.cam_to_ego).to(torch.float32)  # [4, 4]
            views.append(
                CameraView(
                    cam.image_path,
                    cam.data_path,
                    pose[:3, :3].clone(),
                    pose[:3, 3].clone(),
                    intrinsics_4x4(cam.intrinsic),
                )
            )
        return views

    def ray_origins(self, index: int, flips: BevFlips | None = None) -> np.ndarray | None:
        """RayIoU's ray origins of sample ``index``, float64 ``[T, 3]`` metres in its (flipped) grid frame.

        The LiDAR origins of every key frame of its scene, chosen as SparseOcc does
        (:func:`~spotocc.evaluation.select_ray_origins`: within 39 m in x and y and inside the grid,
        at most 8). A list without LiDAR calibration (annotations.json) places each frame's LiDAR at
        :data:`~spotocc.data.ray_origins.NUSCENES_LIDAR_ORIGIN` in its ego frame. None without a
        scene name or on a grid of non-cubic voxels (RayIoU then casts from the sample's own LiDAR).
        """
        record = self.records[index]
        lo, hi = np.asarray(self.point_cloud_range[:3]), np.asarray(self.point_cloud_range[3:])
        voxel = (hi - lo) / np.asarray(self.occ_size)
        if not record.scene_name or not np.allclose(voxel, voxel[0]):
            return None
        frames = [self.records[i] for i in self.scene_frames[record.scene_name]]
        lidar_to_global = np.stack([f.ego_to_global @ _lidar_to_ego(f) for f in frames])  # [N, 4, 4]
        origins = lidar_origins_in_ego(record.ego_to_global, lidar_to_global)  # [N, 3]
        origins = select_ray_origins(origins, self.occ_size, tuple(lo), float(voxel[0])).numpy()  # [T, 3]
        flips = flips or BevFlips()
        for axis, flipped in enumerate((flips.x, flips.y, flips.z)):
            if flipped:  # mirrored about the range's centre, like the grid
                origins[:, axis] = lo[axis] + hi[axis] - origins[:, axis]
        return origins if len(origins) else None

    def labels(self, record: Occ3DRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gt_occ uint8 in model ids with gt_mask applied, mask_lidar, mask_camera)`` ``[X, Y, Z]``."""
        semantics, mask_lidar, mask_camera = read_labels(record.gt_path, self.occ_size)
        gt = occ3d_to_model_ids(semantics)
        if self.gt_mask != "none":
            gt[~(mask_camera if self.gt_mask == "camera" else mask_lidar)] = IGNORE_INDEX
        return gt, mask_lidar, mask_camera

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = self._rng()
        sample, paths = load_views(
            self.camera_views(record),
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
            gt, mask_lidar, mask_camera = self.labels(record)
            sample["gt_occ"] = torch.from_numpy(flip_occupancy(gt, flips))  # uint8 [X, Y, Z]
            sample["mask_lidar"] = torch.from_numpy(flip_occupancy(mask_lidar, flips))  # bool [X, Y, Z]
            sample["mask_camera"] = torch.from_numpy(flip_occupancy(mask_camera, flips))  # bool [X, Y, Z]
        sample["bda"] = bev_matrix(flips, self.point_cloud_range)  # [4, 4]
        sample["meta"] = {
            "sample_id": record.token,
            "dataset": "occ3d-nuscenes",
            "scene_name": record.scene_name,
            "timestamp": record.timestamp,
            "prev": record.prev,
            "next": record.next,
            "gt_path": str(record.gt_path),
            "ego_to_global": record.ego_to_global.tolist(),  # 4x4, ego at the key frame -> global
            "lidar_to_ego": None if record.lidar_to_ego is None else record.lidar_to_ego.tolist(),
            "image_paths": paths,
            "bev_flips": (flips.x, flips.y, flips.z),
        }
        origins = self.ray_origins(index, flips)
        sample["meta"]["ray_origins"] = None if origins is None else origins.tolist()  # [T, 3] metres
        return sample


def _lidar_to_ego(record: Occ3DRecord) -> np.ndarray:
    """The record's LiDAR -> ego pose, or nuScenes' LIDAR_TOP position where the list has none."""
    if record.lidar_to_ego is not None:
        return record.lidar_to_ego
    pose = np.eye(4)
    pose[:3, 3] = NUSCENES_LIDAR_ORIGIN
    return pose
