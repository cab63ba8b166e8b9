"""SemanticKITTI semantic scene completion, read from the raw release layout (spec 04 section 1).

Layout under ``root`` (no preprocessing step needed)::

    dataset/sequences/<SS>/calib.txt                  P0..P3, Tr (12 floats each)
    dataset/sequences/<SS>/image_2/<FFFFFF>.png       left colour camera
    dataset/sequences/<SS>/velodyne/<FFFFFF>.bin      float32 [P, 4] (training depth targets)
    dataset/sequences/<SS>/voxels/<FFFFFF>.label      uint16 raw label per voxel, [X, Y, Z] C order
    dataset/sequences/<SS>/voxels/<FFFFFF>.invalid    bit-packed (MSB first), 1 = never observed
    labels/<SS>/<FFFFFF>_1_1.npy                      optional: the released preprocessed labels

Frames of a sequence are the stems of ``voxels/*.bin``, ``voxels/*.label`` and the preprocessed
``labels`` files, sorted (the release globbed ``voxels/*.bin`` unsorted). Ground truth comes from
the preprocessed ``.npy`` when present, else from ``.label`` + ``.invalid``: raw ids through the
learning map to 20 classes (0 = empty, unlabeled/unknown ids -> 255), invalid voxels -> 255. The
grid size is the configured ``occ_size`` (256 x 256 x 32 for the real data) and every file size is
checked against it.

Camera geometry as released: intrinsics = the full 4x4 ``P2`` (its 4th column is the stereo offset),
``rots``/``trans`` = ``inverse(Tr)`` (rectified cam0 -> velodyne), computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spotocc.config import AugmentationConfig
from spotocc.data.depth import lidar_depth_targets
from spotocc.data.files import (
    DataFileError,
    MissingFileError,
    check_binary_size,
    load_npy,
    read_binary,
    read_image,
    require_file,
)
from spotocc.data.transforms import (
    BevFlips,
    augment_image,
    augmentation_matrices,
    bev_matrix,
    check_grid,
    check_input_size,
    flip_occupancy,
    normalize_image,
    sample_bev_flips,
    sample_image_augmentation,
)

SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "test": ("08",),  # the released configs evaluate "test" = "val" = sequence 08
    "trainval": ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10"),
    "test-submit": tuple(f"{s:02d}" for s in range(11, 22)),  # no ground truth
}
SPLITS_WITHOUT_GT = frozenset({"test-submit"})

# semantic-kitti.yaml learning_map: raw label id -> training class (0 also for "unlabeled" ids).
LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10,
    48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip
LEARNING_MAP_INV: dict[int, int] = {
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44, 11: 48, 12: 49,
    13: 50, 14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}  # fmt: skip
NUM_CLASSES = 20
IGNORE = 255

CAMERA_MATRICES = {"image_2": "P2", "image_3": "P3"}


def learning_map_lut() -> np.ndarray:
    """uint8 lookup table raw id -> class, as the release builds it (length max id + 100 = 359).

    Ids mapped to class 0 other than 0 itself (outlier, other-structure, other-object) become 255.
    """
    lut = np.zeros(max(LEARNING_MAP) + 100, dtype=np.int32)
    for raw, cls in LEARNING_MAP.items():
        lut[raw] = cls
    lut[lut == 0] = IGNORE
    lut[0] = 0
    return lut.astype(np.uint8)


_LUT = learning_map_lut()
_LUT_UINT16 = np.full(1 << 16, IGNORE, dtype=np.uint8)  # every uint16 id: one gather per voxel
_LUT_UINT16[: len(_LUT)] = _LUT


def remap_labels(raw: np.ndarray) -> np.ndarray:
    """Raw SemanticKITTI ids (any integer array) -> uint8 classes; ids outside the table -> 255."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint16:
        return _LUT_UINT16[raw]
    raw = raw.astype(np.int64)
    out = np.full(raw.shape, IGNORE, dtype=np.uint8)
    known = (raw >= 0) & (raw < len(_LUT))
    out[known] = _LUT[raw[known]]
    return out


def unpack_bits(packed: np.ndarray) -> np.ndarray:
    """Bit-packed uint8 -> uint8 0/1, most significant bit first (8 voxels per byte)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8))


# --------------------------------------------------------------------------------------------------
# Files


def read_calib(path: str | Path) -> dict[str, np.ndarray]:
    """``calib.txt`` -> 4x4 float64 matrices ``P0..P3`` (those present) and ``Tr``.

    Each ``KEY: 12 floats`` line fills the top 3 rows of a 4x4 identity; reading stops at the first
    empty line (as released). ``P2`` and ``Tr`` must be present.
    """
    path = require_file(path, "calibration file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(path, f"cannot read calibration file: {err}") from err
    values: dict[str, list[float]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            break
        if ":" not in line:
            raise DataFileError(path, f"line {number} is not of the form 'KEY: values': {line[:60]!r}")
        key, rest = line.split(":", 1)
        try:
            values[key.strip()] = [float(v) for v in rest.split()]
        except ValueError as err:
            raise DataFileError(path, f"line {number} ({key.strip()}) has a non-number: {err}") from err
    calib: dict[str, np.ndarray] = {}
    for key in ("P0", "P1", "P2", "P3", "Tr"):
        if key not in values:
            if key in ("P2", "Tr"):
                raise DataFileError(path, f"calibration has no {key} matrix")
            continue
        if len(values[key]) != 12 or not all(math.isfinite(v) for v in values[key]):
            raise DataFileError(path, f"{key} has {len(values[key])} finite values, expected 12 (3x4)")
        matrix = np.eye(4)
        matrix[:3, :4] = np.asarray(values[key]).reshape(3, 4)
        calib[key] = matrix
    if abs(np.linalg.det(calib["Tr"][:3, :3])) < 1e-6:
        raise DataFileError(path, "Tr has a singular rotation part")
    return calib


def _voxel_count(occ_size: Sequence[int]) -> int:
    count = int(np.prod(occ_size))
    if count % 8:
        raise ValueError(
            f"occ_size {tuple(occ_size)}: the voxel count must be a multiple of 8 for bit packing"
        )
    return count


def read_bitpacked_voxels(
    path: str | Path, occ_size: Sequence[int], what: str = "bit-packed voxel file", *, size_only: bool = False
) -> np.ndarray | None:
    """A bit-packed voxel file (``.invalid``, ``.bin``, ``.occluded``) -> bool ``[X, Y, Z]``.

    ``size_only``: only check the file size against the grid (returns None).
    """
    count = _voxel_count(occ_size) // 8
    if size_only:
        check_binary_size(path, np.uint8, what=what, count=count)
        return None
    packed = read_binary(path, np.uint8, what=what, count=count)
    return unpack_bits(packed).astype(bool).reshape(tuple(occ_size))


def read_raw_labels(
    path: str | Path, occ_size: Sequence[int], *, size_only: bool = False
) -> np.ndarray | None:
    """A ``.label`` voxel file -> raw uint16 ids ``[X, Y, Z]`` (``size_only``: check the size only).

    Every uint16 value is valid content (unknown ids become ignored voxels), so the size is all there
    is to check.
    """
    count = _voxel_count(occ_size)
    if size_only:
        check_binary_size(path, np.uint16, what="voxel label file", count=count)
        return None
    return read_binary(path, np.uint16, what="voxel label file", count=count).reshape(tuple(occ_size))


def read_voxel_gt(label_path: str | Path, invalid_path: str | Path, occ_size: Sequence[int]) -> np.ndarray:
    """``.label`` + ``.invalid`` -> uint8 ``[X, Y, Z]`` classes, 255 where unlabeled or invalid."""
    labels = remap_labels(read_raw_labels(label_path, occ_size))
    invalid = read_bitpacked_voxels(invalid_path, occ_size, what="invalid-voxel file")
    labels[invalid] = IGNORE
    return labels


def read_preprocessed_gt(
    path: str | Path, occ_size: Sequence[int], *, header_only: bool = False
) -> np.ndarray | None:
    """A released ``labels/SS/FFFFFF_1_1.npy`` (float32, values 0..19 or 255) -> uint8 ``[X, Y, Z]``.

    ``header_only``: check shape and dtype without reading the values (returns None).
    """
    array = load_npy(path, "preprocessed label file", header_only=header_only)
    if array.shape != tuple(occ_size):
        raise DataFileError(path, f"preprocessed labels have shape {array.shape}, expected {tuple(occ_size)}")
    if not (np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)):
        raise DataFileError(path, f"preprocessed labels have dtype {array.dtype}, expected numbers")
    if header_only:
        return None
    valid = ((array >= 0) & (array < NUM_CLASSES) & (array == np.round(array))) | (array == IGNORE)
    if not valid.all():
        bad = np.unique(array[~valid])[:5]
        raise DataFileError(
            path, f"preprocessed labels hold values outside 0..19 and 255, e.g. {bad.tolist()}"
        )
    return array.astype(np.uint8)


def read_velodyne(path: str | Path, *, size_only: bool = False) -> np.ndarray | None:
    """A velodyne scan -> float32 ``[P, 4]`` (x, y, z, reflectance); ``size_only``: check the size only."""
    if size_only:
        check_binary_size(path, np.float32, what="velodyne scan", row=4)
        return None
    return read_binary(path, np.float32, what="velodyne scan", row=4).reshape(-1, 4)


# --------------------------------------------------------------------------------------------------
# Layout


def sequence_dir(root: str | Path, sequence: str) -> Path:
    return Path(root) / "dataset" / "sequences" / sequence


def label_npy_path(root: str | Path, sequence: str, frame: str) -> Path:
    return Path(root) / "labels" / sequence / f"{frame}_1_1.npy"


def list_frames(root: str | Path, sequence: str) -> list[str]:
    """Sorted frame ids of one sequence (stems of voxel files and preprocessed labels)."""
    seq = sequence_dir(root, sequence)
    stems = {p.stem for pattern in ("*.bin", "*.label") for p in (seq / "voxels").glob(pattern)}
    stems |= {p.name[: -len("_1_1.npy")] for p in (Path(root) / "labels" / sequence).glob("*_1_1.npy")}
    return sorted(stems)


def split_sequences(split: str) -> tuple[str, ...]:
    """The sequences of a split, or a clear error for an unknown split name."""
    if split not in SPLITS:
        raise ValueError(f"unknown SemanticKITTI split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def is_every_5th(frame: str) -> bool:
    return frame.isdigit() and int(frame) % 5 == 0


def load_gt(root: str | Path, sequence: str, frame: str, occ_size: Sequence[int]) -> np.ndarray:
    """Ground truth of one frame: the preprocessed ``.npy`` if present, else ``.label`` + ``.invalid``."""
    npy = label_npy_path(root, sequence, frame)
    if npy.is_file():
        return read_preprocessed_gt(npy, occ_size)
    voxels = sequence_dir(root, sequence) / "voxels"
    label, invalid = voxels / f"{frame}.label", voxels / f"{frame}.invalid"
    if not label.is_file():
        raise MissingFileError(label, f"voxel label file is missing (and there is no {npy})")
    return read_voxel_gt(label, invalid, occ_size)


# --------------------------------------------------------------------------------------------------
# Dataset


class SemanticKITTI(Dataset):
    """SemanticKITTI SSC samples in the :mod:`spotocc.data.batch` layout.

    Args:
        root: folder holding ``dataset/sequences`` (and optionally ``labels``).
        split: ``train``, ``val``, ``test`` (= val, sequence 08), ``trainval`` or ``test-submit``
            (sequences 11-21, no ground truth).
        occ_size / point_cloud_range: the grid (files are checked against ``occ_size``).
        input_size: network input ``(H, W)``.
        cameras: image folders to read (``image_2`` -> P2, ``image_3`` -> P3).
        augmentation: image-view and BEV augmentation settings (used when ``train``).
        train: random augmentation and LiDAR depth targets (``gt_depth``); otherwise the fixed test
            transform and no ``gt_depth``.
        every_5th_scan: keep only frames whose id is a multiple of 5 (the common SSC release).
        bgr_input: feed B,G,R instead of R,G,B (see :func:`normalize_image`; False as released).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        occ_size: Sequence[int] = (256, 256, 32),
        point_cloud_range: Sequence[float] = (0.0, -25.6, -2.0, 51.2, 25.6, 4.4),
        input_size: Sequence[int] = (384, 1280),
        cameras: Sequence[str] = ("image_2",),
        augmentation: AugmentationConfig | None = None,
        train: bool = False,
        every_5th_scan: bool = False,
        bgr_input: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.sequences = split_sequences(split)
        check_grid(point_cloud_range, occ_size)
        _voxel_count(occ_size)
        self.occ_size = tuple(int(v) for v in occ_size)
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.input_size = check_input_size(input_size)
        unknown = [c for c in cameras if c not in CAMERA_MATRICES]
        if unknown or not cameras:
            raise ValueError(
                f"SemanticKITTI cameras must be among {sorted(CAMERA_MATRICES)}, got {tuple(cameras)}"
            )
        self.cameras = tuple(cameras)
        self.augmentation = augmentation if augmentation is not None else AugmentationConfig()
        self.train = train
        self.has_gt = split not in SPLITS_WITHOUT_GT
        self.bgr_input = bgr_input
        if not (self.root / "dataset" / "sequences").is_dir():
            raise MissingFileError(
                self.root / "dataset" / "sequences", "SemanticKITTI sequences folder is missing"
            )

        self.calibs: dict[str, dict[str, np.ndarray]] = {}
        self.frames: list[tuple[str, str]] = []
        for sequence in self.sequences:
            if not sequence_dir(self.root, sequence).is_dir():
                continue  # a partial download or a synthetic set may hold only some sequences
            frames = list_frames(self.root, sequence)
            if every_5th_scan:
                frames = [f for f in frames if is_every_5th(f)]
            if not frames:
                continue
            calib = read_calib(sequence_dir(self.root, sequence) / "calib.txt")
            for camera in self.cameras:
                if CAMERA_MATRICES[camera] not in calib:
                    raise DataFileError(
                        sequence_dir(self.root, sequence) / "calib.txt",
                        f"calibration has no {CAMERA_MATRICES[camera]} matrix (needed by {camera})",
                    )
            self.calibs[sequence] = calib
            self.frames.extend((sequence, f) for f in frames)
        if not self.frames:
            raise ValueError(
                f"SemanticKITTI split {split!r} under {self.root}: no frames found in sequences "
                f"{', '.join(self.sequences)} (looked for dataset/sequences/SS/voxels/*.bin|*.label and "
                f"labels/SS/*_1_1.npy)"
            )

    def __len__(self) -> int:
        return len(self.frames)

    def _rng(self) -> np.random.Generator:
        # Drawn from torch's generator: seeded by torch.manual_seed and differently in every
        # DataLoader worker, unlike numpy's global state.
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sequence, frame = self.frames[index]
        seq_dir = sequence_dir(self.root, sequence)
        calib = self.calibs[sequence]
        rng = self._rng()

        imgs, rots, trans, intrins, post_rots, post_trans, paths = [], [], [], [], [], [], []
        lidar2cam = torch.tensor(calib["Tr"], dtype=torch.float32)
        cam2lidar = torch.linalg.inv(lidar2cam)  # float32, as released
        for camera in self.cameras:
            path = seq_dir / camera / f"{frame}.png"
            img = read_image(path)
            params = sample_image_augmentation(
                (img.height, img.width), self.input_size, self.augmentation, train=self.train, rng=rng
            )
            post_rot, post_tran = augmentation_matrices(params)
            imgs.append(normalize_image(augment_image(img, params), bgr_input=self.bgr_input))
            intrins.append(torch.tensor(calib[CAMERA_MATRICES[camera]], dtype=torch.float32))
            rots.append(cam2lidar[:3, :3])
            trans.append(cam2lidar[:3, 3])
            post_rots.append(post_rot)
            post_trans.append(post_tran)
            paths.append(str(path))

        sample: dict[str, Any] = {
            "img": torch.stack(imgs),  # [N, 3, H, W]
            "rots": torch.stack(rots),  # [N, 3, 3]
            "trans": torch.stack(trans),  # [N, 3]
            "intrins": torch.stack(intrins),  # [N, 4, 4]
            "post_rots": torch.stack(post_rots),  # [N, 3, 3]
            "post_trans": torch.stack(post_trans),  # [N, 3]
        }
        if self.train:
            points = torch.from_numpy(read_velodyne(seq_dir / "velodyne" / f"{frame}.bin"))
            sample["gt_depth"] = lidar_depth_targets(
                points,
                sample["rots"],
                sample["trans"],
                sample["intrins"],
                sample["post_rots"],
                sample["post_trans"],
                self.input_size,
            )

        flips = BevFlips()
        if self.has_gt:
            gt = load_gt(self.root, sequence, frame, self.occ_size)
            if self.train and self.augmentation.bda:
                flips = sample_bev_flips(self.augmentation, rng)
                gt = flip_occupancy(gt, flips)
            sample["gt_occ"] = torch.from_numpy(np.ascontiguousarray(gt))  # uint8 [X, Y, Z]
        elif self.train and self.augmentation.bda:
            flips = sample_bev_flips(self.augmentation, rng)
        sample["bda"] = bev_matrix(flips, self.point_cloud_range)  # [4, 4]
        sample["meta"] = {
            "sample_id": f"{sequence}_{frame}",
            "dataset": "semantickitti",
            "sequence": sequence,
            "frame_id": frame,
            "image_paths": paths,
            "bev_flips": (flips.x, flips.y, flips.z),
        }
        return sample
