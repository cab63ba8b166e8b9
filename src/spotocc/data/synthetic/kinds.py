"""The kinds of things a synthetic scene is made of, their dataset label ids, colours and reflectance.

A scene is first built as a grid of *kind* ids (this table's index); the writers then map kinds to the
raw SemanticKITTI label ids (the learning map applies as for the real data), to the
nuScenes-Occupancy labels 1..16 (0 = noise) or to the Occ3D ids (0 others .. 16 vegetation, 17 free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Kind:
    name: str
    kitti_raw: int  # raw SemanticKITTI label id written to voxels/*.label
    nuscenes: int  # nuScenes-Occupancy label (0 = noise)
    colour: tuple[int, int, int]  # base RGB albedo of the renderer
    reflectance: float  # LiDAR intensity in [0, 1]
    rendered: bool = True  # False: a label artefact with no physical surface (LiDAR noise)


KINDS: tuple[Kind, ...] = (
    Kind("empty", 0, 0, (0, 0, 0), 0.0, rendered=False),
    Kind("car", 10, 4, (40, 62, 175), 0.55),
    Kind("moving-car", 252, 4, (40, 62, 175), 0.55),
    Kind("bicycle", 11, 2, (215, 45, 160), 0.35),
    Kind("motorcycle", 15, 6, (115, 35, 170), 0.4),
    Kind("truck", 18, 10, (20, 140, 110), 0.5),
    Kind("bus", 13, 3, (235, 195, 25), 0.5),
    Kind("trailer", 20, 9, (205, 175, 60), 0.45),
    Kind("construction-vehicle", 20, 5, (245, 160, 15), 0.45),
    Kind("person", 30, 7, (230, 40, 40), 0.25),
    Kind("bicyclist", 31, 2, (250, 120, 190), 0.25),
    Kind("motorcyclist", 32, 6, (170, 95, 235), 0.25),
    Kind("road", 40, 11, (62, 66, 82), 0.1),
    Kind("parking", 44, 11, (135, 80, 115), 0.12),
    Kind("sidewalk", 48, 13, (205, 180, 145), 0.2),
    Kind("other-ground", 49, 12, (80, 135, 125), 0.15),
    Kind("building", 50, 15, (170, 90, 75), 0.3),
    Kind("fence", 51, 15, (125, 165, 210), 0.3),
    Kind("barrier", 51, 1, (215, 205, 120), 0.35),
    Kind("vegetation", 70, 16, (50, 125, 40), 0.3),
    Kind("trunk", 71, 16, (90, 55, 25), 0.3),
    Kind("terrain", 72, 14, (135, 150, 55), 0.2),
    Kind("pole", 80, 15, (95, 165, 105), 0.4),
    Kind("traffic-sign", 81, 15, (0, 160, 215), 0.9),
    Kind("traffic-cone", 99, 8, (255, 115, 0), 0.6),  # KITTI "other-object": learning map -> ignore
    Kind("noise", 1, 0, (0, 0, 0), 0.0, rendered=False),  # KITTI "outlier" / nuScenes noise -> ignore
)

KIND_ID: dict[str, int] = {k.name: i for i, k in enumerate(KINDS)}
NUM_KINDS = len(KINDS)

KITTI_RAW = np.array([k.kitti_raw for k in KINDS], dtype=np.uint16)  # kind -> raw SemanticKITTI id
NUSCENES_LABEL = np.array([k.nuscenes for k in KINDS], dtype=np.uint8)  # kind -> nuScenes-Occupancy label
# kind -> Occ3D file id: Occ3D numbers 1..16 as nuScenes-Occupancy does; noise -> 0 others, empty -> 17 free
OCC3D_LABEL = NUSCENES_LABEL.copy()
OCC3D_LABEL[0] = 17
# kind -> Occ3D model id (0 free, 1 others, 2..17 the nuScenes classes), as the Occ3D reader gives them
OCC3D_MODEL_CLASS = np.where(OCC3D_LABEL == 17, 0, OCC3D_LABEL.astype(np.int64) + 1).astype(np.uint8)
ALBEDO = np.array([k.colour for k in KINDS], dtype=np.float32) / 255.0  # kind -> RGB in [0, 1]
REFLECTANCE = np.array([k.reflectance for k in KINDS], dtype=np.float32)
RENDERED = np.array([k.rendered for k in KINDS], dtype=bool)

# semantic-kitti.yaml learning_map (raw id -> 20 training classes) and its inverse (spec 04, section 1.4).
SEMANTIC_KITTI_LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10,
    48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip
SEMANTIC_KITTI_LEARNING_MAP_INV: dict[int, int] = {
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44, 11: 48, 12: 49,
    13: 50, 14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}  # fmt: skip


def semantic_kitti_lut() -> np.ndarray:
    """Raw id -> training class, with ids mapped to "unlabeled" (and unknown ids) sent to 255, raw 0 to 0."""
    lut = np.zeros(max(SEMANTIC_KITTI_LEARNING_MAP) + 100, dtype=np.int32)
    for raw, cls in SEMANTIC_KITTI_LEARNING_MAP.items():
        lut[raw] = cls
    lut[lut == 0] = 255
    lut[0] = 0
    return lut


def kind_to_class(fmt: str) -> np.ndarray:
    """uint8 [NUM_KINDS]: the training class of each kind for a format (255 = ignored)."""
    if fmt == "semantickitti":
        return semantic_kitti_lut()[KITTI_RAW].astype(np.uint8)
    if fmt == "nuscenes-occupancy":
        out = NUSCENES_LABEL.copy()
        out[out == 0] = 255  # noise
        out[0] = 0  # empty
        return out
    if fmt == "occ3d-nuscenes":
        return OCC3D_MODEL_CLASS.copy()
    raise ValueError(
        f"unknown format {fmt!r}; expected 'semantickitti', 'nuscenes-occupancy' or 'occ3d-nuscenes'"
    )
