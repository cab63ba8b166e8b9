"""Writing samples in the SemanticKITTI (SSC) layout (spec 04, section 1).

::

    <root>/dataset/sequences/<SS>/calib.txt            P0..P3 and Tr (velodyne -> rectified camera 0)
                                  poses.txt, times.txt one line per scan index up to the last frame
                                  image_2/<FFFFFF>.png  RGB
                                  velodyne/<FFFFFF>.bin float32 [N, 4]: x, y, z, reflectance
                                  voxels/<FFFFFF>.label uint16 raw label ids, [X, Y, Z] C order, 0 = empty
                                  voxels/<FFFFFF>.invalid|.bin|.occluded  bit-packed, MSB first
    <root>/labels/<SS>/<FFFFFF>_1_1.npy                float32 [X, Y, Z] training classes, 255 = ignore
                                                       (what the released preprocess script writes)

Train samples go round-robin into the train sequences (00-07, 09, 10), val samples into 08. Frame
ids are multiples of 5 (the frames the widely used SSC release labels), so readers that keep only
every 5th scan see every sample too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from spotocc.data.synthetic.sample import SyntheticSample

TRAIN_SEQUENCES = ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
VAL_SEQUENCE = "08"
FRAME_STRIDE = 5
CALIB_KEYS = ("P0", "P1", "P2", "P3", "Tr")


def sequence_and_frame(split: str, index: int) -> tuple[str, int]:
    """Sequence name and frame number of sample ``index`` of ``split``."""
    if split == "train":
        return TRAIN_SEQUENCES[index % len(TRAIN_SEQUENCES)], FRAME_STRIDE * (index // len(TRAIN_SEQUENCES))
    return VAL_SEQUENCE, FRAME_STRIDE * index


def pack_bits(mask: np.ndarray) -> bytes:
    """Flatten in C order and pack 8 voxels per byte, the first voxel in the most significant bit."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    if flat.size % 8:
        raise ValueError(f"a bit-packed voxel file needs a multiple of 8 voxels, got {flat.size}")
    return np.packbits(flat, bitorder="big").tobytes()


def calib_text(calib: dict[str, np.ndarray]) -> str:
    """calib.txt contents: ``KEY: v1 ... v12`` per matrix, KITTI's number format."""
    return "".join(f"{k}: " + " ".join(f"{v:.12e}" for v in calib[k].ravel()) + "\n" for k in CALIB_KEYS)


def write_sample(root: Path, sample: SyntheticSample, write_npy_labels: bool = True) -> list[Path]:
    """Write one sample's image, scan and voxel files; returns the written paths."""
    seq, frame = sequence_and_frame(sample.split, sample.index)
    name = f"{frame:06d}"
    seq_dir = root / "dataset" / "sequences" / seq
    for sub in ("image_2", "velodyne", "voxels"):
        (seq_dir / sub).mkdir(parents=True, exist_ok=True)
    files = [seq_dir / "image_2" / f"{name}.png", seq_dir / "velodyne" / f"{name}.bin"]
    Image.fromarray(sample.renders[0].image).save(files[0], format="PNG")
    sample.lidar.points.astype("<f4").tofile(files[1])
    voxels = seq_dir / "voxels"
    label_path = voxels / f"{name}.label"
    sample.labels.astype("<u2").tofile(label_path)
    files.append(label_path)
    for suffix, mask in (
        ("invalid", sample.invalid),
        ("bin", sample.lidar_voxels),
        ("occluded", sample.occluded),
    ):
        path = voxels / f"{name}.{suffix}"
        path.write_bytes(pack_bits(mask))
        files.append(path)
    if write_npy_labels:
        npy = root / "labels" / seq / f"{name}_1_1.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, sample.gt.astype(np.float32))
        files.append(npy)
    return files


def write_sequence_files(root: Path, seq: str, last_frame: int, calib: dict[str, np.ndarray]) -> list[Path]:
    """calib.txt, and poses.txt / times.txt with one line per scan index 0..last_frame (-1: none)."""
    seq_dir = root / "dataset" / "sequences" / seq
    seq_dir.mkdir(parents=True, exist_ok=True)
    calib_path, poses_path, times_path = seq_dir / "calib.txt", seq_dir / "poses.txt", seq_dir / "times.txt"
    calib_path.write_text(calib_text(calib))
    poses, times = [], []
    for i in range(last_frame + 1):
        pose = np.hstack(
            [np.eye(3), np.array([[0.0], [0.0], [0.8 * i]])]
        )  # camera 0 driving along its z axis
        poses.append(" ".join(f"{v:e}" for v in pose.ravel()))
        times.append(f"{0.1 * i:e}")
    poses_path.write_text("".join(p + "\n" for p in poses))
    times_path.write_text("".join(t + "\n" for t in times))
    return [calib_path, poses_path, times_path]
