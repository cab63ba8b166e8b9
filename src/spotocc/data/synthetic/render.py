"""Camera images, LiDAR scans and observability masks of a rasterised scene, by exact ray casting.

Image model (per pixel, one ray through the pixel centre, integer (u, v)): the first rendered voxel's
kind colour (:data:`kinds.ALBEDO`), times a per-instance tint, a face shade from a fixed sun (top
faces brightest), a per-voxel brightness jitter and a kind-specific texture (windows on building
facades, grainy foliage and asphalt); blended a little towards haze with distance; sky gradient where
nothing is hit; small Gaussian noise. Tints, shades and textures are close to pure brightness
changes, so a pixel's chromaticity identifies its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spotocc.data.synthetic.geometry import Camera
from spotocc.data.synthetic.kinds import ALBEDO, KIND_ID, REFLECTANCE, RENDERED
from spotocc.data.synthetic.layout import Scene
from spotocc.data.synthetic.raycast import VoxelRaycaster

_SUN = np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])
_HAZE = np.array([0.78, 0.82, 0.88])
_SKY_HORIZON = np.array([0.80, 0.85, 0.92])
_SKY_ZENITH = np.array([0.33, 0.52, 0.85])
# Per-instance tints: a brightness in [0.85, 1.1] times a per-channel factor in [0.93, 1.07].
_TINT = (np.random.default_rng(20240607).uniform(0.85, 1.1, (256, 1))
         * np.random.default_rng(20240608).uniform(0.93, 1.07, (256, 3)))  # fmt: skip


@dataclass
class CameraRender:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    depth: np.ndarray  # float32 [H, W]: third component of P @ [X; 1] of the hit, 0 = sky / beyond the world
    kind: np.ndarray  # uint8 [H, W]: kind of the hit voxel, 0 = nothing hit
    voxel: np.ndarray  # int64 [H, W]: flat world-grid index of the hit voxel, -1 = nothing hit


@dataclass
class LidarScan:
    points: np.ndarray  # float32 [N, 4]: x, y, z (grid frame), reflectance in [0, 1]
    ring: np.ndarray  # int64 [N]: beam index (0 = top beam)
    voxel: np.ndarray  # int64 [N]: flat world-grid index of the hit voxel
    ranges: (
        np.ndarray
    )  # float64 [B, A]: range image (distance of the first hit per beam and azimuth), inf = none
    azimuths: np.ndarray  # float64 [A]: azimuth of each column of the range image (radians)


def _hash01(*coords: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer coordinates."""
    h = np.uint64(1469598103934665603)
    with np.errstate(over="ignore"):
        for i, c in enumerate(coords):
            h = h ^ (
                np.asarray(c).astype(np.uint64) * np.uint64([73856093, 19349663, 83492791, 2654435761][i])
            )
            h = h * np.uint64(1099511628211)
        h ^= h >> np.uint64(29)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(0x1000000)


def _texture(kind: np.ndarray, point: np.ndarray, axis: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """Brightness factor [N] of the surface texture at hit points [N, 3]."""
    out = 0.93 + 0.14 * _hash01(voxel)
    fine = np.floor(point / 0.08).astype(np.int64)
    grain = _hash01(fine[:, 0], fine[:, 1], fine[:, 2])
    flat = np.isin(kind, [KIND_ID[k] for k in ("road", "parking", "sidewalk", "other-ground", "terrain")])
    out *= np.where(flat, 0.95 + 0.1 * grain, 1.0)
    leaves = np.floor(point / 0.22).astype(np.int64)
    foliage = _hash01(leaves[:, 0], leaves[:, 1], leaves[:, 2])
    out *= np.where(kind == KIND_ID["vegetation"], 0.8 + 0.28 * foliage, 1.0)
    # Windows on building facades: a regular pattern in (horizontal, height) facade coordinates.
    horizontal = np.where(axis == 0, point[:, 1], point[:, 0])
    window = ((horizontal / 2.6) % 1.0 > 0.25) & ((horizontal / 2.6) % 1.0 < 0.75)
    window &= ((point[:, 2] / 3.0) % 1.0 > 0.35) & ((point[:, 2] / 3.0) % 1.0 < 0.8)
    out *= np.where((kind == KIND_ID["building"]) & (axis != 2) & window, 0.72, 1.0)
    return out


def scene_raycaster(scene: Scene) -> VoxelRaycaster:
    """The ray caster of a scene's physical surfaces (label noise is transparent)."""
    return VoxelRaycaster(RENDERED[scene.kinds], scene.world.grid_min, scene.world.voxel_size)


def render_camera(
    scene: Scene, caster: VoxelRaycaster, camera: Camera, rng: np.random.Generator, noise: float = 0.008
) -> CameraRender:
    """Ray-cast one camera image with its depth, kind and voxel maps."""
    dirs, depth_per_t = camera.pixel_rays()  # [H*W, 3], [H*W]
    origin = camera.centre_grid
    hits = caster.cast(origin, dirs)
    hit = hits.voxel >= 0
    colour = np.empty((dirs.shape[0], 3))
    # Sky (or far ground below the horizon beyond the world).
    up = np.clip(dirs[~hit, 2], -1.0, 1.0)
    mix = np.clip(up / 0.6, 0.0, 1.0)[:, None] ** 0.7
    sky = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * mix
    far_ground = 0.5 * ALBEDO[KIND_ID["terrain"]] + 0.5 * _HAZE
    colour[~hit] = np.where(up[:, None] < 0, far_ground, sky)
    # Surfaces.
    vox = hits.voxel[hit]
    t = hits.t[hit]
    point = origin + t[:, None] * dirs[hit]  # [M, 3]
    kind = scene.kinds.reshape(-1)[vox]
    axis = hits.axis[hit].astype(np.int64)
    normal = np.zeros((vox.size, 3))
    face = axis >= 0
    rows = np.nonzero(face)[0]
    normal[rows, axis[face]] = -hits.step[hit][rows, axis[face]]
    normal[~face, 2] = 1.0
    shade = 0.55 + 0.55 * np.clip(normal @ _SUN, 0.0, None)
    base = ALBEDO[kind] * _TINT[scene.tint.reshape(-1)[vox]]
    surface = base * (shade * _texture(kind, point, axis, vox))[:, None]
    fog = (0.1 * (1.0 - np.exp(-t / 200.0)))[:, None]
    colour[hit] = surface * (1 - fog) + _HAZE * fog
    colour += rng.normal(0.0, noise, colour.shape)
    image = np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8).reshape(camera.height, camera.width, 3)
    depth = np.zeros(dirs.shape[0], dtype=np.float32)
    depth[hit] = t * depth_per_t[hit]
    kind_map = np.zeros(dirs.shape[0], dtype=np.uint8)
    kind_map[hit] = kind
    shape = (camera.height, camera.width)
    return CameraRender(image, depth.reshape(shape), kind_map.reshape(shape), hits.voxel.reshape(shape))


def scan_lidar(
    scene: Scene,
    caster: VoxelRaycaster,
    elevations_deg: np.ndarray,
    azimuth_steps: int,
    rng: np.random.Generator,
    *,
    origin: np.ndarray | None = None,
    max_range: float = 120.0,
    range_noise: float = 0.01,
) -> LidarScan:
    """A spinning multi-beam scan from ``origin`` (default: the grid-frame origin); hits only."""
    origin = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64)
    elev = np.radians(np.asarray(elevations_deg, dtype=np.float64))
    azim = 2 * np.pi * np.arange(azimuth_steps) / azimuth_steps + rng.uniform(0, 2 * np.pi / azimuth_steps)
    e, a = np.meshgrid(elev, azim, indexing="ij")  # [B, A]
    dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
    ring = np.repeat(np.arange(elev.size), azimuth_steps)
    hits = caster.cast(origin, dirs, max_range)
    hit = hits.voxel >= 0
    # Range noise along the ray, kept within a centimetre-scale band so a point stays on its surface.
    t = hits.t[hit] + np.clip(rng.normal(0.0, range_noise, int(hit.sum())), -2 * range_noise, 2 * range_noise)
    xyz = origin + t[:, None] * dirs[hit]
    kind = scene.kinds.reshape(-1)[hits.voxel[hit]]
    refl = np.clip(REFLECTANCE[kind] + rng.normal(0.0, 0.03, kind.size), 0.0, 1.0)
    points = np.concatenate([xyz, refl[:, None]], axis=1).astype(np.float32)
    return LidarScan(points, ring[hit], hits.voxel[hit], hits.t.reshape(e.shape), azim)


def observable(scene: Scene) -> np.ndarray:
    """bool [world shape]: voxels some viewpoint in the open air could see.

    The rule behind SemanticKITTI's ``.invalid`` (never observed from any pose), for an observer free
    to move anywhere in the air: empty voxels connected (through faces) to the sky, and solid voxels
    with a face on such an empty voxel. What is sealed off stays unobservable: the inside of
    buildings and vehicles, and the space under the ground.
    """
    solid = RENDERED[scene.kinds]
    air, _ = ndimage.label(~solid)  # 6-connected components of empty space
    sky_ids = np.unique(air[:, :, -1])
    sky_ids = sky_ids[sky_ids > 0]
    open_air = np.isin(air, sky_ids)
    exposed = ndimage.binary_dilation(open_air, structure=ndimage.generate_binary_structure(3, 1))
    return open_air | (solid & exposed)


def occluded_from_lidar(
    scan: LidarScan, elevations_deg: np.ndarray, centres: np.ndarray, margin: float
) -> np.ndarray:
    """bool [N]: points (voxel centres [N, 3], LiDAR at the origin) behind the first hit of the nearest
    beam and azimuth by more than ``margin`` metres (SemanticKITTI's ``.occluded``: hidden from the
    first pose). Points outside the beams' elevation span are not occluded."""
    rng_ = np.linalg.norm(centres, axis=1)
    elev = np.degrees(np.arcsin(np.clip(centres[:, 2] / np.maximum(rng_, 1e-9), -1.0, 1.0)))
    beams = np.asarray(elevations_deg, dtype=np.float64)
    order = np.argsort(beams)
    pos = np.clip(np.searchsorted(beams[order], elev), 1, beams.size - 1)
    lower, upper = beams[order][pos - 1], beams[order][pos]
    beam = order[np.where(np.abs(elev - lower) <= np.abs(elev - upper), pos - 1, pos)]
    az_step = 2 * np.pi / scan.azimuths.size
    col = np.rint((np.arctan2(centres[:, 1], centres[:, 0]) - scan.azimuths[0]) / az_step).astype(np.int64)
    first = scan.ranges[beam, col % scan.azimuths.size]
    inside = (elev >= beams.min()) & (elev <= beams.max())
    return inside & (rng_ > first + margin)
