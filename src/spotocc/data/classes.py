"""Class lists and voxel-frequency tables of the benchmarks, and the weights derived from them.

The frequency tables are the released ones (voxel counts over the training sets); the head derives
its cross-entropy class weights and its point-sampling weights from them (spec 03, section 4.2).

Occ3D-nuScenes files number the classes 0 others .. 16 vegetation and 17 free. The heads treat class
0 as empty, so the Occ3D reader remaps ids on reading (never in the files): free 17 -> 0 and file id
k -> k + 1 for k < 17. :data:`OCC3D_CLASSES` lists the names in that model order;
:func:`occ3d_to_model_ids` / :func:`model_to_occ3d_ids` convert between the two numberings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

SEMANTIC_KITTI_CLASSES: tuple[str, ...] = (
    "unlabeled",  # class 0 is "empty" space; the released code calls it "unlabeled"
    "car",
    "bicycle",
    "motorcycle",
    "truck",
    "other-vehicle",
    "person",
    "bicyclist",
    "motorcyclist",
    "road",
    "parking",
    "sidewalk",
    "other-ground",
    "building",
    "fence",
    "vegetation",
    "trunk",
    "terrain",
    "pole",
    "traffic-sign",
)

SEMANTIC_KITTI_FREQUENCIES: tuple[float, ...] = (
    5.41773033e9,
    1.57835390e7,
    1.25136e5,
    1.18809e5,
    6.46799e5,
    8.21951e5,
    2.62978e5,
    2.83696e5,
    2.04750e5,
    6.16887030e7,
    4.502961e6,
    4.488365e7,
    2.269923e6,
    5.68402180e7,
    1.57196520e7,
    1.58442623e8,
    2.061623e6,
    3.69705220e7,
    1.151988e6,
    3.34146e5,
)

NUSCENES_OCC_CLASSES: tuple[str, ...] = (
    "empty",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
)

NUSCENES_OCC_FREQUENCIES: tuple[float, ...] = (
    3.40994457e8,
    9.305106e6,
    1.41351e5,
    4.604760e6,
    3.81042190e7,
    1.514414e6,
    4.27391e5,
    2.314727e6,
    7.36239e5,
    4.907511e6,
    1.58413840e7,
    3.16958899e8,
    8.559216e6,
    7.01974610e7,
    7.02897300e7,
    1.78178063e8,
    1.22581273e8,
)

# Occ3D-nuScenes in model order (class 0 = free, then Occ3D ids 0..16 shifted by one).
OCC3D_FILE_CLASSES: tuple[str, ...] = (
    "others",
    *NUSCENES_OCC_CLASSES[1:],
    "free",
)  # the numbering of the labels.npz files: 0 others .. 16 vegetation, 17 free
OCC3D_CLASSES: tuple[str, ...] = ("free", *OCC3D_FILE_CLASSES[:17])
OCC3D_FREE = 17  # the file id of free space

# Voxel counts per Occ3D file id (0 others .. 17 free) as FlashOCC ships them for Occ3D-nuScenes
# (Yzichen/FlashOCC, projects/mmdet3d_plugin/models/dense_heads/bev_occ_head.py), in model order.
_OCC3D_FILE_FREQUENCIES = (
    944004, 1897170, 152386, 2391677, 16957802, 724139, 189027, 2074468, 413451, 2384460, 5916653,
    175883646, 4275424, 51393615, 61411620, 105975596, 116424404, 1892500630,
)  # fmt: skip
OCC3D_FREQUENCIES: tuple[float, ...] = tuple(
    float(f) for f in (_OCC3D_FILE_FREQUENCIES[17], *_OCC3D_FILE_FREQUENCIES[:17])
)

IGNORE_INDEX = 255

# file id -> model id and back (uint8 look-up tables over 0..255; ids outside 0..17 map to 255)
_FILE_TO_MODEL = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_FILE_TO_MODEL[:17] = np.arange(1, 18)
_FILE_TO_MODEL[OCC3D_FREE] = 0
_MODEL_TO_FILE = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_MODEL_TO_FILE[1:18] = np.arange(17)
_MODEL_TO_FILE[0] = OCC3D_FREE

Labels = TypeVar("Labels", np.ndarray, torch.Tensor)


def _lookup(table: np.ndarray, labels: Labels) -> Labels:
    if isinstance(labels, torch.Tensor):
        lut = torch.from_numpy(table).to(labels.device)
        return lut[labels.long()].to(torch.uint8)
    return table[np.asarray(labels).astype(np.int64)]


def occ3d_to_model_ids(labels: Labels) -> Labels:
    """Occ3D file ids (0 others .. 16 vegetation, 17 free) -> model ids (0 free, 1 others .. 17), uint8.

    Anything outside 0..17 (255 = ignore included) becomes 255.
    """
    return _lookup(_FILE_TO_MODEL, labels)


def model_to_occ3d_ids(labels: Labels) -> Labels:
    """Model ids (0 free, 1..17) -> Occ3D file ids (17 free, 0..16), uint8, for writing predictions and
    scoring them with Occ3D's own numbering. Anything outside 0..17 (255 included) becomes 255."""
    return _lookup(_MODEL_TO_FILE, labels)


CLASS_SETS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "semantickitti": (SEMANTIC_KITTI_CLASSES, SEMANTIC_KITTI_FREQUENCIES),
    "nuscenes": (NUSCENES_OCC_CLASSES, NUSCENES_OCC_FREQUENCIES),
    "occ3d": (OCC3D_CLASSES, OCC3D_FREQUENCIES),
}


def class_set(name: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(class names, voxel frequencies) of a benchmark: ``"semantickitti"``, ``"nuscenes"`` or ``"occ3d"``."""
    if name not in CLASS_SETS:
        raise ValueError(f"unknown class set {name!r}; expected one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[name]


def cross_entropy_class_weights(frequencies: Sequence[float], no_object_weight: float = 0.1) -> list[float]:
    """Released CE weights: ``(1/ln f_c) / (1/ln f_0)`` per class, then ``no_object_weight`` appended."""
    inv_log = [1.0 / math.log(f) for f in frequencies]
    return [w / inv_log[0] for w in inv_log] + [float(no_object_weight)]


def point_sampling_weights(frequencies: Sequence[float], gamma: float = 0.25) -> list[float]:
    """Released point-sampling weights ``(f_max / f_c) ** gamma`` (equal to ``((1/f)/min(1/f))**gamma``)."""
    f_max = max(frequencies)
    return [(f_max / f) ** gamma for f in frequencies]
