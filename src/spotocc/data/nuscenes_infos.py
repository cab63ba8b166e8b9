"""nuScenes-Occupancy info files, written with nuscenes-devkit (``spotocc prepare nuscenes``).

``spotocc prepare occ3d`` writes the same infos as ``bevdetv2-nuscenes_infos_<split>.pkl`` with
BEVDet's ``occ_path`` per sample: :class:`spotocc.data.Occ3DNuScenes` reads them (it needs
``token``, ``timestamp``, ``scene_name``, the LiDAR's ``ego2global_*`` / ``lidar2ego_*`` and each
camera's ``data_path``, ``cam_intrinsic``, ``sensor2ego_*`` and ``ego2global_*``).

:func:`create_nuscenes_infos` writes ``<out-dir>/nuscenes_occ_infos_train.pkl`` and
``..._val.pkl`` (``..._test.pkl`` for ``v1.0-test``): ``{"infos": [...], "metadata": {"version":
...}}`` with, per key frame, the fields of OpenOccupancy's released infos that
:class:`spotocc.data.NuScenesOccupancy` reads, and the poses they come from:

* ``token``, ``timestamp``, ``scene_token``, ``scene_name``, ``lidar_token``, ``lidar_path``,
  ``prev``, ``next``, ``frame_idx``, ``lidar2ego_*``, ``ego2global_*`` (quaternions w, x, y, z);
* ``cams[CAM_*]``: ``data_path``, ``type``, ``sample_data_token``, ``timestamp``, ``cam_intrinsic``
  (3x3), ``sensor2ego_*``, ``ego2global_*`` (at the camera's timestamp) and ``sensor2lidar_rotation``
  / ``sensor2lidar_translation``: camera -> ego (camera time) -> global -> ego (LiDAR time) -> LiDAR,
  so ``p_lidar = R @ p_cam + t`` includes the ego motion between the two timestamps.

Paths are written as ``./data/nuscenes/<file>`` like the released files (the reader replaces that
prefix with its data root). Not written: CAN-bus vectors, LiDAR sweeps, boxes and lidarseg paths,
which no spotocc reader uses. Splits are the devkit's (train/val, mini_train/mini_val, test); scenes
whose first LiDAR file is absent are skipped, as the released converter does.

nuscenes-devkit is an optional dependency: ``pip install 'spotocc[nuscenes]'``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
VERSIONS = ("v1.0-trainval", "v1.0-mini", "v1.0-test")
PATH_PREFIX = "./data/nuscenes/"


def quaternion_matrix(q: Sequence[float]) -> np.ndarray:
    """3x3 rotation of a unit quaternion (w, x, y, z) (normalised first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _pose(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = quaternion_matrix(rotation)
    pose[:3, 3] = np.asarray(translation, dtype=np.float64)
    return pose


def sensor_to_lidar(
    sensor2ego: tuple[Sequence[float], Sequence[float]],
    sensor_ego2global: tuple[Sequence[float], Sequence[float]],
    lidar2ego: tuple[Sequence[float], Sequence[float]],
    lidar_ego2global: tuple[Sequence[float], Sequence[float]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(R [3, 3], t [3])`` with ``p_lidar = R @ p_sensor + t``; each pose is (quaternion, translation)."""
    chain = (
        np.linalg.inv(_pose(*lidar2ego))
        @ np.linalg.inv(_pose(*lidar_ego2global))
        @ _pose(*sensor_ego2global)
        @ _pose(*sensor2ego)
    )
    return chain[:3, :3], chain[:3, 3]


def _import_devkit() -> tuple[Any, Any]:
    try:
        from nuscenes.nuscenes import NuScenes
        from nuscenes.utils import splits
    except ImportError as err:
        raise RuntimeError(
            "spotocc prepare nuscenes needs nuscenes-devkit, an optional dependency: "
            "pip install 'spotocc[nuscenes]' (or pip install nuscenes-devkit)"
        ) from err
    return NuScenes, splits


def _split_scenes(splits: Any, version: str) -> dict[str, list[str]]:
    if version == "v1.0-trainval":
        return {"train": list(splits.train), "val": list(splits.val)}
    if version == "v1.0-mini":
        return {"train": list(splits.mini_train), "val": list(splits.mini_val)}
    if version == "v1.0-test":
        return {"test": list(splits.test)}
    raise ValueError(f"unknown nuScenes version {version!r}; expected one of {VERSIONS}")


def _calibrated(nusc: Any, sample_data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"]),
        nusc.get("ego_pose", sample_data["ego_pose_token"]),
    )


def sample_info(nusc: Any, sample: dict[str, Any], frame_idx: int) -> dict[str, Any]:
    """The info dict of one key frame."""
    lidar_token = sample["data"]["LIDAR_TOP"]
    lidar_sd = nusc.get("sample_data", lidar_token)
    lidar_cs, lidar_pose = _calibrated(nusc, lidar_sd)
    info: dict[str, Any] = {
        "token": sample["token"],
        "timestamp": sample["timestamp"],
        "scene_token": sample["scene_token"],
        "scene_name": nusc.get("scene", sample["scene_token"])["name"],
        "lidar_token": lidar_token,
        "lidar_path": PATH_PREFIX + lidar_sd["filename"],
        "prev": sample["prev"],
        "next": sample["next"],
        "frame_idx": frame_idx,
        "lidar2ego_translation": list(lidar_cs["translation"]),
        "lidar2ego_rotation": list(lidar_cs["rotation"]),
        "ego2global_translation": list(lidar_pose["translation"]),
        "ego2global_rotation": list(lidar_pose["rotation"]),
        "cams": {},
    }
    for camera in CAMERAS:
        cam_sd = nusc.get("sample_data", sample["data"][camera])
        cam_cs, cam_pose = _calibrated(nusc, cam_sd)
        rot, tran = sensor_to_lidar(
            (cam_cs["rotation"], cam_cs["translation"]),
            (cam_pose["rotation"], cam_pose["translation"]),
            (lidar_cs["rotation"], lidar_cs["translation"]),
            (lidar_pose["rotation"], lidar_pose["translation"]),
        )
        info["cams"][camera] = {
            "data_path": PATH_PREFIX + cam_sd["filename"],
            "type": camera,
            "sample_data_token": cam_sd["token"],
            "timestamp": cam_sd["timestamp"],
            "sensor2ego_translation": list(cam_cs["translation"]),
            "sensor2ego_rotation": list(cam_cs["rotation"]),
            "ego2global_translation": list(cam_pose["translation"]),
            "ego2global_rotation": list(cam_pose["rotation"]),
            "cam_intrinsic": np.asarray(cam_cs["camera_intrinsic"], dtype=np.float64),
            "sensor2lidar_rotation": rot,
            "sensor2lidar_translation": tran,
        }
    return info


def _available_scene_tokens(nusc: Any) -> tuple[dict[str, str], list[str]]:
    """Scene name -> token of scenes whose first LiDAR file exists, and the names skipped."""
    available, skipped = {}, []
    for scene in nusc.scene:
        first = nusc.get("sample", scene["first_sample_token"])
        if Path(nusc.get_sample_data_path(first["data"]["LIDAR_TOP"])).is_file():
            available[scene["name"]] = scene["token"]
        else:
            skipped.append(scene["name"])
    return available, skipped


def create_nuscenes_infos(
    data_root: str | Path,
    version: str,
    out_dir: str | Path,
    prefix: str = "nuscenes_occ",
    *,
    occ3d_paths: bool = False,
) -> dict[str, Path]:
    """Write ``<out_dir>/<prefix>_infos_<split>.pkl`` per split; returns split -> path.

    ``occ3d_paths``: also give every sample BEVDet's ``occ_path``, ``./data/nuscenes/gts/<scene
    name>/<token>`` (the Occ3D-nuScenes ground truth folder), as ``spotocc prepare occ3d`` does.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown nuScenes version {version!r}; expected one of {VERSIONS}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"nuScenes data root {data_root} does not exist")
    NuScenes, splits = _import_devkit()
    try:
        nusc = NuScenes(version=version, dataroot=str(data_root), verbose=False)
    except (AssertionError, OSError, KeyError, ValueError) as err:  # the devkit asserts on missing tables
        raise RuntimeError(f"nuscenes-devkit could not load {version} from {data_root}: {err!r}") from err
    scene_names = _split_scenes(splits, version)
    available, skipped = _available_scene_tokens(nusc)
    if skipped:
        print(f"skipping {len(skipped)} scenes whose LiDAR files are absent: {', '.join(skipped[:10])}")
    split_of_scene = {
        available[name]: split for split, names in scene_names.items() for name in names if name in available
    }
    infos: dict[str, list[dict[str, Any]]] = {split: [] for split in scene_names}
    frame_idx = 0
    for sample in nusc.sample:
        split = split_of_scene.get(sample["scene_token"])
        if split is not None:
            info = sample_info(nusc, sample, frame_idx)
            if occ3d_paths:
                info["occ_path"] = f"{PATH_PREFIX}gts/{info['scene_name']}/{info['token']}"
            infos[split].append(info)
        # Running index within a scene (as released: reset after a scene's last sample).
        frame_idx = 0 if sample["next"] == "" else frame_idx + 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, split_infos in infos.items():
        path = out_dir / f"{prefix}_infos_{split}.pkl"
        tmp = path.with_suffix(".pkl.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"infos": split_infos, "metadata": {"version": version}}, f, protocol=4)
        tmp.replace(path)  # atomic: a killed run never leaves half a file
        written[split] = path
        print(f"{split}: {len(split_infos)} samples -> {path}")
    return written
