"""Writing samples in the Occ3D-nuScenes layout, with both sample-list forms.

::

    <out>/occ3d-nuscenes/samples/CAM_*/<name>.jpg                  6 cameras per sample
    <out>/occ3d-nuscenes/samples/LIDAR_TOP/<name>.pcd.bin          float32 [N, 5], LiDAR frame
    <out>/occ3d-nuscenes/gts/<scene>/<token>/labels.npz            semantics, mask_lidar, mask_camera
    <out>/occ3d-nuscenes/bevdetv2-nuscenes_infos_{train,val}.pkl   BEVDet-style infos (occ_path)
    <out>/occ3d-nuscenes/annotations.json                          Occ3D's sample list (both splits)
    <out>/occ3d-nuscenes/imgs -> samples                           Occ3D's image folder (a link)
    <out>/occ3d-depth_gt/<jpg name>.bin                            float32 rows (u, v, depth)

``occ3d-nuscenes`` plays the role of ``data/nuscenes`` (the folder names differ from the
nuScenes-Occupancy writer's so both formats can share ``<out>``).

The grid frame is the ego frame (x forward, y left, z up, on the road), so a camera's extrinsic is
its camera -> ego pose. Every sample is its own scene (``synthetic-<split>-<index>``) and the car
stands still, so every camera shares the key frame's timestamp and ego pose. Paths in the infos
start with ``./data/nuscenes`` like BEVDet's.
"""

from __future__ import annotations

import json
import os
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
from spotocc.data.synthetic.nuscenes_format import INFO_PREFIX, depth_rows, token
from spotocc.data.synthetic.sample import SyntheticSample

ROOT, DEPTH = "occ3d-nuscenes", "occ3d-depth_gt"
INFO_FILES = {"train": "bevdetv2-nuscenes_infos_train.pkl", "val": "bevdetv2-nuscenes_infos_val.pkl"}
ANNOTATIONS = "annotations.json"
_T0 = 1_600_000_000_000_000  # microseconds


def scene_name(split: str, index: int) -> str:
    return f"synthetic-{split}-{index:05d}"


def write_sample(out: Path, sample: SyntheticSample, seed: int) -> tuple[dict[str, Any], list[Path]]:
    """Write one sample's images, LiDAR scan, depth files and labels.npz; return ``{"info": BEVDet info,
    "frame": annotations.json frame}`` and the files written."""
    split, index = sample.split, sample.index
    timestamp = _T0 + (0 if split == "train" else 10**12) + 500_000 * index
    stem = f"n000-synthetic-occ3d-{seed}"
    sample_token = token("occ3d-sample", seed, split, index)
    scene = scene_name(split, index)
    root = out / ROOT
    pose_rng = np.random.default_rng([int(seed), 0 if split == "train" else 1, int(index), 7])
    yaw = float(pose_rng.uniform(-np.pi, np.pi))
    ego_rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0, 0, 1.0]])
    ego_t = [float(v) for v in pose_rng.uniform(300.0, 1500.0, 2)] + [0.0]
    ego_q = rotation_to_quaternion(ego_rot)
    files: list[Path] = []
    # LiDAR scan in the LIDAR_TOP frame (the scan is cast in the ego frame).
    lidar_name = f"{stem}__LIDAR_TOP__{timestamp}.pcd.bin"
    lidar_path = root / "samples" / "LIDAR_TOP" / lidar_name
    lidar_path.parent.mkdir(parents=True, exist_ok=True)
    pts = sample.lidar.points
    xyz = (pts[:, :3] - np.asarray(NUSCENES_LIDAR_TO_EGO_TRANSLATION)) @ NUSCENES_LIDAR_TO_EGO_ROTATION
    pcd = np.concatenate([xyz, 255.0 * pts[:, 3:4], sample.lidar.ring[:, None]], axis=1)
    pcd.astype("<f4").tofile(lidar_path)
    files.append(lidar_path)
    cams: dict[str, dict[str, Any]] = {}
    sensors: dict[str, dict[str, Any]] = {}
    for i, (cam, K, rot, trans) in enumerate(sample.extras["rig"]):
        name = f"{stem}__{cam.name}__{timestamp}.jpg"
        img_path = root / "samples" / cam.name / name
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.renders[i].image).save(img_path, format="JPEG", quality=95, subsampling=0)
        depth_path = out / DEPTH / f"{name}.bin"
        depth_path.parent.mkdir(parents=True, exist_ok=True)
        depth_rows(sample, i).reshape(-1).tofile(depth_path)
        files += [img_path, depth_path]
        cam_q, cam_t = rotation_to_quaternion(rot), [float(v) for v in trans]
        cams[cam.name] = {
            "data_path": f"{INFO_PREFIX}/samples/{cam.name}/{name}",
            "type": cam.name,
            "sample_data_token": token("occ3d-" + cam.name, seed, split, index),
            "sensor2ego_translation": cam_t,
            "sensor2ego_rotation": cam_q,
            "ego2global_translation": ego_t,
            "ego2global_rotation": ego_q,
            "timestamp": timestamp,
            "cam_intrinsic": K.copy(),
        }
        sensors[cam.name] = {
            "img_path": f"{cam.name}/{name}",
            "intrinsic": K.tolist(),
            "extrinsic": {"translation": cam_t, "rotation": cam_q},
            "ego_pose": {"translation": ego_t, "rotation": ego_q},
        }
    gt_dir = root / "gts" / scene / sample_token
    gt_dir.mkdir(parents=True, exist_ok=True)
    labels = gt_dir / "labels.npz"
    np.savez_compressed(
        labels,
        semantics=sample.labels.astype(np.uint8),
        mask_lidar=sample.extras["mask_lidar"].astype(np.uint8),
        mask_camera=sample.extras["mask_camera"].astype(np.uint8),
    )
    files.append(labels)
    info = {
        "lidar_path": f"{INFO_PREFIX}/samples/LIDAR_TOP/{lidar_name}",
        "token": sample_token,
        "prev": "",
        "next": "",
        "frame_idx": 0,
        "sweeps": [],
        "cams": cams,
        "scene_token": token("occ3d-scene", seed, split, index),
        "scene_name": scene,
        "occ_path": f"{INFO_PREFIX}/gts/{scene}/{sample_token}",
        "lidar2ego_translation": list(NUSCENES_LIDAR_TO_EGO_TRANSLATION),
        "lidar2ego_rotation": rotation_to_quaternion(NUSCENES_LIDAR_TO_EGO_ROTATION),
        "ego2global_translation": ego_t,
        "ego2global_rotation": ego_q,
        "timestamp": timestamp,
    }
    frame = {
        "timestamp": timestamp,
        "camera_sensor": sensors,
        "ego_pose": {"translation": ego_t, "rotation": ego_q},
        "gt_path": f"gts/{scene}/{sample_token}/labels.npz",
        "prev": "",
        "next": "",
    }
    return {"info": info, "frame": frame, "scene": scene}, files


def write_lists(out: Path, records: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Both sample lists (split -> records of :func:`write_sample`) and the ``imgs`` link; sorted by time."""
    root = out / ROOT
    root.mkdir(parents=True, exist_ok=True)
    files = []
    annotations: dict[str, Any] = {"scene_infos": {}}
    for split, recs in records.items():
        recs = sorted(recs, key=lambda r: r["info"]["timestamp"])
        path = root / INFO_FILES[split]
        with open(path, "wb") as f:
            pickle.dump(
                {"infos": [r["info"] for r in recs], "metadata": {"version": "v1.0-synthetic"}}, f, protocol=4
            )
        files.append(path)
        annotations[f"{split}_split"] = [r["scene"] for r in recs]
        for r in recs:
            annotations["scene_infos"][r["scene"]] = {r["info"]["token"]: r["frame"]}
    path = root / ANNOTATIONS
    path.write_text(json.dumps(annotations))
    files.append(path)
    link = root / "imgs"
    if not link.exists():
        os.symlink("samples", link, target_is_directory=True)
    return files
