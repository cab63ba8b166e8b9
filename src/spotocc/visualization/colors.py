"""Class colour palettes of the two benchmarks, as the datasets' own tools draw them.

* SemanticKITTI: the ``color_map`` of the official ``semantic-kitti.yaml``, which is written in
  **B, G, R** order per raw label id; each of the 20 learning classes takes the colour of its raw id
  in ``learning_map_inv``. Converted to RGB here.
* nuScenes-Occupancy: the palette the OpenOccupancy / SurroundOcc visualisations use for its 17
  classes (RGB).
* Occ3D-nuScenes (model order, free first): ``others`` in black, the other 16 classes in their
  nuScenes-Occupancy colours.

Class 0 (empty) is never drawn; voxels labelled 255 (ignore) are drawn only on request, in
:data:`IGNORE_COLOR`.
"""

from __future__ import annotations

import numpy as np

from spotocc.data.classes import IGNORE_INDEX, class_set

# semantic-kitti.yaml ``color_map`` (B, G, R) of the raw ids the learning classes map back to.
_SEMANTIC_KITTI_BGR_BY_RAW_ID: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0),
    10: (245, 150, 100),
    11: (245, 230, 100),
    15: (150, 60, 30),
    18: (180, 30, 80),
    20: (255, 0, 0),
    30: (30, 30, 255),
    31: (200, 40, 255),
    32: (90, 30, 150),
    40: (255, 0, 255),
    44: (255, 150, 255),
    48: (75, 0, 75),
    49: (75, 0, 175),
    50: (0, 200, 255),
    51: (50, 120, 255),
    70: (0, 175, 0),
    71: (0, 60, 135),
    72: (80, 240, 150),
    80: (150, 240, 255),
    81: (0, 0, 255),
}

# semantic-kitti.yaml ``learning_map_inv``: learning class -> raw id.
SEMANTIC_KITTI_LEARNING_MAP_INV: tuple[int, ...] = (
    0, 10, 11, 15, 18, 20, 30, 31, 32, 40, 44, 48, 49, 50, 51, 70, 71, 72, 80, 81,
)  # fmt: skip

SEMANTIC_KITTI_COLORS = np.array(
    [_SEMANTIC_KITTI_BGR_BY_RAW_ID[raw][::-1] for raw in SEMANTIC_KITTI_LEARNING_MAP_INV], dtype=np.uint8
)  # [20, 3] RGB

NUSCENES_OCC_COLORS = np.array(
    [
        (0, 0, 0),  # empty (never drawn)
        (255, 120, 50),  # barrier: orange
        (255, 192, 203),  # bicycle: pink
        (255, 255, 0),  # bus: yellow
        (0, 150, 245),  # car: blue
        (0, 255, 255),  # construction_vehicle: cyan
        (200, 180, 0),  # motorcycle: dark yellow
        (255, 0, 0),  # pedestrian: red
        (255, 240, 150),  # traffic_cone: light yellow
        (135, 60, 0),  # trailer: brown
        (160, 32, 240),  # truck: purple
        (255, 0, 255),  # driveable_surface: magenta
        (139, 137, 137),  # other_flat: grey
        (75, 0, 75),  # sidewalk: dark purple
        (150, 240, 80),  # terrain: light green
        (230, 230, 250),  # manmade: lavender white
        (0, 175, 0),  # vegetation: green
    ],
    dtype=np.uint8,
)  # [17, 3] RGB

IGNORE_COLOR = np.array((200, 200, 200), dtype=np.uint8)  # voxels labelled 255, when shown
EGO_COLOR = np.array((45, 45, 45), dtype=np.uint8)  # the ego-vehicle marker
BACKGROUND = np.array((255, 255, 255), dtype=np.uint8)

OCC3D_COLORS = np.concatenate([NUSCENES_OCC_COLORS[:1], [(0, 0, 0)], NUSCENES_OCC_COLORS[1:]]).astype(
    np.uint8
)  # [18, 3] RGB: free (never drawn), others, barrier .. vegetation

_PALETTES = {"semantickitti": SEMANTIC_KITTI_COLORS, "nuscenes": NUSCENES_OCC_COLORS, "occ3d": OCC3D_COLORS}


def class_names(name: str) -> tuple[str, ...]:
    """Class names of a class set (``"semantickitti"``, ``"nuscenes"`` or ``"occ3d"``), index = label id."""
    return class_set(name)[0]


def class_colors(name: str) -> np.ndarray:
    """uint8 ``[C, 3]`` RGB colour of every class of a class set (row 0 = empty, never drawn)."""
    class_set(name)  # a clear error for an unknown name
    return _PALETTES[name].copy()


def label_lut(name: str, *, show_ignore: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(colors [256, 3] uint8, drawn [256] bool)``: lookup tables indexed by a label value.

    Drawn: the classes ``1..C-1``, and 255 when ``show_ignore``. Other values (0 = empty, ids
    outside the class set) are not drawn.
    """
    palette = class_colors(name)
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(palette)] = palette
    colors[IGNORE_INDEX] = IGNORE_COLOR
    drawn = np.zeros(256, dtype=bool)
    drawn[1 : len(palette)] = True
    drawn[IGNORE_INDEX] = show_ignore
    return colors, drawn


def classes_present(labels: np.ndarray, name: str) -> list[int]:
    """Sorted class ids ``1..C-1`` that occur in ``labels`` (the legend entries)."""
    num_classes = len(class_names(name))
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).reshape(-1), minlength=256)
    return [c for c in range(1, num_classes) if counts[c] > 0]
