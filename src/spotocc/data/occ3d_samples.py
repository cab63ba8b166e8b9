"""Occ3D-nuScenes sample lists in either of their two forms, read into one record per key frame.

* **Occ3D's ``annotations.json``** (Tsinghua-MARS-Lab/Occ3D README): ``train_split`` / ``val_split``
  (scene names) and ``scene_infos[scene][sample token]`` holding ``timestamp``, ``ego_pose``
  (``translation`` [3], ``rotation`` quaternion w, x, y, z: ego -> global at the key frame),
  ``gt_path``, ``prev``, ``next`` and ``camera_sensor[CAM_*]`` with ``img_path``, ``intrinsic``
  (3x3; some releases spell it ``intrinsics``), ``extrinsic`` (camera -> ego at the camera's
  timestamp) and ``ego_pose`` (ego -> global at the camera's timestamp). Samples come in the file's
  order: the split's scenes in list order, each scene's frames in the order written (by time).
  Images: ``<data_root>/imgs/<img_path>``; ground truth: ``<gts_root>/<scene>/<token>/labels.npz``,
  or without ``gts_root`` the ``gt_path`` relative to the file's folder.
* **BEVDet-style infos** (``bevdetv2-nuscenes_infos_{train,val}.pkl``, written by BEVDet's and
  FlashOCC's ``tools/create_data_bevdet.py``): ``{"infos": [...]}`` with, per key frame, ``token``,
  ``timestamp``, ``scene_name``, ``occ_path`` (``./data/nuscenes/gts/<scene>/<token>``, a folder
  holding ``labels.npz``), the LiDAR's ``lidar2ego_*`` and ``ego2global_*`` and ``cams[CAM_*]``
  with ``data_path``, ``cam_intrinsic``, ``sensor2ego_*`` and ``ego2global_*`` (quaternions w, x, y,
  z). Loaded with the restricted unpickler and sorted by timestamp (stable), as mmdet3d does. Paths
  starting with ``./data/nuscenes`` are taken relative to ``data_root``; with ``gts_root`` the
  ground truth is ``<gts_root>/<scene_name>/<token>/labels.npz``.

The grid frame is the ego frame at the key frame's (LiDAR's) timestamp, so every camera is mapped
camera -> ego (camera time) -> global -> ego (key frame): ``cam_to_ego = inv(E_key) @ E_cam @ C``.
BEVDet and FlashOCC take camera 0's ego pose as the key pose instead; the cameras fire within about
50 ms of the LiDAR, so the two differ by centimetres.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotocc.data.files import DataFileError, check_matrix, load_restricted_pickle, require_file
from spotocc.data.nuscenes_infos import quaternion_matrix
from spotocc.data.nuscenes_occ import CAMERAS, resolve_data_path

LABELS_FILE = "labels.npz"


@dataclass(frozen=True)
class CameraRecord:
    image_path: Path  # the image on this machine
    data_path: str  # the image path as written in the list (its base name names the depth file)
    intrinsic: np.ndarray  # float64 [3, 3]
    cam_to_ego: np.ndarray  # float64 [4, 4]: camera -> ego at the key frame (the grid frame)


@dataclass(frozen=True)
class Occ3DRecord:
    """One key frame: identity, cameras, poses and its ground-truth file."""

    token: str
    scene_name: str
    timestamp: int | str
    cameras: dict[str, CameraRecord]
    ego_to_global: np.ndarray  # float64 [4, 4]: ego at the key frame -> global
    lidar_to_ego: np.ndarray | None  # float64 [4, 4]; None where the list has no LiDAR calibration
    gt_path: Path
    prev: str = ""
    next: str = ""


def load_sample_list(
    path: str | Path,
    split: str,
    *,
    data_root: str | Path,
    gts_root: str | Path | None = None,
    cameras: Sequence[str] = CAMERAS,
) -> list[Occ3DRecord]:
    """The samples of ``split`` in a ``.json`` (annotations) or ``.pkl`` (BEVDet infos) sample list."""
    path = Path(path)
    if path.suffix == ".json":
        return read_annotations(path, split, data_root=data_root, gts_root=gts_root, cameras=cameras)
    if path.suffix == ".pkl":
        return read_bevdet_infos(path, data_root=data_root, gts_root=gts_root, cameras=cameras)
    raise DataFileError(path, "an Occ3D sample list must be annotations.json or a BEVDet info .pkl")


# --------------------------------------------------------------------------------------------------
# Poses


def pose_matrix(rotation: Any, translation: Any, where: str, path: Path) -> np.ndarray:
    """float64 [4, 4] of a quaternion (w, x, y, z) and a translation, checked."""
    q = check_matrix(rotation, (4,), f"{where} rotation", path)
    if np.linalg.norm(q) < 1e-6:
        raise DataFileError(path, f"{where} rotation is a zero quaternion")
    pose = np.eye(4)
    pose[:3, :3] = quaternion_matrix(q)
    pose[:3, 3] = check_matrix(translation, (3,), f"{where} translation", path)
    return pose


def camera_to_key_ego(
    cam_to_cam_ego: np.ndarray, cam_ego_to_global: np.ndarray, key_ego_to_global: np.ndarray
) -> np.ndarray:
    """camera -> ego (camera time) -> global -> ego (key frame), float64 [4, 4]."""
    return np.linalg.solve(key_ego_to_global, cam_ego_to_global @ cam_to_cam_ego)


def _get(record: Any, key: str, where: str, path: Path) -> Any:
    if not isinstance(record, dict):
        raise DataFileError(path, f"{where} is a {type(record).__name__}, expected a dict")
    if key not in record:
        raise DataFileError(path, f"{where} has no {key!r} (has {sorted(map(str, record))})")
    return record[key]


def _timestamp(value: Any) -> int | str:
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


# --------------------------------------------------------------------------------------------------
# annotations.json


def read_annotations(
    path: str | Path,
    split: str,
    *,
    data_root: str | Path,
    gts_root: str | Path | None = None,
    cameras: Sequence[str] = CAMERAS,
) -> list[Occ3DRecord]:
    """The samples of ``split`` (``train``, ``val``, ...: the ``<split>_split`` scene list)."""
    path = require_file(path, "Occ3D annotations file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFileError(path, f"annotations file is not readable JSON: {err}") from err
    scenes = _get(data, f"{split}_split", "the annotations", path)
    scene_infos = _get(data, "scene_infos", "the annotations", path)
    if not isinstance(scenes, list) or not isinstance(scene_infos, dict):
        raise DataFileError(path, f"'{split}_split' must be a list and 'scene_infos' a dict")
    records = []
    for scene in scenes:
        frames = _get(scene_infos, str(scene), "scene_infos", path)
        if not isinstance(frames, dict):
            raise DataFileError(path, f"scene_infos[{scene!r}] is not a dict of frames")
        for token, frame in frames.items():
            records.append(
                _annotation_record(frame, str(scene), str(token), path, data_root, gts_root, cameras)
            )
    return records


def _annotation_record(
    frame: Any,
    scene: str,
    token: str,
    path: Path,
    data_root: str | Path,
    gts_root: str | Path | None,
    cameras: Sequence[str],
) -> Occ3DRecord:
    where = f"scene_infos[{scene!r}][{token!r}]"
    ego = _get(frame, "ego_pose", where, path)
    key_pose = pose_matrix(
        _get(ego, "rotation", f"{where} ego_pose", path),
        _get(ego, "translation", f"{where} ego_pose", path),
        f"{where} ego_pose",
        path,
    )
    sensors = _get(frame, "camera_sensor", where, path)
    records = {}
    for camera in cameras:
        cw = f"{where} camera_sensor[{camera!r}]"
        cam = _get(sensors, camera, f"{where} camera_sensor", path)
        intrinsic = cam.get("intrinsic", cam.get("intrinsics")) if isinstance(cam, dict) else None
        if intrinsic is None:
            raise DataFileError(path, f"{cw} has no 'intrinsic' (or 'intrinsics')")
        ext = _get(cam, "extrinsic", cw, path)
        cam_ego = _get(cam, "ego_pose", cw, path)
        cam_to_cam_ego = pose_matrix(
            _get(ext, "rotation", f"{cw} extrinsic", path),
            _get(ext, "translation", f"{cw} extrinsic", path),
            f"{cw} extrinsic",
            path,
        )
        cam_ego_pose = pose_matrix(
            _get(cam_ego, "rotation", f"{cw} ego_pose", path),
            _get(cam_ego, "translation", f"{cw} ego_pose", path),
            f"{cw} ego_pose",
            path,
        )
        img_path = str(_get(cam, "img_path", cw, path))
        records[camera] = CameraRecord(
            image_path=Path(data_root) / "imgs" / img_path,
            data_path=img_path,
            intrinsic=check_matrix(intrinsic, (3, 3), f"{cw} intrinsic", path),
            cam_to_ego=camera_to_key_ego(cam_to_cam_ego, cam_ego_pose, key_pose),
        )
    if gts_root is not None:
        gt_path = Path(gts_root) / scene / token / LABELS_FILE
    elif "gt_path" in frame:
        gt_path = path.parent / str(frame["gt_path"])
    else:
        gt_path = path.parent / "gts" / scene / token / LABELS_FILE
    return Occ3DRecord(
        token=token,
        scene_name=scene,
        timestamp=_timestamp(frame.get("timestamp", "")),
        cameras=records,
        ego_to_global=key_pose,
        lidar_to_ego=None,
        gt_path=gt_path,
        prev=str(frame.get("prev", "") or ""),
        next=str(frame.get("next", "") or ""),
    )


# --------------------------------------------------------------------------------------------------
# BEVDet-style info pickles

INFO_KEYS = ("token", "timestamp", "cams", "ego2global_rotation", "ego2global_translation")
CAMERA_KEYS = (
    "data_path",
    "cam_intrinsic",
    "sensor2ego_rotation",
    "sensor2ego_translation",
    "ego2global_rotation",
    "ego2global_translation",
)


def read_bevdet_infos(
    path: str | Path,
    *,
    data_root: str | Path,
    gts_root: str | Path | None = None,
    cameras: Sequence[str] = CAMERAS,
) -> list[Occ3DRecord]:
    """Every sample of a BEVDet-style info pickle, sorted by timestamp (stable)."""
    path = Path(path)
    data = load_restricted_pickle(path, "info file")
    infos = _get(data, "infos", "the info file", path) if isinstance(data, dict) else data
    if not isinstance(infos, list):
        raise DataFileError(path, f"'infos' is a {type(infos).__name__}, expected a list")
    records = [_info_record(info, i, path, data_root, gts_root, cameras) for i, info in enumerate(infos)]
    order = sorted(range(len(infos)), key=lambda i: infos[i]["timestamp"])
    return [records[i] for i in order]


def _info_record(
    info: Any,
    index: int,
    path: Path,
    data_root: str | Path,
    gts_root: str | Path | None,
    cameras: Sequence[str],
) -> Occ3DRecord:
    where = f"infos[{index}]"
    if not isinstance(info, dict):
        raise DataFileError(path, f"{where} is a {type(info).__name__}, expected a dict")
    missing = [k for k in INFO_KEYS if k not in info]
    if missing:
        raise DataFileError(path, f"{where} (token {info.get('token', '?')}) is missing keys {missing}")
    token = str(info["token"])
    where = f"infos[{index}] (token {token})"
    key_pose = pose_matrix(
        info["ego2global_rotation"], info["ego2global_translation"], f"{where} ego2global", path
    )
    lidar_to_ego = None
    if "lidar2ego_rotation" in info and "lidar2ego_translation" in info:
        lidar_to_ego = pose_matrix(
            info["lidar2ego_rotation"], info["lidar2ego_translation"], f"{where} lidar2ego", path
        )
    records = {}
    for camera in cameras:
        cam = _get(info["cams"], camera, f"{where}['cams']", path)
        cw = f"{where} {camera}"
        missing = [k for k in CAMERA_KEYS if k not in cam]
        if missing:
            raise DataFileError(path, f"{cw} is missing keys {missing}")
        cam_to_cam_ego = pose_matrix(
            cam["sensor2ego_rotation"], cam["sensor2ego_translation"], f"{cw} sensor2ego", path
        )
        cam_ego_pose = pose_matrix(
            cam["ego2global_rotation"], cam["ego2global_translation"], f"{cw} ego2global", path
        )
        records[camera] = CameraRecord(
            image_path=resolve_data_path(str(cam["data_path"]), data_root),
            data_path=str(cam["data_path"]),
            intrinsic=check_matrix(cam["cam_intrinsic"], (3, 3), f"{cw} cam_intrinsic", path),
            cam_to_ego=camera_to_key_ego(cam_to_cam_ego, cam_ego_pose, key_pose),
        )
    scene = str(info.get("scene_name", ""))
    if gts_root is not None:
        if not scene:
            raise DataFileError(
                path, f"{where} has no 'scene_name' to find its ground truth under {gts_root}"
            )
        gt_path = Path(gts_root) / scene / token / LABELS_FILE
    elif "occ_path" in info:
        gt_path = resolve_data_path(str(info["occ_path"]), data_root) / LABELS_FILE
    else:
        raise DataFileError(path, f"{where} has no 'occ_path' (and no gts root was given)")
    return Occ3DRecord(
        token=token,
        scene_name=scene,
        timestamp=_timestamp(info["timestamp"]),
        cameras=records,
        ego_to_global=key_pose,
        lidar_to_ego=lidar_to_ego,
        gt_path=gt_path,
        prev=str(info.get("prev", "") or ""),
        next=str(info.get("next", "") or ""),
    )
