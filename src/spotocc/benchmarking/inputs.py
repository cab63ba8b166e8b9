"""A batch of a preset's real sizes for ``spotocc benchmark``, made in a second, with nothing on disk.

What decides a stage's cost is the tensor sizes, which voxels the camera frustums reach (the sparse
encoder's active set) and, for training, how many classes the ground truth holds. So:

- images: random pixels at the preset's input size (dense convolutions cost the same whatever they see);
- geometry: the synthetic generator's camera rig for the dataset (KITTI calibration, or the six
  nuScenes cameras around LIDAR_TOP) with the dataset reader's test-time resize and crop;
- ``gt_occ``: the semantic voxels of one procedural street scene per sample, at the preset's grid;
- ``gt_depth``: depth at a random 3 % of the pixels (about what a LiDAR sweep covers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spotocc.config import Config
from spotocc.data.batch import collate
from spotocc.data.semantic_kitti import CAMERA_MATRICES
from spotocc.data.synthetic.generate import source_image_size
from spotocc.data.synthetic.geometry import (
    Camera,
    kitti_calibration,
    make_world,
    nuscenes_cameras,
)
from spotocc.data.synthetic.kinds import kind_to_class
from spotocc.data.synthetic.layout import build_scene
from spotocc.data.synthetic.sample import SETUPS, check_format, sample_rng
from spotocc.data.transforms import augmentation_matrices, sample_image_augmentation

__all__ = ["benchmark_batch", "preset_cameras"]

DEPTH_PIXEL_FRACTION = 0.03


def preset_cameras(cfg: Config) -> list[Camera]:
    """The synthetic rig's cameras named in ``cfg.data.cameras``, at the source image size."""
    fmt = cfg.data.format
    check_format(fmt)
    height, width = source_image_size(cfg.data)
    if fmt == "semantickitti":
        calib = kitti_calibration(height, width)
        tr = np.eye(4)
        tr[:3] = calib["Tr"]
        cam_to_lidar = np.linalg.inv(tr)
        unknown = [name for name in cfg.data.cameras if name not in CAMERA_MATRICES]
        if unknown:
            raise ValueError(
                f"data.cameras: SemanticKITTI has no camera {unknown}, only {sorted(CAMERA_MATRICES)}"
            )
        return [
            Camera(name, height, width, calib[CAMERA_MATRICES[name]], cam_to_lidar)
            for name in cfg.data.cameras
        ]
    rig = {cam.name: cam for cam, *_ in nuscenes_cameras(height, width)}
    unknown = [name for name in cfg.data.cameras if name not in rig]
    if unknown:
        raise ValueError(f"data.cameras: the nuScenes rig has no camera {unknown}, only {sorted(rig)}")
    return [rig[name] for name in cfg.data.cameras]


def _scene_labels(cfg: Config, index: int, seed: int) -> torch.Tensor:
    """uint8 [X, Y, Z] training labels of procedural scene ``index`` at the preset's grid."""
    fmt = cfg.data.format
    setup = SETUPS[fmt]
    world = make_world(cfg.grid, setup.pad)
    scene = build_scene(
        world,
        sample_rng(seed, "train", index),
        forward=setup.forward,
        lidar_height=setup.lidar_height,
        gt_range=cfg.grid.point_cloud_range,
    )
    labels = kind_to_class(fmt)[scene.kinds[world.gt_slices]]
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))


def benchmark_batch(cfg: Config, batch_size: int = 1, *, seed: int = 0) -> dict[str, Any]:
    """A collated batch (see :mod:`spotocc.data.batch`) of ``batch_size`` samples of ``cfg``'s sizes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cameras = preset_cameras(cfg)
    input_size = tuple(int(s) for s in cfg.data.input_size)
    gen = torch.Generator().manual_seed(seed)
    # test-time image transform of the readers: the same for every camera and sample
    params = sample_image_augmentation(
        (cameras[0].height, cameras[0].width),
        input_size,
        cfg.data.augmentation,
        train=False,
        rng=np.random.default_rng(seed),
    )
    post_rot, post_tran = augmentation_matrices(params)
    intrins = torch.zeros(len(cameras), 4, 4)
    for i, cam in enumerate(cameras):
        intrins[i, :3, :4] = torch.from_numpy(np.asarray(cam.P, dtype=np.float32))
        intrins[i, 3, 3] = 1.0
    cam_to_lidar = torch.from_numpy(np.stack([cam.cam_to_grid for cam in cameras]).astype(np.float32))
    lo, hi, _ = cfg.model.view_transformer.depth_bound
    samples = []
    for index in range(batch_size):
        depth = torch.zeros(len(cameras), *input_size)  # [N, H, W], 0 = no LiDAR point
        hit = torch.rand(depth.shape, generator=gen) < DEPTH_PIXEL_FRACTION
        depth[hit] = lo + (hi - lo) * torch.rand(int(hit.sum()), generator=gen)
        samples.append(
            {
                "img": torch.randn(len(cameras), 3, *input_size, generator=gen),  # [N, 3, H, W]
                "rots": cam_to_lidar[:, :3, :3].clone(),  # [N, 3, 3]
                "trans": cam_to_lidar[:, :3, 3].clone(),  # [N, 3]
                "intrins": intrins.clone(),  # [N, 4, 4]
                "post_rots": post_rot.expand(len(cameras), 3, 3).clone(),
                "post_trans": post_tran.expand(len(cameras), 3).clone(),
                "bda": torch.eye(4),
                "gt_depth": depth,
                "gt_occ": _scene_labels(cfg, index, seed),
                "meta": {"sample_id": f"benchmark_{index:03d}", "dataset": "benchmark"},
            }
        )
    return collate(samples)
