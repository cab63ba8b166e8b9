"""Procedural street scenes rasterised into a grid of kinds (see :mod:`kinds`).

Everything is laid out in a *road frame* (s along the street the ego car drives on, l to the left,
z up; the ego LiDAR at s = l = 0), then mapped to the grid frame: SemanticKITTI velodyne (x = s,
y = l) or nuScenes LIDAR_TOP (x = -l, y = s). The street has a random lateral offset, heading and
curvature, 1-3 lanes per direction and an optional median; on each side an optional parking strip,
a raised sidewalk and a frontage of buildings, open terrain with trees and fences, or a parking lot;
optionally a cross street. Vehicles, people, poles, signs, cones and barriers are placed on it.

Ground surfaces are one voxel thick and watertight (a column is filled down to one voxel above its
lowest neighbour) so rays never leak below the ground. Objects are rasterised by sampling points at
half the voxel size, so thin things (poles, fences, people) always occupy at least one voxel; they
never overwrite ground voxels, except buildings, which replace the ground under their footprint.
About 600 lines in one module: the road, the rasteriser and the placement of every kind of object
share the road frame and its private helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spotocc.data.synthetic.geometry import WorldGrid
from spotocc.data.synthetic.kinds import KIND_ID

GROUND_KINDS = tuple(KIND_ID[k] for k in ("road", "parking", "sidewalk", "other-ground", "terrain"))


@dataclass
class Scene:
    """A rasterised scene: ``kinds`` (uint8) and per-instance ``tint`` ids (uint8), both world-grid shaped."""

    world: WorldGrid
    kinds: np.ndarray
    tint: np.ndarray
    layout: dict[str, Any] = field(default_factory=dict)  # the sampled layout parameters (for debugging)


@dataclass
class _Side:
    parking: float  # width of the parking strip along the road (0: none)
    sidewalk: float  # width of the sidewalk (0: none)
    curb: float  # height of the sidewalk above the road
    frontage: str  # "buildings", "open" or "parking_lot"
    setback: float  # buildings: distance from the sidewalk's outer edge
    lot_depth: float  # parking_lot: its depth


@dataclass
class _Road:
    forward: str  # "x" (SemanticKITTI) or "y" (nuScenes)
    l0: float
    heading: float
    curvature: float
    lane_width: float
    lanes: int
    median: float  # half width of the median strip (0: none)
    z0: float
    slope_s: float
    slope_l: float
    undulation: tuple[float, float, float, float, float]  # amplitude, wavelengths s/l, phases s/l
    left: _Side
    right: _Side
    cross: tuple[float, float, float] | None  # (s of the centre, half width, sidewalk width)

    @property
    def half_width(self) -> float:
        return self.median + self.lanes * self.lane_width

    def centre(self, s: np.ndarray) -> np.ndarray:
        return self.l0 + self.heading * s + self.curvature * s * s

    def direction(self, s: np.ndarray) -> np.ndarray:
        """Angle of the street axis from the s axis towards l."""
        return np.arctan(self.heading + 2 * self.curvature * s)

    def side_value(self, d: np.ndarray, attr: str) -> np.ndarray:
        return np.where(d >= 0, getattr(self.left, attr), getattr(self.right, attr))

    def edges(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outer edge of the parking strip and of the sidewalk, as distances from the centre line."""
        e_park = self.half_width + self.side_value(d, "parking")
        return e_park, e_park + self.side_value(d, "sidewalk")

    def in_cross(self, s: np.ndarray, margin: float = 0.0) -> np.ndarray:
        if self.cross is None:
            return np.zeros(np.shape(s), dtype=bool)
        sc, hw, sw = self.cross
        return np.abs(s - sc) < hw + sw + margin

    def to_grid(self, s: np.ndarray, l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (s, l) if self.forward == "x" else (-l, s)

    def to_road(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x, y) if self.forward == "x" else (y, -x)

    def surface(self, s: np.ndarray, l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kind id, surface height) of the ground at road-frame points."""
        d = l - self.centre(s)
        a = np.abs(d)
        e_park, e_side = self.edges(d)
        curb = self.side_value(d, "curb")
        base = self.z0 + self.slope_s * s + self.slope_l * l
        amp, ws, wl, ps, pl = self.undulation
        far = np.clip((a - e_side) / 6.0, 0.0, 1.0)
        terrain_h = base + 0.5 * curb + amp * far * np.sin(s / ws + ps) * np.sin(l / wl + pl)
        kind = np.full(a.shape, KIND_ID["terrain"], dtype=np.uint8)
        height = terrain_h.copy()
        lot = (self.side_value(d, "frontage") == "parking_lot") & (a >= e_side)
        lot &= a < e_side + self.side_value(d, "lot_depth")
        for mask, name, h in (
            (lot, "parking", base),
            (a < e_side, "sidewalk", base + curb),
            (a < e_park, "parking", base),
            (a < self.half_width, "road", base),
            (a < self.median, "other-ground", base + curb),
        ):
            kind[mask] = KIND_ID[name]
            height[mask] = h[mask]
        if self.cross is not None:
            sc, hw, sw = self.cross
            beyond = a >= self.half_width
            walk = beyond & (np.abs(s - sc) < hw + sw) & (a >= e_park)
            kind[walk] = KIND_ID["sidewalk"]
            height[walk] = (base + curb)[walk]
            street = beyond & (np.abs(s - sc) < hw)
            kind[street] = KIND_ID["road"]
            height[street] = base[street]
        return kind, height


def _sample_side(rng: np.random.Generator) -> _Side:
    frontage = str(rng.choice(["buildings", "open", "parking_lot"], p=[0.55, 0.32, 0.13]))
    return _Side(
        parking=float(rng.uniform(2.2, 2.6)) if rng.random() < 0.3 else 0.0,
        sidewalk=float(rng.uniform(1.5, 4.0)) if rng.random() < 0.85 else 0.0,
        curb=float(rng.uniform(0.1, 0.2)),
        frontage=frontage,
        setback=float(rng.uniform(0.0, 5.0)),
        lot_depth=float(rng.uniform(8.0, 20.0)),
    )


def _sample_road(
    rng: np.random.Generator, forward: str, s_range: tuple[float, float], lidar_height: float
) -> _Road:
    lanes = int(rng.choice([1, 1, 2, 2, 3]))
    lane_w = float(rng.uniform(2.9, 3.6))
    median = float(rng.uniform(0.6, 1.5)) if lanes >= 2 and rng.random() < 0.3 else 0.0
    ego_lane = int(rng.integers(lanes))
    d_ego = -(median + lane_w * (ego_lane + 0.5)) + float(rng.uniform(-0.3, 0.3))
    cross = None
    if rng.random() < 0.35:
        lo, hi = s_range
        sc = float(rng.uniform(lo + 0.25 * (hi - lo), hi - 0.1 * (hi - lo)))
        if abs(sc) > 12.0:  # the ego car is not in the middle of a crossing
            cross = (sc, float(rng.uniform(3.0, 6.0)), float(rng.uniform(1.5, 3.0)))
    return _Road(
        forward=forward,
        l0=-d_ego,
        heading=float(rng.uniform(-0.1, 0.1)),
        curvature=float(rng.uniform(-0.005, 0.005)),
        lane_width=lane_w,
        lanes=lanes,
        median=median,
        z0=-lidar_height + float(rng.uniform(-0.1, 0.08)),
        slope_s=float(rng.uniform(-0.004, 0.02)),
        slope_l=float(rng.uniform(-0.006, 0.006)),
        undulation=(
            float(rng.uniform(0.0, 0.5)),
            float(rng.uniform(4.0, 12.0)),
            float(rng.uniform(4.0, 12.0)),
            float(rng.uniform(0, 2 * np.pi)),
            float(rng.uniform(0, 2 * np.pi)),
        ),
        left=_sample_side(rng),
        right=_sample_side(rng),
        cross=cross,
    )


class _Rasteriser:
    """Writes ground columns and point-sampled objects into the kind and tint grids."""

    def __init__(self, world: WorldGrid, road: _Road, rng: np.random.Generator) -> None:
        self.world = world
        self.road = road
        self.rng = rng
        self.kinds = np.zeros(world.shape, dtype=np.uint8)
        self.tint = np.zeros(world.shape, dtype=np.uint8)
        self.step_h = float(min(world.voxel_size[0], world.voxel_size[1])) / 2
        self.step_z = float(world.voxel_size[2]) / 2
        self.is_ground = np.zeros(256, dtype=bool)
        self.is_ground[list(GROUND_KINDS)] = True

    # ---- ground
    def ground(self) -> None:
        w = self.world
        x, y = np.meshgrid(w.centres(0), w.centres(1), indexing="ij")  # [NX, NY]
        s, l = self.road.to_road(x, y)
        self.column_s, self.column_d = s, l - self.road.centre(s)  # road coordinates of the columns
        kind, height = self.road.surface(s, l)
        k_top = np.clip(np.floor((height - w.grid_min[2]) / w.voxel_size[2]), 0, w.shape[2] - 1).astype(
            np.int64
        )
        padded = np.pad(k_top, 1, mode="edge")
        lowest_nb = np.minimum.reduce(
            [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )  # [NX, NY]
        k_lo = np.minimum(k_top, lowest_nb + 1)
        k = np.arange(w.shape[2])
        fill = (k >= k_lo[..., None]) & (k <= k_top[..., None])  # [NX, NY, NZ]
        self.kinds[fill] = np.broadcast_to(kind[..., None], fill.shape)[fill]
        self.tint[fill] = self.rng.integers(0, 256, dtype=np.uint8)
        self.k_top = k_top
        self.height = height

    def fill_columns(
        self,
        mask: np.ndarray,
        k_bottom: np.ndarray,
        z_top: np.ndarray,
        kind: str,
        tint: int,
        only_empty: bool = False,
    ) -> None:
        """Fill the columns of the 2D ``mask`` [NX, NY] from voxel ``k_bottom`` up to height ``z_top``."""
        ii, jj = np.nonzero(mask)
        if ii.size == 0:
            return
        box = (slice(ii.min(), ii.max() + 1), slice(jj.min(), jj.max() + 1))  # bounding box of the mask
        w = self.world
        k_top = np.floor((z_top[box] - w.grid_min[2]) / w.voxel_size[2])
        k = np.arange(w.shape[2])
        fill = mask[box][..., None] & (k >= k_bottom[box][..., None]) & (k <= k_top[..., None])  # [x, y, NZ]
        if only_empty:
            fill &= self.kinds[box] == 0
        self.kinds[box][fill] = KIND_ID[kind]
        self.tint[box][fill] = tint

    def built_over(self, s: float, d: float, radius: float) -> bool:
        """True if a building stands within ``radius`` metres (in s and l) of the road-frame point."""
        l = float(self.road.centre(np.array(s))) + d
        near = (np.abs(self.column_s - s) <= radius) & (
            np.abs(self.column_d + self.road.centre(self.column_s) - l) <= radius
        )
        return bool((self.kinds[near] == KIND_ID["building"]).any())

    def height_at(self, s: np.ndarray | float, l: np.ndarray | float) -> np.ndarray:
        """Ground surface height of the voxel columns under road-frame points (objects stand on it)."""
        w = self.world
        x, y = self.road.to_grid(np.asarray(s, dtype=np.float64), np.asarray(l, dtype=np.float64))
        i = np.clip(np.floor((x - w.grid_min[0]) / w.voxel_size[0]), 0, w.shape[0] - 1).astype(np.int64)
        j = np.clip(np.floor((y - w.grid_min[1]) / w.voxel_size[1]), 0, w.shape[1] - 1).astype(np.int64)
        return self.height[i, j]

    # ---- objects
    def stamp(
        self, pts_road: np.ndarray, kind: str, tint: int | None = None, over_ground: bool = False
    ) -> None:
        """Mark the voxels containing road-frame points [N, 3] with ``kind``."""
        if pts_road.size == 0:
            return
        x, y = self.road.to_grid(pts_road[:, 0], pts_road[:, 1])
        idx = self.world.index_of(np.stack([x, y, pts_road[:, 2]], axis=1))  # [N, 3]
        ok = np.all((idx >= 0) & (idx < np.asarray(self.world.shape)), axis=1)
        flat = np.unique(np.ravel_multi_index(idx[ok].T, self.world.shape))
        if not over_ground:
            flat = flat[~self.is_ground[self.kinds.reshape(-1)[flat]]]
        self.kinds.reshape(-1)[flat] = KIND_ID[kind]
        self.tint.reshape(-1)[flat] = self.rng.integers(0, 256) if tint is None else tint

    def place(
        self, local: np.ndarray, s: float, d: float, yaw: float = 0.0, z: float | None = None
    ) -> np.ndarray:
        """Local object points [N, 3] (x along the street, y left, z up from the ground) -> road frame."""
        l = float(self.road.centre(np.array(s))) + d
        theta = float(self.road.direction(np.array(s))) + yaw
        base = float(self.height_at(s, l)) if z is None else z
        c, sn = np.cos(theta), np.sin(theta)
        out = np.empty_like(local)
        out[:, 0] = s + c * local[:, 0] - sn * local[:, 1]
        out[:, 1] = l + sn * local[:, 0] + c * local[:, 1]
        out[:, 2] = base + local[:, 2]
        return out

    def box(self, lx: float, ly: float, z0: float, z1: float, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
        """Points filling a box centred at (x0, y0) with sizes lx, ly, from height z0 to z1."""
        xs = x0 + _axis(lx, self.step_h)
        ys = y0 + _axis(ly, self.step_h)
        zs = np.linspace(z0, z1, max(2, int(np.ceil((z1 - z0) / self.step_z)) + 1))
        g = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1)  # [nx, ny, nz, 3]
        return g.reshape(-1, 3)

    def cylinder(self, r: float, z0: float, z1: float) -> np.ndarray:
        p = self.box(2 * r, 2 * r, z0, z1)
        return p[p[:, 0] ** 2 + p[:, 1] ** 2 <= r * r + 1e-9]

    def ellipsoid(self, rx: float, ry: float, rz: float, zc: float) -> np.ndarray:
        p = self.box(2 * rx, 2 * ry, zc - rz, zc + rz)
        q = (p[:, 0] / rx) ** 2 + (p[:, 1] / ry) ** 2 + ((p[:, 2] - zc) / rz) ** 2
        return p[q <= 1.0 + 1e-9]


def _axis(length: float, step: float) -> np.ndarray:
    """Symmetric sample positions over [-length/2, length/2], always including the centre."""
    half = max(1, int(np.ceil(length / (2 * step))))
    return np.linspace(-length / 2, length / 2, 2 * half + 1)


def build_scene(
    world: WorldGrid,
    rng: np.random.Generator,
    *,
    forward: str,
    lidar_height: float,
    gt_range: tuple[float, float, float, float, float, float],
) -> Scene:
    """Sample and rasterise one street scene into ``world``; the ego LiDAR sits at the grid-frame origin."""
    if forward == "x":
        s_range = (gt_range[0], gt_range[3])
    else:
        s_range = (gt_range[1], gt_range[4])
    # Objects are placed over the padded world so the cameras see a populated street beyond the GT range.
    corners = [world.grid_min[a] + np.array([0, world.shape[a]]) * world.voxel_size[a] for a in range(2)]
    s_world = (corners[0] if forward == "x" else corners[1]).tolist()
    l_world = (corners[1] if forward == "x" else -corners[0][::-1]).tolist()
    road = _sample_road(rng, forward, s_range, lidar_height)
    r = _Rasteriser(world, road, rng)
    r.ground()
    s_lo, s_hi = s_world
    for side in (1, -1):
        _buildings(r, side, s_lo, s_hi)
        _street_furniture(r, side, s_lo, s_hi)
        _open_frontage(r, side, s_lo, s_hi, l_world)
        _parking(r, side, s_lo, s_hi)
    _traffic(r, s_lo, s_hi)
    _people(r, s_lo, s_hi)
    _road_works(r, s_lo, s_hi)
    _noise(r, gt_range)
    layout = {
        "lanes": road.lanes,
        "lane_width": road.lane_width,
        "centre_offset": road.l0,
        "heading": road.heading,
        "curvature": road.curvature,
        "median": road.median,
        "ground_z": road.z0,
        "cross_street": road.cross,
        "frontage": (road.left.frontage, road.right.frontage),
    }
    return Scene(world=world, kinds=r.kinds, tint=r.tint, layout=layout)


# --------------------------------------------------------------------------------------------------
# Scene elements


def _free_of_ego(s: float, d: float, road: _Road, radius: float = 3.5) -> bool:
    """True unless (s, d) is within ``radius`` of the ego car (which stands at s = 0, l = 0)."""
    l = float(road.centre(np.array(s))) + d
    return abs(s) > radius + 2.0 or abs(l) > radius


def _along(rng: np.random.Generator, s_lo: float, s_hi: float, gap: tuple[float, float]) -> list[float]:
    out, s = [], s_lo + rng.uniform(0, gap[1])
    while s < s_hi:
        out.append(float(s))
        s += rng.uniform(*gap)
    return out


def _buildings(r: _Rasteriser, side: int, s_lo: float, s_hi: float) -> None:
    """A row of buildings along the sidewalk (``buildings`` frontage) and sometimes a row further back."""
    road, rng = r.road, r.rng
    info = road.left if side > 0 else road.right
    s, d = r.column_s, r.column_d * side  # [NX, NY]
    cross = road.in_cross(s, 1.0)
    _, e_side = road.edges(np.full(1, float(side)))
    rows = []
    if info.frontage == "buildings":
        rows.append((float(e_side[0]) + info.setback, True))
    if rng.random() < 0.5:
        back = float(e_side[0]) + (info.lot_depth if info.frontage == "parking_lot" else 0.0)
        rows.append((back + rng.uniform(18.0, 30.0), False))
    for inner, front_row in rows:
        s0 = s_lo + rng.uniform(-10, 5)
        while s0 < s_hi:
            length, depth = rng.uniform(8, 28), rng.uniform(8, 16)
            height = rng.uniform(4, 16)
            foot = (s >= s0) & (s < s0 + length) & (d >= inner) & (d < inner + depth) & ~cross
            tint = int(rng.integers(0, 256))
            r.fill_columns(foot, r.k_top, r.height + height, "building", tint)
            if front_row and rng.random() < 0.3:  # a hedge in front of the building
                hedge = (s >= s0) & (s < s0 + length) & (d >= inner - 1.0) & (d < inner - 0.2) & ~cross
                z_top = r.height + rng.uniform(0.6, 1.3)
                r.fill_columns(hedge, r.k_top + 1, z_top, "vegetation", tint, only_empty=True)
            s0 += length + rng.uniform(0, 7 if front_row else 15)


def _street_furniture(r: _Rasteriser, side: int, s_lo: float, s_hi: float) -> None:
    """Poles (some carrying a traffic sign) near the curb and street trees along the sidewalk."""
    road, rng = r.road, r.rng
    info = road.left if side > 0 else road.right
    e_park, e_side = (float(v[0]) for v in road.edges(np.full(1, float(side))))
    for s in _along(rng, s_lo, s_hi, (10.0, 35.0)):
        d = side * (e_park + min(0.5, max(info.sidewalk - 0.3, 0.3)))
        if road.in_cross(np.array(s)) or not _free_of_ego(s, d, road):
            continue
        h = rng.uniform(3.5, 8.0)
        r.stamp(r.place(r.cylinder(rng.uniform(0.08, 0.15), 0.0, h), s, d), "pole")
        if rng.random() < 0.45:
            plate = r.box(0.06, rng.uniform(0.5, 0.9), h - rng.uniform(0.6, 1.0), h - 0.05, y0=-side * 0.2)
            r.stamp(r.place(plate, s, d), "traffic-sign")
    if info.sidewalk > 2.2 and rng.random() < 0.45:
        for s in _along(rng, s_lo, s_hi, (7.0, 15.0)):
            d = side * (e_side - 0.8)
            if not road.in_cross(np.array(s), 1.0) and _free_of_ego(s, d, road):
                _tree(r, s, d, scale=0.8)


def _tree(r: _Rasteriser, s: float, d: float, scale: float = 1.0) -> None:
    rng = r.rng
    if r.built_over(s, d, 2.0):
        return
    base = rng.uniform(1.8, 3.5) * scale
    rad = rng.uniform(1.4, 3.0) * scale
    rz = rng.uniform(1.2, 2.6) * scale
    tint = int(rng.integers(0, 256))
    r.stamp(r.place(r.cylinder(rng.uniform(0.12, 0.3), 0.0, base + rz), s, d), "trunk")
    r.stamp(r.place(r.ellipsoid(rad, rad * rng.uniform(0.8, 1.2), rz, base + rz), s, d), "vegetation", tint)


def _open_frontage(r: _Rasteriser, side: int, s_lo: float, s_hi: float, l_world: list[float]) -> None:
    """Trees, bushes and a fence on open terrain beyond the sidewalk."""
    road, rng = r.road, r.rng
    info = road.left if side > 0 else road.right
    if info.frontage == "buildings":
        return
    _, e_side = (float(v[0]) for v in road.edges(np.full(1, float(side))))
    inner = e_side + (info.lot_depth if info.frontage == "parking_lot" else 0.0)
    reach = max(abs(l_world[0]), abs(l_world[1])) + 10.0
    if rng.random() < 0.5:  # a fence along the frontage, following the street's curve and the ground
        off = inner + rng.uniform(0.2, 1.0)
        s = np.arange(s_lo, s_hi, r.step_h)
        s = s[~road.in_cross(s, 0.5)]
        l = road.centre(s) + side * off
        ground = r.height_at(s, l)
        for z in np.arange(0.0, rng.uniform(1.0, 2.0) + 1e-9, r.step_z):
            r.stamp(np.stack([s, l, ground + z], axis=1), "fence", tint=77)
    for _ in range(int(rng.poisson(0.05 * (s_hi - s_lo)))):
        s = rng.uniform(s_lo, s_hi)
        d = side * (inner + rng.uniform(2.0, max(3.0, reach - inner)))
        if road.in_cross(np.array(s), 2.0):
            continue
        if rng.random() < 0.6:
            _tree(r, s, d)
        elif not r.built_over(s, d, 1.5):
            rad = rng.uniform(0.6, 1.6)
            r.stamp(r.place(r.ellipsoid(rad, rad, rng.uniform(0.5, 1.0), 0.3), s, d), "vegetation")
    if rng.random() < 0.1:  # a construction vehicle parked on the terrain
        s = rng.uniform(s_lo, s_hi)
        d = side * (inner + rng.uniform(3.0, 8.0))
        if not road.in_cross(np.array(s), 6.0) and not r.built_over(s, d, 4.0):
            pts = np.concatenate([r.box(6.0, 2.6, 0.3, 2.2), r.box(2.0, 2.0, 2.2, 3.4, x0=-1.0)])
            r.stamp(r.place(pts, s, d, yaw=rng.uniform(-0.5, 0.5)), "construction-vehicle")


def _car(r: _Rasteriser, s: float, d: float, kind: str, yaw: float = 0.0) -> None:
    rng = r.rng
    length, width, height = rng.uniform(3.8, 4.9), rng.uniform(1.6, 1.9), rng.uniform(1.4, 1.65)
    body = r.box(length, width, 0.2, 0.6 * height)
    cabin = r.box(0.5 * length, 0.88 * width, 0.6 * height, height, x0=-0.05 * length)
    r.stamp(r.place(np.concatenate([body, cabin]), s, d, yaw), kind)


def _vehicle(r: _Rasteriser, s: float, d: float, kind: str, yaw: float = 0.0) -> None:
    rng = r.rng
    if kind in ("car", "moving-car"):
        _car(r, s, d, kind, yaw)
    elif kind == "truck":
        length = rng.uniform(6.0, 9.0)
        cab = r.box(2.0, 2.4, 0.4, 2.8, x0=length / 2 - 1.0)
        cargo = r.box(length - 2.3, 2.5, 0.5, rng.uniform(3.0, 3.6), x0=-1.15)
        r.stamp(r.place(np.concatenate([cab, cargo]), s, d, yaw), "truck")
    elif kind == "bus":
        r.stamp(r.place(r.box(rng.uniform(10.0, 12.0), 2.6, 0.3, 3.2), s, d, yaw), "bus")
    elif kind == "trailer":
        r.stamp(r.place(r.box(rng.uniform(6.0, 9.0), 2.5, 1.0, 3.6), s, d, yaw), "trailer")


def _traffic(r: _Rasteriser, s_lo: float, s_hi: float) -> None:
    """Vehicles driving in both directions, and on a cross street."""
    road, rng = r.road, r.rng
    for direction in (1, -1):  # 1: the ego car's direction (right half of the road)
        for lane in range(road.lanes):
            d = -direction * (road.median + road.lane_width * (lane + 0.5))
            for s in _along(rng, s_lo, s_hi, (7.0, 30.0)):
                if (
                    rng.random() < 0.35
                    or not _free_of_ego(s, d, road, radius=4.5)
                    or road.in_cross(np.array(s))
                ):
                    continue
                u = rng.random()
                kind = "truck" if u < 0.08 else "bus" if u < 0.11 else "car"
                if kind == "car" and direction < 0 and rng.random() < 0.5:
                    kind = "moving-car"  # SemanticKITTI's moving-car id (learning map: car)
                jitter = rng.uniform(-0.3, 0.3)
                _vehicle(r, s, d + jitter, kind, yaw=0.0 if direction > 0 else np.pi)
    if road.cross is not None:
        sc, hw, _ = road.cross
        for _ in range(int(rng.integers(0, 4))):
            d = float(rng.choice([-1, 1])) * rng.uniform(road.half_width + 4.0, road.half_width + 35.0)
            s = sc + float(rng.choice([-1, 1])) * hw / 2
            _car(r, s, d, "car", yaw=np.pi / 2 - float(road.direction(np.array(s))))


def _parking(r: _Rasteriser, side: int, s_lo: float, s_hi: float) -> None:
    """Parked cars in the parking strip (or at the curb), rows of cars in a parking lot."""
    road, rng = r.road, r.rng
    info = road.left if side > 0 else road.right
    e_park, e_side = (float(v[0]) for v in road.edges(np.full(1, float(side))))
    if info.parking > 0 or rng.random() < 0.3:
        d = side * (e_park - 1.2)
        for s in _along(rng, s_lo, s_hi, (5.5, 9.0)):
            if rng.random() < 0.65 and _free_of_ego(s, d, road, 4.0) and not road.in_cross(np.array(s), 2.5):
                u = rng.random()
                kind = "trailer" if u < 0.03 else "truck" if u < 0.06 else "car"
                _vehicle(r, s, d, kind)
    if info.frontage == "parking_lot":
        for row in np.arange(e_side + 3.0, e_side + info.lot_depth - 2.0, 6.0):
            for s in _along(rng, s_lo, s_hi, (2.6, 4.0)):
                if rng.random() < 0.6 and not road.in_cross(np.array(s), 2.0):
                    _car(r, s, side * float(row), "car", yaw=np.pi / 2 + rng.uniform(-0.1, 0.1))


def _people(r: _Rasteriser, s_lo: float, s_hi: float) -> None:
    """Pedestrians and parked bicycles on the sidewalks; cyclists and motorcyclists at the road edge."""
    road, rng = r.road, r.rng
    for _ in range(int(rng.poisson(0.08 * (s_hi - s_lo)))):
        side = int(rng.choice([-1, 1]))
        info = road.left if side > 0 else road.right
        e_park, e_side = (float(v[0]) for v in road.edges(np.full(1, float(side))))
        s = rng.uniform(s_lo, s_hi)
        d = side * rng.uniform(e_park + 0.3, max(e_park + 0.4, e_side - 0.3))
        if info.sidewalk == 0:
            d = side * (e_side + rng.uniform(0.5, 3.0))
        if not _free_of_ego(s, d, road) or r.built_over(s, d, 1.0):
            continue
        u = rng.random()
        if u < 0.75:
            h = rng.uniform(1.55, 1.9)
            r.stamp(r.place(r.box(0.45, 0.5, 0.0, h), s, d, rng.uniform(0, np.pi)), "person")
        elif u < 0.92:
            r.stamp(r.place(r.box(1.7, 0.45, 0.1, 1.0), s, d, rng.uniform(-0.3, 0.3)), "bicycle")
        else:
            r.stamp(r.place(r.box(2.0, 0.7, 0.2, 1.1), s, d, rng.uniform(-0.3, 0.3)), "motorcycle")
    for _ in range(int(rng.poisson(0.5))):
        side = int(rng.choice([-1, 1]))
        s = rng.uniform(s_lo, s_hi)
        d = side * (road.half_width - 0.8)
        if not _free_of_ego(s, d, road, 4.0) or road.in_cross(np.array(s)):
            continue
        yaw = 0.0 if side < 0 else np.pi
        if rng.random() < 0.7:
            r.stamp(r.place(r.box(1.7, 0.45, 0.1, 1.0), s, d, yaw), "bicycle")
            r.stamp(r.place(r.box(0.5, 0.45, 1.0, 1.8, x0=-0.2), s, d, yaw), "bicyclist")
        else:
            r.stamp(r.place(r.box(2.0, 0.7, 0.2, 1.1), s, d, yaw), "motorcycle")
            r.stamp(r.place(r.box(0.6, 0.55, 1.1, 1.85, x0=-0.2), s, d, yaw), "motorcyclist")


def _road_works(r: _Rasteriser, s_lo: float, s_hi: float) -> None:
    """Sometimes a row of traffic cones or concrete barriers along a road edge."""
    road, rng = r.road, r.rng
    if rng.random() < 0.2:
        side = int(rng.choice([-1, 1]))
        s0 = rng.uniform(s_lo, s_hi)
        for i in range(int(rng.integers(2, 6))):
            s, d = s0 + 2.5 * i, side * (road.half_width - 0.5)
            if _free_of_ego(s, d, road):
                r.stamp(r.place(r.box(0.4, 0.4, 0.0, 0.7), s, d), "traffic-cone")
    if rng.random() < 0.15:
        side = int(rng.choice([-1, 1]))
        s0 = rng.uniform(s_lo, s_hi)
        for i in range(int(rng.integers(2, 8))):
            s, d = s0 + 2.1 * i, side * (road.half_width - 0.4)
            if _free_of_ego(s, d, road) and not road.in_cross(np.array(s)):
                r.stamp(r.place(r.box(2.0, 0.5, 0.0, 0.8), s, d), "barrier", tint=128)


def _noise(r: _Rasteriser, gt_range: tuple[float, float, float, float, float, float]) -> None:
    """A few isolated label-noise voxels in the air of the GT range (not rendered; ignored by the readers)."""
    rng = r.rng
    w = r.world
    for _ in range(int(rng.integers(3, 12))):
        p = np.array([rng.uniform(gt_range[a], gt_range[a + 3]) for a in range(3)])
        i, j, k = w.index_of(p[None])[0]
        if r.kinds[i, j, k] == 0 and k > r.k_top[i, j] + 1:
            r.kinds[i, j, k] = KIND_ID["noise"]
