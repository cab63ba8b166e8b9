"""A procedural street scene as a label grid: for pictures, renderer tests and benchmarks.

Road along the ego's forward axis, sidewalks, terrain, buildings with gaps, parked and driving cars,
a truck, trees (trunk + crown), poles with signs, pedestrians and a fence, all as axis-aligned boxes
in metres, so the same scene fits any grid size of a benchmark's range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spotocc.visualization.render import SceneFrame, scene_frame

# Class ids of the scene's parts in each class set.
_IDS = {
    "semantickitti": {
        "road": 9, "parking": 10, "sidewalk": 11, "terrain": 17, "building": 13, "fence": 14,
        "vegetation": 15, "trunk": 16, "pole": 18, "sign": 19, "car": 1, "truck": 4, "person": 6,
        "bicycle": 2,
    },
    "nuscenes": {
        "road": 11, "parking": 12, "sidewalk": 13, "terrain": 14, "building": 15, "fence": 1,
        "vegetation": 16, "trunk": 16, "pole": 15, "sign": 15, "car": 4, "truck": 10, "person": 7,
        "bicycle": 2,
    },
}  # fmt: skip


def street_scene(
    occ_size: Sequence[int],
    class_set: str = "semantickitti",
    *,
    frame: SceneFrame | None = None,
    seed: int = 0,
) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` labels of a street scene in ``frame`` (default: the benchmark's frame)."""
    frame = frame or scene_frame(class_set)
    ids = _IDS[class_set]
    rng_box = frame.point_cloud_range
    size = tuple(int(v) for v in occ_size)
    labels = np.zeros(size, dtype=np.uint8)
    f, lat = frame.forward_axis, 1 - frame.forward_axis
    sign_lat = 1.0 if f == 0 else -1.0  # lateral coordinate "left of the ego" in metres is sign * axis
    rand = np.random.default_rng(seed)
    ground = frame.ego_center[2] - frame.ego_size[2] / 2
    fwd_lo, fwd_hi = rng_box[f], rng_box[f + 3]

    def box(cls: str, fwd: tuple[float, float], left: tuple[float, float], z: tuple[float, float]) -> None:
        """Fill the voxels whose centres lie in the box (forward range, leftward range, height range)."""
        lo, hi = [0.0] * 3, [0.0] * 3
        lo[f], hi[f] = fwd
        a, b = sign_lat * left[0], sign_lat * left[1]
        lo[lat], hi[lat] = min(a, b), max(a, b)
        lo[2], hi[2] = z
        index = []
        for k in range(3):
            voxel = (rng_box[k + 3] - rng_box[k]) / size[k]
            i0 = int(np.ceil((lo[k] - rng_box[k]) / voxel - 0.5))
            i1 = int(np.floor((hi[k] - rng_box[k]) / voxel - 0.5))
            i0, i1 = max(i0, 0), min(i1, size[k] - 1)
            if i0 > i1:
                return
            index.append(slice(i0, i1 + 1))
        labels[tuple(index)] = ids[cls]

    lat_lo = sign_lat * rng_box[lat] if sign_lat > 0 else -rng_box[lat + 3]
    lat_hi = sign_lat * rng_box[lat + 3] if sign_lat > 0 else -rng_box[lat]
    layer = (ground - 0.45, ground)  # the ground is about two 0.2 m voxels thick
    box("terrain", (fwd_lo, fwd_hi), (lat_lo, lat_hi), layer)
    box("road", (fwd_lo, fwd_hi), (-4.5, 4.5), layer)
    box(
        "road",
        (fwd_lo + 0.55 * (fwd_hi - fwd_lo), fwd_lo + 0.55 * (fwd_hi - fwd_lo) + 8),
        (lat_lo, lat_hi),
        layer,
    )
    for side in (-1, 1):
        box("sidewalk", (fwd_lo, fwd_hi), sorted((side * 4.5, side * 7.5)), (ground - 0.45, ground + 0.15))
        box(
            "parking",
            (fwd_lo + 6, fwd_lo + 18),
            sorted((side * 4.5, side * 2.0)),
            (ground - 0.45, ground + 0.02),
        )
    cross = (fwd_lo + 0.55 * (fwd_hi - fwd_lo), fwd_lo + 0.55 * (fwd_hi - fwd_lo) + 8)

    # buildings on both sides with gaps, and a fence in one gap
    for side in (-1, 1):
        pos = fwd_lo + rand.uniform(0, 4)
        while pos < fwd_hi:
            length = rand.uniform(8, 20)
            if not (pos + length < cross[0] or pos > cross[1]):
                pos = cross[1] + 1
                continue
            depth = rand.uniform(6, 12)
            top = ground + rand.uniform(4, 12)
            near = 9.0 + rand.uniform(0, 2)
            box("building", (pos, pos + length), sorted((side * near, side * (near + depth))), (ground, top))
            gap = rand.uniform(3, 9)
            box(
                "fence",
                (pos + length, pos + length + gap),
                sorted((side * 8.6, side * 8.8)),
                (ground, ground + 1.4),
            )
            pos += length + gap

    # trees and poles along the sidewalks
    for side in (-1, 1):
        for pos in np.arange(fwd_lo + 3, fwd_hi, 9.0) + rand.uniform(-1, 1):
            if rand.random() < 0.6:
                trunk = sorted((side * 6.0, side * 6.4))
                box("trunk", (pos, pos + 0.4), trunk, (ground, ground + 2.5))
                box(
                    "vegetation",
                    (pos - 1.6, pos + 2.0),
                    sorted((side * 4.5, side * 7.9)),
                    (ground + 2.4, ground + 5.5),
                )
            else:
                box("pole", (pos, pos + 0.2), sorted((side * 5.0, side * 5.2)), (ground, ground + 4.0))
                box(
                    "sign",
                    (pos - 0.3, pos + 0.5),
                    sorted((side * 4.8, side * 5.4)),
                    (ground + 3.2, ground + 3.9),
                )

    # vehicles: parked along the kerb, driving in both lanes, one truck
    for side in (-1, 1):
        for pos in np.arange(fwd_lo + 7, fwd_lo + 17, 5.0):
            box("car", (pos, pos + 4.2), sorted((side * 2.3, side * 4.1)), (ground, ground + 1.5))
    for k, pos in enumerate(np.arange(fwd_lo + 8, fwd_hi - 4, 11.0)):
        left = (0.6, 2.4) if k % 2 else (-2.4, -0.6)
        if abs(pos - frame.ego_center[f]) > 6:
            box("car", (pos, pos + 4.4), left, (ground, ground + 1.5))
    box("truck", (fwd_hi - 16, fwd_hi - 7), (-2.8, -0.3), (ground, ground + 3.4))

    # pedestrians and a bicycle on the sidewalks
    for pos in rand.uniform(fwd_lo + 2, fwd_hi - 2, 6):
        side = rand.choice([-1, 1])
        lat0 = side * rand.uniform(5, 7)
        box("person", (pos, pos + 0.6), (lat0, lat0 + 0.6), (ground, ground + 1.8))
    box("bicycle", (fwd_lo + 24, fwd_lo + 25.8), (5.2, 5.8), (ground, ground + 1.1))

    # keep the ego vehicle's own space free
    ego_lo = [frame.ego_center[k] - s / 2 for k, s in enumerate(_ego_extent(frame))]
    ego_hi = [frame.ego_center[k] + s / 2 for k, s in enumerate(_ego_extent(frame))]
    index = []
    for k in range(3):
        voxel = (rng_box[k + 3] - rng_box[k]) / size[k]
        i0 = max(int(np.floor((ego_lo[k] - rng_box[k]) / voxel)), 0)
        i1 = min(int(np.ceil((ego_hi[k] - rng_box[k]) / voxel)), size[k])
        index.append(slice(i0, max(i0, i1)))
    labels[tuple(index)] = 0
    return labels


def _ego_extent(frame: SceneFrame) -> tuple[float, float, float]:
    length, width, height = frame.ego_size
    return (length, width, height) if frame.forward_axis == 0 else (width, length, height)
