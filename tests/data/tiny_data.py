"""Hand-made tiny datasets in the real on-disk layouts, for the reader, transform and check-data tests.

Not a test module (no ``test_`` prefix): the test modules load it with :func:`load_tiny_data`.
Everything is written explicitly here, independently of the readers, from the format descriptions in
the spec (bit packing MSB first, [X, Y, Z] C order, (z, y, x, label) rows, float32 (u, v, d) rows).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# SemanticKITTI

KITTI_OCC_SIZE = (16, 16, 8)
KITTI_RANGE = (0.0, -25.6, -2.0, 51.2, 25.6, 4.4)
KITTI_IMAGE_WH = (160, 48)
KITTI_INPUT_SIZE = (32, 128)

# P2-like projection for a 160x48 image with a large stereo-offset column (visible in pixels).
KITTI_P2 = np.array(
    [[72.0, 0.0, 80.0, 60.0], [0.0, 72.0, 22.0, 0.02], [0.0, 0.0, 1.0, 0.003]], dtype=np.float64
)
KITTI_P0 = np.array([[72.0, 0.0, 80.0, 0.0], [0.0, 72.0, 22.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
# velodyne (x fwd, y left, z up) -> rectified cam0 (x right, y down, z fwd), plus a small offset.
KITTI_TR = np.array(
    [[0.0, -1.0, 0.0, 0.01], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27]], dtype=np.float64
)


def write_calib(path: Path, matrices: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}: " + " ".join(f"{v:.12e}" for v in np.asarray(m).reshape(-1)) for k, m in matrices.items()]
    path.write_text("\n".join(lines) + "\n")


def kitti_calib() -> dict[str, np.ndarray]:
    return {"P0": KITTI_P0, "P1": KITTI_P0, "P2": KITTI_P2, "P3": KITTI_P2, "Tr": KITTI_TR}


def pack_bits(bits: np.ndarray) -> bytes:
    """MSB-first packing written by hand (not np.packbits) so the reader is checked independently."""
    flat = np.asarray(bits, dtype=np.uint8).reshape(-1)
    out = bytearray()
    for start in range(0, flat.size, 8):
        byte = 0
        for bit in flat[start : start + 8]:
            byte = (byte << 1) | int(bit)
        out.append(byte)
    return bytes(out)


def grey_image(width: int, height: int, value: int = 90) -> np.ndarray:
    img = np.full((height, width, 3), value, dtype=np.uint8)
    img[:, :, 1] = (np.arange(width) * 255 // max(1, width - 1)).astype(np.uint8)[None, :]  # a gradient
    return img


def write_kitti_frame(
    root: Path,
    sequence: str,
    frame: str,
    *,
    raw_labels: np.ndarray,
    invalid: np.ndarray,
    image: np.ndarray,
    points: np.ndarray,
) -> None:
    seq = root / "dataset" / "sequences" / sequence
    for sub in ("voxels", "image_2", "velodyne"):
        (seq / sub).mkdir(parents=True, exist_ok=True)
    (seq / "voxels" / f"{frame}.label").write_bytes(np.asarray(raw_labels, dtype="<u2").reshape(-1).tobytes())
    (seq / "voxels" / f"{frame}.invalid").write_bytes(pack_bits(invalid))
    (seq / "voxels" / f"{frame}.bin").write_bytes(pack_bits(raw_labels > 0))
    Image.fromarray(image).save(seq / "image_2" / f"{frame}.png")
    np.asarray(points, dtype="<f4").reshape(-1, 4).tofile(seq / "velodyne" / f"{frame}.bin")


def make_kitti_dataset(
    root: Path, sequences=("00", "08"), frames=("000000", "000005"), seed: int = 0
) -> Path:
    """A tiny SemanticKITTI tree: a few frames per sequence with random labels, images and points."""
    rng = np.random.default_rng(seed)
    width, height = KITTI_IMAGE_WH
    raw_ids = np.array([0, 0, 0, 10, 40, 44, 50, 70, 52, 1, 99, 252, 258])
    for sequence in sequences:
        write_calib(root / "dataset" / "sequences" / sequence / "calib.txt", kitti_calib())
        for frame in frames:
            raw = rng.choice(raw_ids, size=KITTI_OCC_SIZE).astype(np.uint16)
            invalid = rng.random(KITTI_OCC_SIZE) < 0.1
            pts = np.c_[
                rng.uniform(2, 40, 200), rng.uniform(-10, 10, 200), rng.uniform(-2, 2, 200), rng.random(200)
            ]
            write_kitti_frame(
                root,
                sequence,
                frame,
                raw_labels=raw,
                invalid=invalid,
                image=grey_image(width, height),
                points=pts,
            )
    return root


# ---------------------------------------------------------------------------------------------------
# nuScenes-Occupancy

NUSC_OCC_SIZE = (16, 16, 4)
NUSC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
NUSC_IMAGE_WH = (160, 90)
NUSC_INPUT_SIZE = (32, 64)
NUSC_CAMERAS = ("CAM_FRONT", "CAM_BACK")
NUSC_K = np.array([[120.0, 0.0, 80.0], [0.0, 120.0, 45.0], [0.0, 0.0, 1.0]])
# camera (x right, y down, z forward) -> LIDAR_TOP (x right, y forward, z up)
NUSC_SENSOR2LIDAR = {
    "CAM_FRONT": (np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), np.array([0.0, 0.5, -0.3])),
    "CAM_BACK": (np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]]), np.array([0.0, -1.0, -0.3])),
}


def nusc_info(index: int, timestamp: int, cameras=NUSC_CAMERAS) -> dict:
    cams = {}
    for camera in cameras:
        rot, tran = NUSC_SENSOR2LIDAR[camera]
        cams[camera] = {
            "data_path": f"./data/nuscenes/samples/{camera}/n000__{camera}__{timestamp}.jpg",
            "type": camera,
            "sample_data_token": f"sd{index}{camera}",
            "timestamp": timestamp,
            "cam_intrinsic": NUSC_K.copy(),
            "sensor2lidar_rotation": rot.copy(),
            "sensor2lidar_translation": tran.copy(),
        }
    return {
        "token": f"sample{index}",
        "timestamp": timestamp,
        "scene_token": "scene0",
        "lidar_token": f"lidar{index}",
        "lidar_path": f"./data/nuscenes/samples/LIDAR_TOP/l{index}.pcd.bin",
        "cams": cams,
        "sweeps": [],
        "can_bus": np.zeros(18),
        "frame_idx": index,
    }


def write_nusc_sample(
    data_root: Path,
    occ_root: Path,
    depth_root: Path,
    info: dict,
    *,
    rows: np.ndarray,
    images: dict[str, np.ndarray] | None = None,
    depth_rows: dict[str, np.ndarray] | None = None,
) -> None:
    for camera, cam in info["cams"].items():
        rel = cam["data_path"][len("./data/nuscenes/") :]
        path = data_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = images[camera] if images and camera in images else grey_image(*NUSC_IMAGE_WH)
        Image.fromarray(image).save(path, quality=95)
        depth_root.mkdir(parents=True, exist_ok=True)
        depth = depth_rows[camera] if depth_rows and camera in depth_rows else np.array([[10.5, 20.5, 7.0]])
        np.asarray(depth, dtype="<f4").tofile(depth_root / f"{path.name}.bin")
    occ = occ_root / f"scene_{info['scene_token']}" / "occupancy"
    occ.mkdir(parents=True, exist_ok=True)
    np.save(occ / f"{info['lidar_token']}.npy", np.asarray(rows))


def write_infos(path: Path, infos: list[dict], protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"infos": infos, "metadata": {"version": "v0.1-test"}}, f, protocol=protocol)


def make_nusc_dataset(root: Path, n_samples: int = 2, seed: int = 0) -> dict[str, Path]:
    """A tiny nuScenes-Occupancy tree: infos (out of timestamp order), images, GT rows, depth files."""
    rng = np.random.default_rng(seed)
    data_root, occ_root, depth_root = root / "nuscenes", root / "occ", root / "depth_gt"
    infos = []
    for i in range(n_samples):
        info = nusc_info(i, timestamp=1000 - i)  # descending: the reader must sort
        z = rng.integers(0, NUSC_OCC_SIZE[2], 30)
        y = rng.integers(0, NUSC_OCC_SIZE[1], 30)
        x = rng.integers(0, NUSC_OCC_SIZE[0], 30)
        label = rng.integers(0, 17, 30)
        write_nusc_sample(data_root, occ_root, depth_root, info, rows=np.c_[z, y, x, label].astype(np.int64))
        infos.append(info)
    info_file = data_root / "infos_train.pkl"
    write_infos(info_file, infos)
    return {"data_root": data_root, "occ_root": occ_root, "depth_root": depth_root, "info_file": info_file}
