"""Class lists and voxel-frequency tables of the two benchmarks, and the weights derived from them.

The frequency tables are the released ones (voxel counts over the training sets); the head derives
its cross-entropy class weights and its point-sampling weights from them (spec 03, section 4.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

IGNORE_INDEX = 255

CLASS_SETS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "semantickitti": (SEMANTIC_KITTI_CLASSES, SEMANTIC_KITTI_FREQUENCIES),
    "nuscenes": (NUSCENES_OCC_CLASSES, NUSCENES_OCC_FREQUENCIES),
}


def class_set(name: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(class names, voxel frequencies) of a benchmark: ``"semantickitti"`` or ``"nuscenes"``."""
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
