"""Writing samples in the nuScenes-Occupancy (OpenOccupancy) layout (spec 04, section 2).

::

    <out>/nuscenes/samples/CAM_*/<name>.jpg                      6 cameras per sample
    <out>/nuscenes/samples/LIDAR_TOP/<name>.pcd.bin              float32 [N, 5]: x, y, z, intensity, ring
    <out>/nuscenes/nuscenes_occ_infos_{train,val}.pkl            {"infos": [...], "metadata": {...}}
    <out>/nuScenes-Occupancy/scene_<scene>/occupancy/<lidar>.npy int64 [N, 4] rows (z, y, x, label)
    <out>/depth_gt/<jpg name>.bin                                float32 rows (u, v, depth), source pixels

Paths inside the infos start with ``./data/nuscenes`` like the released ones (readers replace that
prefix by their data root). Every sample is its own scene (``prev``/``next`` empty, ``frame_idx`` 0);
the car stands still, so every camera shares the LiDAR's timestamp and ego pose.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spotocc.data.synthetic.geometry import (
    NUSCENES_LIDAR_TO_EGO_ROTATION,
    NUSCENES_LIDAR_TO_EGO_TRANSLATION,
    rotation_to_quaternion,
)
from spotocc.data.synthetic.sample import SyntheticSample

INFO_PREFIX = "./data/nuscenes"
INFO_FILES = {"train": "nuscenes_occ_infos_train.pkl", "val": "nuscenes_occ_infos_val.pkl"}
VERSION = "v1.0-synthetic"
_T0 = 1_600_000_000_000_000  # microseconds


def token(*parts: Any) -> str:
    """A 32-hex-digit token, deterministic in ``parts``."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def depth_rows(sample: SyntheticSample, cam_index: int) -> np.ndarray:
    """float32 [N, 3] rows (u, v, depth): LiDAR points in front of the camera, strictly inside the image
    by one pixel (the BEVDepth / OpenOccupancy recipe)."""
    cam = sample.cameras[cam_index]
    uv, depth = cam.project(sample.lidar.points[:, :3].astype(np.float64))
    keep = (
        (depth > 0)
        & (uv[:, 0] > 1)
        & (uv[:, 0] < cam.width - 1)
        & (uv[:, 1] > 1)
        & (uv[:, 1] < cam.height - 1)
    )
    return np.concatenate([uv[keep], depth[keep, None]], axis=1).astype(np.float32)


def write_sample(out: Path, sample: SyntheticSample, seed: int) -> tuple[dict[str, Any], list[Path]]:
    """Write one sample's camera images, LiDAR scan, occupancy and depth files; return its info dict."""
    split, index = sample.split, sample.index
    timestamp = _T0 + (0 if split == "train" else 10**12) + 500_000 * index
    stem = f"n000-synthetic-{seed}"
    sample_token = token("sample", seed, split, index)
    scene_token = token("scene", seed, split, index)
    lidar_token = token("LIDAR_TOP", seed, split, index)
    files: list[Path] = []
    pose_rng = np.random.default_rng([int(seed), 0 if split == "train" else 1, int(index), 7])
    yaw = float(pose_rng.uniform(-np.pi, np.pi))
    ego_to_global_rot = np.array(
        [[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0, 0, 1.0]]
    )
    ego_to_global = {
        "ego2global_translation": [float(v) for v in pose_rng.uniform(300.0, 1500.0, 2)] + [0.0],
        "ego2global_rotation": rotation_to_quaternion(ego_to_global_rot),
    }
    # LiDAR scan (nuScenes .pcd.bin: x, y, z, intensity 0..255, ring index).
    lidar_name = f"{stem}__LIDAR_TOP__{timestamp}.pcd.bin"
    lidar_path = out / "nuscenes" / "samples" / "LIDAR_TOP" / lidar_name
    lidar_path.parent.mkdir(parents=True, exist_ok=True)
    pts = sample.lidar.points
    pcd = np.concatenate([pts[:, :3], 255.0 * pts[:, 3:4], sample.lidar.ring[:, None]], axis=1)
    pcd.astype("<f4").tofile(lidar_path)
    files.append(lidar_path)
    cams: dict[str, dict[str, Any]] = {}
    for i, (cam, K, rot, trans) in enumerate(sample.extras["rig"]):
        name = f"{stem}__{cam.name}__{timestamp}.jpg"
        img_path = out / "nuscenes" / "samples" / cam.name / name
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.renders[i].image).save(img_path, format="JPEG", quality=95, subsampling=0)
        depth_path = out / "depth_gt" / f"{name}.bin"
        depth_path.parent.mkdir(parents=True, exist_ok=True)
        depth_rows(sample, i).reshape(-1).tofile(depth_path)
        files += [img_path, depth_path]
        cams[cam.name] = {
            "data_path": f"{INFO_PREFIX}/samples/{cam.name}/{name}",
            "type": cam.name,
            "sample_data_token": token(cam.name, seed, split, index),
            "sensor2ego_translation": [float(v) for v in trans],
            "sensor2ego_rotation": rotation_to_quaternion(rot),
            **ego_to_global,
            "timestamp": timestamp,
            "cam_intrinsic": K.copy(),
            "sensor2lidar_rotation": cam.cam_to_grid[:3, :3].copy(),
            "sensor2lidar_translation": cam.cam_to_grid[:3, 3].copy(),
        }
    # Occupancy: one row per occupied voxel, columns (z, y, x, label); label 0 = noise.
    occ_path = out / "nuScenes-Occupancy" / f"scene_{scene_token}" / "occupancy" / f"{lidar_token}.npy"
    occ_path.parent.mkdir(parents=True, exist_ok=True)
    x, y, z = np.nonzero(sample.occupied)
    rows = np.stack([z, y, x, sample.labels[x, y, z]], axis=1).astype(np.int64)
    np.save(occ_path, rows)
    files.append(occ_path)
    info = {
        "lidar_path": f"{INFO_PREFIX}/samples/LIDAR_TOP/{lidar_name}",
        "token": sample_token,
        "prev": "",
        "next": "",
        "can_bus": np.zeros(18),
        "frame_idx": 0,
        "sweeps": [],
        "cams": cams,
        "scene_token": scene_token,
        "scene_name": f"synthetic-{split}-{index:05d}",
        "lidar_token": lidar_token,
        "lidar2ego_translation": list(NUSCENES_LIDAR_TO_EGO_TRANSLATION),
        "lidar2ego_rotation": rotation_to_quaternion(NUSCENES_LIDAR_TO_EGO_ROTATION),
        **ego_to_global,
        "timestamp": timestamp,
        "gt_boxes": np.zeros((0, 7)),
        "gt_names": np.array([], dtype="<U1"),
        "gt_velocity": np.zeros((0, 2)),
        "num_lidar_pts": np.zeros(0, dtype=np.int64),
        "num_radar_pts": np.zeros(0, dtype=np.int64),
        "valid_flag": np.zeros(0, dtype=bool),
    }
    return info, files


def write_infos(out: Path, split: str, infos: list[dict[str, Any]]) -> Path:
    """The info pickle of a split, sorted by timestamp as mmdet3d loads it."""
    path = out / "nuscenes" / INFO_FILES[split]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"infos": sorted(infos, key=lambda i: i["timestamp"]), "metadata": {"version": VERSION}}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path
