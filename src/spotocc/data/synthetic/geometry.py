"""World grid and sensor rigs of the synthetic scenes.

The *world grid* is the ground-truth grid (``GridConfig``) padded on every side at the same voxel
size, so that cameras and the LiDAR see a scene beyond the evaluated range; the ground truth is a
crop of it. The grid frame is the dataset's LiDAR frame (SemanticKITTI velodyne: x forward, y left,
z up; nuScenes LIDAR_TOP: x right, y forward, z up).

A camera is a 3x4 projection ``P`` acting on the coordinates of a camera frame (KITTI: P2 on the
rectified camera-0 frame; nuScenes: ``[K | 0]`` on the camera's own frame) plus the 4x4 transform of
that frame into the grid frame. The depth of a point is the third component of ``P @ [X; 1]`` (the
depth the released depth targets use: z plus ``P2[2, 3]`` for KITTI, camera z for nuScenes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotocc.config import GridConfig


@dataclass
class WorldGrid:
    """A grid at the GT voxel size whose block ``gt_offset : gt_offset + gt_shape`` is the GT grid."""

    grid_min: np.ndarray  # float64 [3], metric corner of voxel [0, 0, 0]
    voxel_size: np.ndarray  # float64 [3]
    shape: tuple[int, int, int]
    gt_offset: tuple[int, int, int]
    gt_shape: tuple[int, int, int]

    @property
    def gt_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.gt_offset, self.gt_shape))  # type: ignore[return-value]

    def centres(self, axis: int) -> np.ndarray:
        """Metric voxel-centre coordinates along one axis, float64 [shape[axis]]."""
        return self.grid_min[axis] + (np.arange(self.shape[axis]) + 0.5) * self.voxel_size[axis]

    def index_of(self, points: np.ndarray) -> np.ndarray:
        """int64 [N, 3] voxel indices of metric points [N, 3] (may lie outside the grid)."""
        return np.floor((points - self.grid_min) / self.voxel_size).astype(np.int64)


def make_world(grid: GridConfig, pad_m: tuple[float, float, float, float, float, float]) -> WorldGrid:
    """Pad the GT grid by at least ``pad_m`` metres: (x below, x above, y below, y above, z below, above)."""
    r = np.asarray(grid.point_cloud_range, dtype=np.float64)
    size = np.asarray(grid.occ_size, dtype=np.int64)
    vs = (r[3:] - r[:3]) / size
    lo = np.array([math.ceil(pad_m[2 * a] / vs[a] - 1e-9) for a in range(3)], dtype=np.int64)
    hi = np.array([math.ceil(pad_m[2 * a + 1] / vs[a] - 1e-9) for a in range(3)], dtype=np.int64)
    return WorldGrid(
        grid_min=r[:3] - lo * vs,
        voxel_size=vs,
        shape=tuple(int(v) for v in size + lo + hi),  # type: ignore[arg-type]
        gt_offset=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        gt_shape=tuple(int(v) for v in size),  # type: ignore[arg-type]
    )


@dataclass
class Camera:
    """A pinhole camera: ``P`` [3, 4] projects camera-frame points; ``cam_to_grid`` [4, 4] maps that frame."""

    name: str
    height: int
    width: int
    P: np.ndarray
    cam_to_grid: np.ndarray

    @property
    def centre_grid(self) -> np.ndarray:
        """Optical centre in the grid frame (the null space of ``P``), float64 [3]."""
        centre_cam = -np.linalg.solve(self.P[:, :3], self.P[:, 3])
        return self.cam_to_grid[:3, :3] @ centre_cam + self.cam_to_grid[:3, 3]

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit grid-frame directions [H*W, 3] through pixel centres (integer u, v; row-major) and the
        factor [H*W] turning distance along a ray into depth (third component of ``P @ [X; 1]``)."""
        v, u = np.meshgrid(np.arange(self.height), np.arange(self.width), indexing="ij")  # [H, W]
        pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1).astype(np.float64)  # [H*W, 3]
        d_cam = np.linalg.solve(self.P[:, :3], pix.T).T  # [H*W, 3]
        d_cam /= np.linalg.norm(d_cam, axis=1, keepdims=True)
        depth_per_t = d_cam @ self.P[2, :3]
        return d_cam @ self.cam_to_grid[:3, :3].T, depth_per_t

    def project(self, points_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (u, v) [N, 2] and depth [N] of grid-frame points [N, 3]."""
        grid_to_cam = np.linalg.inv(self.cam_to_grid)
        p_cam = points_grid @ grid_to_cam[:3, :3].T + grid_to_cam[:3, 3]
        h = p_cam @ self.P[:, :3].T + self.P[:, 3]  # [N, 3]
        depth = h[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = h[:, :2] / depth[:, None]
        return uv, depth


# --------------------------------------------------------------------------------------------------
# SemanticKITTI: KITTI odometry calibration scaled to the written image size

_KITTI_WIDTH, _KITTI_HEIGHT = 1241.0, 376.0
_KITTI_F, _KITTI_CX, _KITTI_CY = 718.856, 607.1928, 185.2157
# Offsets of the four rectified cameras' projections (P_i = K [I | t_i]), as in the KITTI odometry set.
_KITTI_CAM_OFFSETS = (
    (0.0, 0.0, 0.0),
    (-0.5372, 0.0, 0.0),
    (0.0599, -0.0011, 0.0038),
    (-0.4733, 0.0027, 0.0049),
)
# Rectified camera 0 in the velodyne frame: 0.29 m ahead, 0.06 m below, tilted by a fraction of a degree.
_KITTI_CAM0_POSITION = (0.29, -0.01, -0.06)
_KITTI_CAM0_TILT_DEG = (0.45, -0.05, 0.03)  # rotation about camera x (pitch), y (yaw), z (roll)


def kitti_calibration(height: int, width: int) -> dict[str, np.ndarray]:
    """``P0..P3`` and ``Tr`` [3, 4] (velodyne -> rectified camera 0), rounded as written to calib.txt."""
    f = _KITTI_F * width / _KITTI_WIDTH
    K = np.array(
        [[f, 0.0, _KITTI_CX * width / _KITTI_WIDTH], [0.0, f, _KITTI_CY * height / _KITTI_HEIGHT], [0, 0, 1]]
    )
    calib = {
        f"P{i}": K @ np.hstack([np.eye(3), np.array(t)[:, None]]) for i, t in enumerate(_KITTI_CAM_OFFSETS)
    }
    velo_to_cam_axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    R = _rotation_xyz(*np.radians(_KITTI_CAM0_TILT_DEG)) @ velo_to_cam_axes
    calib["Tr"] = np.hstack([R, (-R @ np.array(_KITTI_CAM0_POSITION))[:, None]])
    # What a reader parses back from the text file: the renderer uses exactly these values.
    return {k: np.array([float(f"{v:.12e}") for v in m.ravel()]).reshape(3, 4) for k, m in calib.items()}


def kitti_camera(calib: dict[str, np.ndarray], height: int, width: int) -> Camera:
    """The left colour camera (image_2): P2 on rectified camera-0 coordinates, cam0 -> velodyne = inv(Tr)."""
    tr = np.eye(4)
    tr[:3] = calib["Tr"]
    return Camera("image_2", height, width, calib["P2"], np.linalg.inv(tr))


# --------------------------------------------------------------------------------------------------
# nuScenes: six cameras around LIDAR_TOP, poses and intrinsics like the nuScenes rig


NUSCENES_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)  # the order the released info files store them in; readers index by name
# name -> (position in the ego frame (x forward, y left, z up), yaw in degrees, focal length / width)
_NUSCENES_RIG: dict[str, tuple[tuple[float, float, float], float, float]] = {
    "CAM_FRONT": ((1.70, 0.02, 1.51), 0.0, 0.7915),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.50), -55.0, 0.7915),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 0.7915),
    "CAM_BACK": ((0.03, 0.00, 1.58), 180.0, 0.5058),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0, 0.7915),
    "CAM_BACK_RIGHT": ((1.03, -0.48, 1.56), -110.0, 0.7915),
}
NUSCENES_LIDAR_TO_EGO_TRANSLATION = (0.943713, 0.0, 1.84023)
# LIDAR_TOP is turned by -90 degrees about z: its x axis points right, its y axis forward.
NUSCENES_LIDAR_TO_EGO_ROTATION = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def nuscenes_camera_to_ego(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rotation [3, 3], translation [3], intrinsic at unit width [3, 3] with cx, cy as fractions)."""
    position, yaw_deg, focal = _NUSCENES_RIG[name]
    yaw = math.radians(yaw_deg)
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    pitch = _rotation_xyz(math.radians(0.6), 0.0, 0.0)  # cameras look slightly down
    rot = np.stack([right, down, forward], axis=1) @ pitch.T  # camera (x right, y down, z forward) -> ego
    return rot, np.array(position), np.array([[focal, 0.0, 0.510], [0.0, focal, 0.546], [0.0, 0.0, 1.0]])


def nuscenes_cameras(
    height: int, width: int, frame: str = "lidar"
) -> list[tuple[Camera, np.ndarray, np.ndarray, np.ndarray]]:
    """Per camera: (Camera with ``P = [K | 0]`` and cam -> grid frame, K, cam->ego rotation, translation).

    ``frame``: the grid frame, ``"lidar"`` (LIDAR_TOP, nuScenes-Occupancy) or ``"ego"`` (Occ3D).
    """
    if frame not in ("lidar", "ego"):
        raise ValueError(f"nuscenes_cameras: frame must be 'lidar' or 'ego', got {frame!r}")
    lidar_to_ego = np.eye(4)
    lidar_to_ego[:3, :3] = NUSCENES_LIDAR_TO_EGO_ROTATION
    lidar_to_ego[:3, 3] = NUSCENES_LIDAR_TO_EGO_TRANSLATION
    ego_to_lidar = np.linalg.inv(lidar_to_ego)
    out = []
    for name in NUSCENES_CAMERAS:
        rot, trans, k_unit = nuscenes_camera_to_ego(name)
        K = np.array(
            [
                [k_unit[0, 0] * width, 0.0, k_unit[0, 2] * width],
                [0.0, k_unit[1, 1] * width, k_unit[1, 2] * height],
                [0.0, 0.0, 1.0],
            ]
        )
        cam_to_ego = np.eye(4)
        cam_to_ego[:3, :3], cam_to_ego[:3, 3] = rot, trans
        cam_to_grid = ego_to_lidar @ cam_to_ego if frame == "lidar" else cam_to_ego
        out.append(
            (Camera(name, height, width, np.hstack([K, np.zeros((3, 1))]), cam_to_grid), K, rot, trans)
        )
    return out


def _rotation_xyz(ax: float, ay: float, az: float) -> np.ndarray:
    """Rz(az) @ Ry(ay) @ Rx(ax)."""
    cx, sx, cy, sy, cz, sz = (
        math.cos(ax),
        math.sin(ax),
        math.cos(ay),
        math.sin(ay),
        math.cos(az),
        math.sin(az),
    )
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_to_quaternion(R: np.ndarray) -> list[float]:
    """Unit quaternion [w, x, y, z] (w >= 0) of a rotation matrix."""
    m = np.asarray(R, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q) / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]
