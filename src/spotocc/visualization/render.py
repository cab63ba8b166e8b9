"""Headless pictures of semantic occupancy grids: a 3D voxel render and a bird's-eye-view map.

The 3D render is an exact, vectorised rasteriser written in numpy (no OpenGL, no display, no
mayavi). Only the faces that can be seen are kept: a face of an occupied voxel whose neighbour in the
face's direction is empty, turned towards the camera. Each face is an axis-aligned rectangle; for
every pixel centre inside the face's projected bounding box, the pixel's ray is intersected with the
face's plane and the hit point is tested against the rectangle. A z-buffer (``np.minimum.at`` on a
key that packs depth and face id) keeps the nearest face per pixel. The result equals per-pixel ray
casting through the grid, but costs only about the on-screen area of the surface.

Conventions: grids are ``[X, Y, Z]`` labels in the grid frame of ``point_cloud_range``; x, y, z in
metres, z up. SemanticKITTI's ego vehicle is at x = 0 looking +x; nuScenes' at the range centre
looking +y (LIDAR_TOP: x right, y forward). About 650 lines in one module: the camera, the face
rasteriser and the shading make one renderer, and the bird's-eye view shares its frame and its grid
conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spotocc.visualization.colors import BACKGROUND, EGO_COLOR, label_lut

KITTI_RANGE = (0.0, -25.6, -2.0, 51.2, 25.6, 4.4)
NUSCENES_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)

# Brightness of a face by the direction its normal points to (a fixed light from above).
SHADE: dict[str, float] = {"+z": 1.0, "-z": 0.5, "+x": 0.8, "-x": 0.72, "+y": 0.88, "-y": 0.64}
# BEV height shading: a column whose top voxel is at height index k is drawn at
# colour * (BEV_SHADE_LOW + (1 - BEV_SHADE_LOW) * sqrt(k / (Z - 1))) (the square root spreads the
# low heights, where most of a street is).
BEV_SHADE_LOW = 0.7
EDGE_SHADE = 0.72  # voxel outlines, drawn where a face is at least EDGE_MIN_PIXELS wide
EDGE_MIN_PIXELS = 5.0
EGO_ID = 256  # colour-table entry of the ego-vehicle marker (labels are 0..255)


# --------------------------------------------------------------------------------------------------
# Scene frame and camera


@dataclass(frozen=True)
class SceneFrame:
    """Where the grid lies and where the ego vehicle is, in metres of the grid frame."""

    point_cloud_range: tuple[float, float, float, float, float, float]
    forward: str  # "+x" (SemanticKITTI velodyne) or "+y" (nuScenes LIDAR_TOP)
    ego_center: tuple[float, float, float]
    ego_size: tuple[float, float, float]  # (length along forward, width, height)

    @property
    def forward_axis(self) -> int:
        return {"+x": 0, "+y": 1}[self.forward]


def scene_frame(
    class_set: str, point_cloud_range: Sequence[float] | None = None, *, forward: str | None = None
) -> SceneFrame:
    """The usual frame of a benchmark: KITTI ego at x = 0 looking +x; nuScenes ego at the centre, +y.

    ``point_cloud_range`` defaults to the benchmark's; the ego box sits on the ground below the
    LiDAR (KITTI velodyne 1.73 m, nuScenes LIDAR_TOP 1.84 m above the road).
    """
    if class_set == "semantickitti":
        rng = tuple(float(v) for v in (point_cloud_range or KITTI_RANGE))
        fwd = forward or "+x"
        ground = -1.73
    elif class_set == "nuscenes":
        rng = tuple(float(v) for v in (point_cloud_range or NUSCENES_RANGE))
        fwd = forward or "+y"
        ground = -1.84
    else:
        raise ValueError(f"unknown class set {class_set!r}; expected 'semantickitti' or 'nuscenes'")
    if len(rng) != 6 or not all(rng[i] < rng[i + 3] for i in range(3)):
        raise ValueError(f"point_cloud_range must be (x0, y0, z0, x1, y1, z1) with x0 < x1 ...; got {rng}")
    if fwd not in ("+x", "+y"):
        raise ValueError(f"forward must be '+x' or '+y', got {fwd!r}")
    ground = min(max(ground, rng[2]), rng[5])  # keep the marker inside unusual z ranges
    length, width, height = 4.2, 1.8, 1.5
    return SceneFrame(rng, fwd, (0.0, 0.0, ground + height / 2), (length, width, height))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: position, orientation, focal length and principal point in pixels.

    A pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``; its ray goes through its centre.
    Depth is measured along the viewing direction.
    """

    eye: tuple[float, float, float]
    forward: tuple[float, float, float]  # unit viewing direction
    right: tuple[float, float, float]  # unit, image +col
    down: tuple[float, float, float]  # unit, image +row
    focal: float  # pixels
    cx: float
    cy: float
    width: int
    height: int

    @staticmethod
    def look_at(
        eye: Sequence[float],
        target: Sequence[float],
        *,
        width: int,
        height: int,
        focal: float,
        up: Sequence[float] = (0.0, 0.0, 1.0),
    ) -> Camera:
        """A camera at ``eye`` looking at ``target`` with ``up`` pointing up in the image."""
        eye_v = np.asarray(eye, dtype=np.float64)
        fwd = np.asarray(target, dtype=np.float64) - eye_v
        if np.linalg.norm(fwd) == 0:
            raise ValueError("camera eye and target coincide")
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, np.asarray(up, dtype=np.float64))
        if np.linalg.norm(right) < 1e-9:
            raise ValueError("camera up vector is parallel to the viewing direction")
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        return Camera(
            tuple(eye_v),
            tuple(fwd),
            tuple(right),
            tuple(down),
            float(focal),
            width / 2,
            height / 2,
            width,
            height,
        )  # type: ignore[arg-type]

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(u, v, depth)`` of points ``[..., 3]``: continuous pixel coordinates (pixel centre = +0.5)."""
        q = np.asarray(points, dtype=np.float64) - np.asarray(self.eye)
        depth = q @ np.asarray(self.forward)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.focal * (q @ np.asarray(self.right)) / depth + self.cx
            v = self.focal * (q @ np.asarray(self.down)) / depth + self.cy
        return u, v, depth

    def ray_directions(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z components of the rays through pixel centres, scaled to unit depth."""
        xn = (cols + 0.5 - self.cx) / self.focal
        yn = (rows + 0.5 - self.cy) / self.focal
        f, r, d = self.forward, self.right, self.down
        return tuple(f[k] + xn * r[k] + yn * d[k] for k in range(3))  # type: ignore[return-value]

    def scaled(self, factor: int) -> Camera:
        """The same view on an image ``factor`` times larger in each direction."""
        return Camera(
            self.eye, self.forward, self.right, self.down, self.focal * factor, self.cx * factor,
            self.cy * factor, self.width * factor, self.height * factor,
        )  # fmt: skip

    def fitted(self, points: np.ndarray, margin: float = 0.03) -> Camera:
        """This camera with focal length and principal point chosen so ``points`` fill the image."""
        unit = Camera(self.eye, self.forward, self.right, self.down, 1.0, 0.0, 0.0, self.width, self.height)
        u, v, depth = unit.project(points)
        if not (depth > 1e-6).all():
            raise ValueError("cannot fit the camera: some points are behind it")
        span_u, span_v = float(u.max() - u.min()), float(v.max() - v.min())
        focal = min(
            self.width * (1 - 2 * margin) / max(span_u, 1e-9),
            self.height * (1 - 2 * margin) / max(span_v, 1e-9),
        )
        cx = self.width / 2 - focal * float(u.max() + u.min()) / 2
        cy = self.height / 2 - focal * float(v.max() + v.min()) / 2
        return Camera(self.eye, self.forward, self.right, self.down, focal, cx, cy, self.width, self.height)


def _range_corners(rng: Sequence[float]) -> np.ndarray:
    xs, ys, zs = (rng[0], rng[3]), (rng[1], rng[4]), (rng[2], rng[5])
    return np.array([[x, y, z] for x in xs for y in ys for z in zs], dtype=np.float64)  # [8, 3]


def default_camera(frame: SceneFrame, *, width: int = 800, height: int = 520, zoom: float = 1.0) -> Camera:
    """The fixed oblique view of a street scene: from behind and above the ego vehicle, looking ahead.

    The eye is behind the grid's rear edge (or behind the ego, whichever is further back) and high
    above it, looking down at the middle of the range; focal length and principal point are fitted so
    the range box (from just below the ground to its top) fills the image. ``zoom > 1`` frames a
    smaller box instead: the range with its horizontal distances from the ego divided by ``zoom``.
    """
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    rng = list(frame.point_cloud_range)
    for k in (0, 1):
        rng[k] = frame.ego_center[k] + (rng[k] - frame.ego_center[k]) / zoom
        rng[k + 3] = frame.ego_center[k] + (rng[k + 3] - frame.ego_center[k]) / zoom
    f = frame.forward_axis
    lateral = 1 - f
    extent = rng[f + 3] - rng[f]
    size = max(extent, rng[lateral + 3] - rng[lateral])
    rear = min(rng[f], frame.ego_center[f])
    eye = np.zeros(3)
    eye[f] = rear - 0.15 * size
    eye[lateral] = frame.ego_center[lateral]
    eye[2] = rng[5] + 0.6 * size
    target = np.zeros(3)
    target[f] = rng[f] + 0.5 * extent
    target[lateral] = frame.ego_center[lateral]
    target[2] = rng[2]
    cam = Camera.look_at(eye, target, width=width, height=height, focal=1.0)
    corners = _range_corners(rng)
    ground = frame.ego_center[2] - frame.ego_size[2] / 2
    corners[:, 2] = np.maximum(corners[:, 2], ground - 0.5)  # nothing to see far below the road
    return cam.fitted(corners)


# --------------------------------------------------------------------------------------------------
# Faces


@dataclass
class _Faces:
    """Axis-aligned rectangles ``plane`` on axis ``axis``, spanning [lo_b, hi_b] x [lo_c, hi_c]."""

    axis: int  # 0, 1, 2
    sign: int  # +1 / -1: the direction the face's normal points to
    plane: np.ndarray  # [F] metres
    lo_b: np.ndarray  # [F] first in-plane axis ((axis + 1) % 3)
    hi_b: np.ndarray
    lo_c: np.ndarray  # [F] second in-plane axis ((axis + 2) % 3)
    hi_c: np.ndarray
    color_id: np.ndarray  # [F] int: label value, or EGO_ID

    @property
    def orientation(self) -> str:
        return ("+" if self.sign > 0 else "-") + "xyz"[self.axis]

    def __len__(self) -> int:
        return len(self.plane)


def _voxel_faces(
    labels: np.ndarray, drawn: np.ndarray, rng: Sequence[float], eye: Sequence[float]
) -> list[_Faces]:
    """The faces of drawn voxels that border a non-drawn voxel (or the grid edge) and face the eye."""
    occupied = drawn[labels]  # [X, Y, Z] bool
    size = labels.shape
    voxel = [(rng[k + 3] - rng[k]) / size[k] for k in range(3)]
    groups = []
    for axis in range(3):
        for sign in (1, -1):
            # index along `axis` of the plane of each voxel's face, and which voxel slices can be seen
            planes = rng[axis] + (np.arange(size[axis]) + (sign > 0)) * voxel[axis]  # [S]
            visible_slices = sign * (eye[axis] - planes) > 0
            if not visible_slices.any():
                continue
            occ = np.moveaxis(occupied, axis, 0)  # [S, B, C] with B, C the in-plane axes in order
            neighbour = np.zeros_like(occ)
            if sign > 0:
                neighbour[:-1] = occ[1:]
            else:
                neighbour[1:] = occ[:-1]
            exposed = occ & ~neighbour
            exposed &= visible_slices[:, None, None]
            s, b, c = np.nonzero(exposed)
            # moveaxis keeps the remaining axes in increasing order; the in-plane axes used below
            # are (axis+1)%3 and (axis+2)%3, so swap when they come out in the other order.
            axis_b, axis_c = sorted({0, 1, 2} - {axis})
            if (axis + 1) % 3 != axis_b:
                b, c, axis_b, axis_c = c, b, axis_c, axis_b
            groups.append(
                _Faces(
                    axis=axis,
                    sign=sign,
                    plane=planes[s],
                    lo_b=rng[axis_b] + b * voxel[axis_b],
                    hi_b=rng[axis_b] + (b + 1) * voxel[axis_b],
                    lo_c=rng[axis_c] + c * voxel[axis_c],
                    hi_c=rng[axis_c] + (c + 1) * voxel[axis_c],
                    color_id=_labels_at(labels, axis, s, b, c, axis_b),
                )
            )
    return groups


def _labels_at(
    labels: np.ndarray, axis: int, s: np.ndarray, b: np.ndarray, c: np.ndarray, axis_b: int
) -> np.ndarray:
    index: list[np.ndarray] = [s, s, s]
    index[axis] = s
    index[axis_b] = b
    index[3 - axis - axis_b] = c
    return labels[tuple(index)].astype(np.int64)


def _box_faces(
    center: Sequence[float], size: Sequence[float], eye: Sequence[float], color_id: int
) -> list[_Faces]:
    """The faces of an axis-aligned box that face the eye."""
    lo = np.asarray(center, dtype=np.float64) - np.asarray(size, dtype=np.float64) / 2
    hi = lo + np.asarray(size, dtype=np.float64)
    groups = []
    for axis in range(3):
        b, c = (axis + 1) % 3, (axis + 2) % 3
        for sign in (1, -1):
            plane = hi[axis] if sign > 0 else lo[axis]
            if sign * (eye[axis] - plane) <= 0:
                continue
            one = np.ones(1)
            groups.append(
                _Faces(
                    axis=axis,
                    sign=sign,
                    plane=plane * one,
                    lo_b=lo[b] * one,
                    hi_b=hi[b] * one,
                    lo_c=lo[c] * one,
                    hi_c=hi[c] * one,
                    color_id=np.full(1, color_id, dtype=np.int64),
                )
            )
    return groups


# --------------------------------------------------------------------------------------------------
# Rasterisation

_BUCKETS = np.array(
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
)
_CANDIDATES_PER_CHUNK = 1 << 21
_EMPTY_KEY = np.iinfo(np.int64).max
_NEAR = 1e-3


def _rasterize_group(faces: _Faces, first_id: int, camera: Camera, zkey: np.ndarray, eps: float) -> None:
    """Write ``depth << 32 | face id`` of every pixel a face covers into ``zkey`` (min = nearest)."""
    a, b_ax, c_ax = faces.axis, (faces.axis + 1) % 3, (faces.axis + 2) % 3
    corners = np.empty((len(faces), 4, 3))  # [F, 4, xyz]
    corners[:, :, a] = faces.plane[:, None]
    corners[:, :, b_ax] = np.stack([faces.lo_b, faces.hi_b, faces.lo_b, faces.hi_b], axis=1)
    corners[:, :, c_ax] = np.stack([faces.lo_c, faces.lo_c, faces.hi_c, faces.hi_c], axis=1)
    u, v, depth = camera.project(corners)  # [F, 4] each
    keep = (depth > _NEAR).all(axis=1)
    # pixel columns/rows whose centres (col + 0.5) fall in the projected bounding box
    col0 = np.clip(np.ceil(u.min(axis=1) - 0.5), 0, camera.width).astype(np.int64)
    col1 = np.clip(np.floor(u.max(axis=1) - 0.5), -1, camera.width - 1).astype(np.int64)
    row0 = np.clip(np.ceil(v.min(axis=1) - 0.5), 0, camera.height).astype(np.int64)
    row1 = np.clip(np.floor(v.max(axis=1) - 0.5), -1, camera.height - 1).astype(np.int64)
    w, h = col1 - col0 + 1, row1 - row0 + 1
    keep &= (w > 0) & (h > 0)
    ids = np.nonzero(keep)[0]
    if len(ids) == 0:
        return
    bucket_w, bucket_h = _bucket(w[ids]), _bucket(h[ids])
    eye = camera.eye
    for bw, bh in set(zip(bucket_w.tolist(), bucket_h.tolist())):
        in_bucket = ids[(bucket_w == bw) & (bucket_h == bh)]
        oy, ox = np.divmod(np.arange(bw * bh), bw)  # [bw * bh] offsets inside the box
        chunk = max(1, _CANDIDATES_PER_CHUNK // (bw * bh))
        for start in range(0, len(in_bucket), chunk):
            f = in_bucket[start : start + chunk]  # [n]
            cols = col0[f, None] + ox[None, :]  # [n, bw * bh]
            rows = row0[f, None] + oy[None, :]
            inside = (cols <= col1[f, None]) & (rows <= row1[f, None])
            d = camera.ray_directions(cols, rows)  # 3 x [n, bw * bh]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (faces.plane[f, None] - eye[a]) / d[a]  # depth of the hit on the face's plane
            hit_b = eye[b_ax] + t * d[b_ax]
            hit_c = eye[c_ax] + t * d[c_ax]
            inside &= (t > _NEAR) & np.isfinite(t)
            inside &= (hit_b >= faces.lo_b[f, None] - eps) & (hit_b <= faces.hi_b[f, None] + eps)
            inside &= (hit_c >= faces.lo_c[f, None] - eps) & (hit_c <= faces.hi_c[f, None] + eps)
            pix = (rows * camera.width + cols)[inside]
            # positive float32 depths order like their bit patterns: pack depth above the face id
            depth_bits = t[inside].astype(np.float32).view(np.int32).astype(np.int64)
            face_id = np.broadcast_to(f[:, None] + first_id, inside.shape)[inside]
            np.minimum.at(zkey, pix, (depth_bits << 32) | face_id)


def _bucket(sizes: np.ndarray) -> np.ndarray:
    """Bounding-box sizes rounded up to a few fixed sizes (multiples of 1024 beyond the table)."""
    index = np.searchsorted(_BUCKETS, sizes)
    large = index >= len(_BUCKETS)
    out = _BUCKETS[np.minimum(index, len(_BUCKETS) - 1)]
    return np.where(large, -(-sizes // 1024) * 1024, out)


@dataclass
class Rendering:
    """A 3D render: ``image`` uint8 [H, W, 3]; per pixel the ``label`` seen (-1 = background,
    ``EGO_ID`` = ego marker), its ``depth`` (inf = background) and face ``orientation`` index into
    ``ORIENTATIONS`` (-1 = background)."""

    image: np.ndarray
    label: np.ndarray
    depth: np.ndarray
    orientation: np.ndarray


ORIENTATIONS = ("+x", "-x", "+y", "-y", "+z", "-z")


def rasterize_voxels(
    labels: np.ndarray,
    class_set: str,
    *,
    camera: Camera | None = None,
    frame: SceneFrame | None = None,
    show_ignore: bool = False,
    ego: bool = True,
    edges: bool = True,
    outline_pixels: float = 1.0,
    background: Sequence[int] = tuple(BACKGROUND),
) -> Rendering:
    """Render a label grid ``[X, Y, Z]`` in 3D and return the image with its per-pixel layers.

    Faces with a corner behind the camera are skipped (the default cameras are outside the grid).

    ``frame`` defaults to :func:`scene_frame` of ``class_set``; ``camera`` to :func:`default_camera`.
    Empty voxels (0) are omitted, ignore voxels (255) too unless ``show_ignore``. Faces are shaded
    by orientation (:data:`SHADE`); with ``edges``, voxel outlines ``outline_pixels`` wide darken
    faces at least ``EDGE_MIN_PIXELS * outline_pixels`` wide on screen.
    """
    labels = _check_labels(labels)
    frame = frame or scene_frame(class_set)
    camera = camera or default_camera(frame)
    colors, drawn = label_lut(class_set, show_ignore=show_ignore)
    rng = frame.point_cloud_range
    groups = _voxel_faces(labels, drawn, rng, camera.eye)
    if ego:
        groups += _box_faces(frame.ego_center, _ego_box_size(frame), camera.eye, EGO_ID)

    zkey = np.full(camera.width * camera.height, _EMPTY_KEY, dtype=np.int64)
    voxel = [(rng[k + 3] - rng[k]) / labels.shape[k] for k in range(3)]
    eps = 1e-5 * min(voxel)
    first = 0
    for group in groups:
        _rasterize_group(group, first, camera, zkey, eps)
        first += len(group)

    outline = outline_pixels if edges else 0.0
    return _shade(zkey, groups, camera, colors, outline, np.asarray(background, dtype=np.uint8))


def _ego_box_size(frame: SceneFrame) -> tuple[float, float, float]:
    length, width, height = frame.ego_size
    return (length, width, height) if frame.forward_axis == 0 else (width, length, height)


def _shade(
    zkey: np.ndarray,
    groups: list[_Faces],
    camera: Camera,
    colors: np.ndarray,
    outline: float,
    background: np.ndarray,
) -> Rendering:
    h, w = camera.height, camera.width
    image = np.empty((h * w, 3), dtype=np.uint8)
    image[:] = background
    label = np.full(h * w, -1, dtype=np.int64)
    depth = np.full(h * w, np.inf, dtype=np.float32)
    orientation = np.full(h * w, -1, dtype=np.int64)
    hit = np.nonzero(zkey != _EMPTY_KEY)[0]
    if len(hit) == 0 or not groups:
        return Rendering(
            image.reshape(h, w, 3), label.reshape(h, w), depth.reshape(h, w), orientation.reshape(h, w)
        )
    face_id = zkey[hit] & 0xFFFFFFFF
    depth[hit] = (zkey[hit] >> 32).astype(np.int32).view(np.float32)

    # concatenated face attributes, indexed by face id
    sizes = [len(g) for g in groups]
    group_of = np.repeat(np.arange(len(groups)), sizes)
    cat = {
        k: np.concatenate([getattr(g, k) for g in groups])
        for k in ("plane", "lo_b", "hi_b", "lo_c", "hi_c", "color_id")
    }
    color_table = np.concatenate([colors, EGO_COLOR[None]]).astype(np.float64)  # [257, 3]
    shade_of_group = np.array([SHADE[g.orientation] for g in groups])
    orient_of_group = np.array([ORIENTATIONS.index(g.orientation) for g in groups])
    axis_of_group = np.array([g.axis for g in groups])

    gid = group_of[face_id]
    cid = cat["color_id"][face_id]
    factor = shade_of_group[gid]
    if outline > 0:
        factor = factor * _edge_factor(hit, face_id, gid, axis_of_group, cat, camera, outline)
    rgb = color_table[cid] * factor[:, None]
    image[hit] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    label[hit] = cid
    orientation[hit] = orient_of_group[gid]
    return Rendering(
        image.reshape(h, w, 3), label.reshape(h, w), depth.reshape(h, w), orientation.reshape(h, w)
    )


def _edge_factor(
    hit: np.ndarray,
    face_id: np.ndarray,
    gid: np.ndarray,
    axis_of_group: np.ndarray,
    cat: dict[str, np.ndarray],
    camera: Camera,
    outline: float,
) -> np.ndarray:
    """EDGE_SHADE where a pixel lies within ``outline / 2`` pixels of its face's border, else 1."""
    rows, cols = np.divmod(hit, camera.width)
    d = np.stack(camera.ray_directions(cols.astype(np.float64), rows.astype(np.float64)), axis=1)  # [P, 3]
    axis = axis_of_group[gid]
    ar = np.arange(len(hit))
    eye = np.asarray(camera.eye)
    t = (cat["plane"][face_id] - eye[axis]) / d[ar, axis]
    factor = np.ones(len(hit))
    norm = np.linalg.norm(d, axis=1)
    cos = np.abs(d[ar, axis]) / norm  # foreshortening of the face
    for lo_key, hi_key, offset in (("lo_b", "hi_b", 1), ("lo_c", "hi_c", 2)):
        ax = (axis + offset) % 3
        coord = eye[ax] + t * d[ar, ax]
        lo, hi = cat[lo_key][face_id], cat[hi_key][face_id]
        pixels = camera.focal * (hi - lo) / (t * norm) * np.maximum(cos, 0.35)  # face size on screen
        frac = np.clip((coord - lo) / (hi - lo), 0, 1)
        near_edge = np.minimum(frac, 1 - frac) * pixels < outline / 2
        factor[(pixels >= EDGE_MIN_PIXELS * outline) & near_edge] = EDGE_SHADE
    return factor


def render_3d(
    labels: np.ndarray,
    class_set: str,
    *,
    camera: Camera | None = None,
    frame: SceneFrame | None = None,
    supersample: int = 1,
    **options,
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` 3D render of a label grid (``options``: see :func:`rasterize_voxels`).

    ``supersample=k`` renders ``k x k`` samples per pixel and averages them (smooth edges, about
    ``k`` times slower).
    """
    if supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample}")
    frame = frame or scene_frame(class_set)
    camera = camera or default_camera(frame)
    if supersample == 1:
        return rasterize_voxels(labels, class_set, camera=camera, frame=frame, **options).image
    k = int(supersample)
    big = rasterize_voxels(
        labels, class_set, camera=camera.scaled(k), frame=frame, outline_pixels=k, **options
    ).image
    h, w = camera.height, camera.width
    mean = big.reshape(h, k, w, k, 3).mean(axis=(1, 3))  # [H, W, 3]
    return np.round(mean).astype(np.uint8)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a label grid [X, Y, Z], got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"labels must lie in 0..255 (255 = ignore), got {labels.min()}..{labels.max()}")
        labels = labels.astype(np.uint8)
    return labels


# --------------------------------------------------------------------------------------------------
# Bird's-eye view


def bev_image(
    labels: np.ndarray,
    class_set: str,
    *,
    forward: str = "+x",
    show_ignore: bool = False,
    height_shading: bool = True,
    scale: int = 1,
    background: Sequence[int] = tuple(BACKGROUND),
) -> np.ndarray:
    """uint8 ``[rows, cols, 3]`` top view: the colour of the top-most drawn voxel of every column.

    Forward is up and the ego's left is left: for ``forward="+x"`` (KITTI) pixel ``(r, c)`` shows
    column ``(x = X-1-r, y = Y-1-c)``; for ``"+y"`` (nuScenes, x right) it shows ``(x = c, y = Y-1-r)``.
    With ``height_shading`` the colour is scaled by :func:`bev_height_shade` of the top voxel's height
    index ``k``. Each grid cell becomes ``scale x scale`` pixels.
    """
    labels = _check_labels(labels)
    colors, drawn = label_lut(class_set, show_ignore=show_ignore)
    occupied = drawn[labels]  # [X, Y, Z]
    z = labels.shape[2]
    top = z - 1 - np.argmax(occupied[:, :, ::-1], axis=2)  # [X, Y] index of the top drawn voxel
    has = occupied.any(axis=2)
    top_label = np.take_along_axis(labels, top[:, :, None], axis=2)[:, :, 0]
    rgb = colors[top_label].astype(np.float64)  # [X, Y, 3]
    if height_shading:
        rgb *= bev_height_shade(top, z)[:, :, None]
    out = np.empty(labels.shape[:2] + (3,), dtype=np.uint8)
    out[:] = np.asarray(background, dtype=np.uint8)
    out[has] = np.clip(np.round(rgb[has]), 0, 255).astype(np.uint8)
    out = _bev_orient(out, forward)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def bev_height_shade(k: np.ndarray | int, z_size: int) -> np.ndarray:
    """Brightness factor of a BEV pixel whose top voxel is at height index ``k`` of ``z_size``."""
    return BEV_SHADE_LOW + (1 - BEV_SHADE_LOW) * np.sqrt(np.asarray(k) / max(z_size - 1, 1))


def _bev_orient(grid_xy: np.ndarray, forward: str) -> np.ndarray:
    """An ``[X, Y, ...]`` map turned so forward is up and left is left."""
    if forward == "+x":
        return np.ascontiguousarray(grid_xy[::-1, ::-1])
    if forward == "+y":
        return np.ascontiguousarray(np.swapaxes(grid_xy, 0, 1)[::-1])
    raise ValueError(f"forward must be '+x' or '+y', got {forward!r}")


def bev_ego_box(frame: SceneFrame, grid_shape: Sequence[int], scale: int = 1) -> tuple[int, int, int, int]:
    """``(row0, col0, row1, col1)`` pixel box (inclusive) of the ego vehicle in :func:`bev_image`."""
    rng = frame.point_cloud_range
    size = _ego_box_size(frame)
    voxel = [(rng[k + 3] - rng[k]) / grid_shape[k] for k in range(2)]
    lo = [(frame.ego_center[k] - size[k] / 2 - rng[k]) / voxel[k] for k in range(2)]  # grid units
    hi = [(frame.ego_center[k] + size[k] / 2 - rng[k]) / voxel[k] for k in range(2)]
    nx, ny = grid_shape[0], grid_shape[1]
    if frame.forward == "+x":
        r0, r1 = nx - hi[0], nx - lo[0]
        c0, c1 = ny - hi[1], ny - lo[1]
    else:
        r0, r1 = ny - hi[1], ny - lo[1]
        c0, c1 = lo[0], hi[0]
    return (
        int(np.floor(r0 * scale)),
        int(np.floor(c0 * scale)),
        int(np.ceil(r1 * scale)) - 1,
        int(np.ceil(c1 * scale)) - 1,
    )


def draw_bev_ego(
    image: np.ndarray, frame: SceneFrame, grid_shape: Sequence[int], scale: int = 1
) -> np.ndarray:
    """A copy of a BEV image with the ego vehicle drawn as a dark rectangle (clipped to the image)."""
    out = image.copy()
    r0, c0, r1, c1 = bev_ego_box(frame, grid_shape, scale)
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, out.shape[0] - 1), min(c1, out.shape[1] - 1)
    if r0 <= r1 and c0 <= c1:
        out[r0 : r1 + 1, c0 : c1 + 1] = EGO_COLOR
    return out
