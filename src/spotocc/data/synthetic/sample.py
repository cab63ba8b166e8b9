"""One synthetic sample: scene, ground truth, camera renders and LiDAR scan, before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spotocc.config import GridConfig
from spotocc.data.synthetic.geometry import (
    NUSCENES_LIDAR_TO_EGO_TRANSLATION,
    Camera,
    WorldGrid,
    kitti_calibration,
    kitti_camera,
    make_world,
    nuscenes_cameras,
)
from spotocc.data.synthetic.kinds import KITTI_RAW, NUSCENES_LABEL, OCC3D_LABEL, RENDERED, kind_to_class
from spotocc.data.synthetic.layout import Scene, build_scene
from spotocc.data.synthetic.render import (
    CameraRender,
    LidarScan,
    observable,
    occluded_from_lidar,
    render_camera,
    scan_lidar,
    scene_raycaster,
)
from spotocc.data.synthetic.visibility import camera_mask, lidar_mask, with_exposed_surfaces

FORMATS = ("semantickitti", "nuscenes-occupancy", "occ3d-nuscenes")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SensorSetup:
    """Format-dependent sensor heights and the world padding around the GT range (metres)."""

    lidar_height: float  # the grid-frame origin above the road (the LiDAR's height where it sits there)
    pad: tuple[float, float, float, float, float, float]  # x-, x+, y-, y+, z-, z+
    forward: str  # grid axis the ego car drives along
    lidar_elevations: tuple[float, float]  # top and bottom beam elevation (degrees)
    lidar_beams: int
    lidar_azimuth_steps: int
    lidar_origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the LiDAR in the grid frame


SETUPS: dict[str, SensorSetup] = {
    # HDL-64E on the KITTI car, 1.73 m above the road; the camera looks forward.
    "semantickitti": SensorSetup(1.73, (20.0, 24.0, 24.0, 24.0, 1.0, 12.0), "x", (2.0, -24.8), 64, 512),
    # HDL-32E on the nuScenes car, 1.84 m above the road; six cameras all around.
    "nuscenes-occupancy": SensorSetup(
        1.84, (16.0, 16.0, 16.0, 16.0, 1.0, 14.0), "y", (10.67, -30.67), 32, 512
    ),
    # The same car and LiDAR; Occ3D's grid frame is the ego frame (x forward, y left, origin on the road).
    "occ3d-nuscenes": SensorSetup(
        0.0,
        (16.0, 16.0, 16.0, 16.0, 1.0, 14.0),
        "x",
        (10.67, -30.67),
        32,
        512,
        NUSCENES_LIDAR_TO_EGO_TRANSLATION,
    ),
}
# Occ3D: LiDAR positions along the ego path (metres ahead) whose scans make the accumulated mask_lidar
OCC3D_SCAN_POSITIONS = (-16.0, -8.0, 0.0, 8.0, 16.0)

DEFAULT_GRIDS: dict[str, GridConfig] = {
    "semantickitti": GridConfig(
        point_cloud_range=(0.0, -25.6, -2.0, 51.2, 25.6, 4.4), occ_size=(64, 64, 16), lss_downsample=2
    ),
    "nuscenes-occupancy": GridConfig(
        point_cloud_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), occ_size=(128, 128, 10), lss_downsample=4
    ),
    # Occ3D's range at half its resolution (0.8 m voxels)
    "occ3d-nuscenes": GridConfig(
        point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(100, 100, 8), lss_downsample=2
    ),
}
DEFAULT_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "semantickitti": (192, 640),  # the synthetic_tiny network input, KITTI's aspect ratio
    "nuscenes-occupancy": (90, 160),  # 1600x900 / 10
    "occ3d-nuscenes": (90, 160),
}


@dataclass
class SyntheticSample:
    """Everything generated for one sample. Label volumes are ``[X, Y, Z]`` in the official orientation."""

    format: str
    split: str
    index: int
    scene: Scene
    labels: (
        np.ndarray
    )  # [X, Y, Z]: raw SemanticKITTI ids (uint16) / nuScenes-Occupancy labels (uint8, 0 = noise
    #                     where occupied; empty voxels are 0 too, use ``occupied``)
    occupied: np.ndarray  # bool [X, Y, Z]: voxels written to the GT (nuScenes: the .npy rows)
    gt: np.ndarray  # uint8 [X, Y, Z]: training classes as the readers produce them (255 = ignore;
    #                 Occ3D: model ids with every voxel labelled, the masks are in ``extras``)
    invalid: np.ndarray  # bool [X, Y, Z]: never observable (SemanticKITTI .invalid)
    lidar_voxels: np.ndarray  # bool [X, Y, Z]: holding a LiDAR point of this scan (SemanticKITTI .bin)
    occluded: np.ndarray  # bool [X, Y, Z]: hidden from this scan's LiDAR (SemanticKITTI .occluded)
    cameras: list[Camera]
    renders: list[CameraRender]
    lidar: LidarScan
    extras: dict[str, Any] = field(default_factory=dict)  # format-specific (calib, camera rig, Occ3D masks)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of how many samples are generated."""
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def make_sample(
    fmt: str,
    split: str,
    index: int,
    *,
    seed: int = 0,
    grid: GridConfig | None = None,
    image_size: tuple[int, int] | None = None,
    lidar_beams: int | None = None,
    lidar_azimuth_steps: int | None = None,
) -> SyntheticSample:
    """Generate (in memory) sample ``index`` of ``split``; deterministic in all arguments."""
    check_format(fmt)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    grid = grid or DEFAULT_GRIDS[fmt]
    height, width = image_size or DEFAULT_IMAGE_SIZES[fmt]
    setup = SETUPS[fmt]
    rng = sample_rng(seed, split, index)
    world = make_world(grid, setup.pad)
    scene = build_scene(
        world, rng, forward=setup.forward, lidar_height=setup.lidar_height, gt_range=grid.point_cloud_range
    )
    caster = scene_raycaster(scene)
    extras: dict[str, Any] = {}
    if fmt == "semantickitti":
        calib = kitti_calibration(height, width)
        cameras = [kitti_camera(calib, height, width)]
        extras["calib"] = calib
    else:
        rig = nuscenes_cameras(height, width, frame="ego" if fmt == "occ3d-nuscenes" else "lidar")
        cameras = [cam for cam, *_ in rig]
        extras["rig"] = rig
    renders = [render_camera(scene, caster, cam, rng) for cam in cameras]
    top, bottom = setup.lidar_elevations
    elevations = np.linspace(top, bottom, lidar_beams or setup.lidar_beams)
    azimuth_steps = lidar_azimuth_steps or setup.lidar_azimuth_steps
    origin = np.asarray(setup.lidar_origin, dtype=np.float64)
    scan = scan_lidar(scene, caster, elevations, azimuth_steps, rng, origin=origin)
    kinds_gt = scene.kinds[world.gt_slices]
    invalid = ~observable(scene)[world.gt_slices]
    lidar_voxels = _gt_mask_of(world, scan.voxel)
    centres = np.stack(
        np.meshgrid(*[world.centres(a)[world.gt_slices[a]] for a in range(3)], indexing="ij"), -1
    )
    occluded = occluded_from_lidar(
        scan, elevations, centres.reshape(-1, 3) - origin, float(world.voxel_size.max())
    )
    occluded = occluded.reshape(kinds_gt.shape) & ~lidar_voxels
    if fmt == "semantickitti":
        labels = KITTI_RAW[kinds_gt]
        gt = kind_to_class(fmt)[kinds_gt]
        gt[invalid] = 255
    else:
        # nuScenes-Occupancy has no ignore mask; it lists the voxels that were observed. Sealed-off
        # voxels (inside buildings and vehicles) are left out, i.e. empty (Occ3D: free, and unobserved).
        kinds_gt = np.where(invalid, 0, kinds_gt)
        labels = (OCC3D_LABEL if fmt == "occ3d-nuscenes" else NUSCENES_LABEL)[kinds_gt]
        gt = kind_to_class(fmt)[kinds_gt]
    if fmt == "occ3d-nuscenes":
        path = [origin + np.array([s, 0.0, 0.0]) for s in OCC3D_SCAN_POSITIONS]
        solid = RENDERED[scene.kinds[world.gt_slices]]
        seen = with_exposed_surfaces(lidar_mask(caster, world, path, elevations, azimuth_steps), solid)
        extras["mask_lidar"] = seen
        extras["mask_camera"] = seen & with_exposed_surfaces(camera_mask(caster, world, cameras), solid)
    return SyntheticSample(
        format=fmt,
        split=split,
        index=index,
        scene=scene,
        labels=labels,
        occupied=kinds_gt > 0,
        gt=gt,
        invalid=invalid,
        lidar_voxels=lidar_voxels,
        occluded=occluded,
        cameras=cameras,
        renders=renders,
        lidar=scan,
        extras=extras,
    )


def _gt_mask_of(world: WorldGrid, flat_world: np.ndarray) -> np.ndarray:
    """bool GT-shaped mask of the world voxels ``flat_world`` that lie in the GT crop."""
    idx = np.stack(np.unravel_index(flat_world, world.shape), axis=1) - np.asarray(world.gt_offset)  # [N, 3]
    ok = np.all((idx >= 0) & (idx < np.asarray(world.gt_shape)), axis=1)
    mask = np.zeros(world.gt_shape, dtype=bool)
    mask[tuple(idx[ok].T)] = True
    return mask


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
