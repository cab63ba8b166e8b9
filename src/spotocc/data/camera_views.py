"""One sample's camera images, augmentation matrices and depth targets, shared by the nuScenes readers.

The readers differ in where images, calibration and ground truth come from; once a sample's cameras
are resolved to :class:`CameraView` records, loading them is the same: read the image, draw (train)
or fix (test) its augmentation, normalise it, and (train) move the LiDAR depth points of the image
through the same augmentation. The random draws happen camera by camera in the given order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotocc.config import AugmentationConfig
from spotocc.data.depth import pixel_depth_targets
from spotocc.data.files import read_binary, read_image
from spotocc.data.transforms import (
    augment_image,
    augmentation_matrices,
    normalize_image,
    sample_image_augmentation,
)


@dataclass(frozen=True)
class CameraView:
    """One camera of a sample: its image file, the name its depth file is keyed by, and its geometry."""

    image_path: Path  # the image on this machine
    data_path: str  # the image path as the sample list writes it (its base name names the depth file)
    rot: torch.Tensor  # float32 [3, 3]: camera -> grid frame
    tran: torch.Tensor  # float32 [3]
    intrin: torch.Tensor  # float32 [4, 4]


def depth_path(depth_root: str | Path, image_path: str) -> Path:
    """The depth_gt file of an image: ``<depth_root>/<image file name>.bin``."""
    return Path(depth_root) / f"{os.path.basename(image_path)}.bin"


def read_depth_points(path: str | Path) -> np.ndarray:
    """A depth_gt ``.bin`` file -> float32 ``[P, 3]`` rows (u, v, depth) in original pixels."""
    return read_binary(path, np.float32, what="depth file", row=3).reshape(-1, 3)


def load_views(
    views: Sequence[CameraView],
    *,
    input_size: tuple[int, int],
    augmentation: AugmentationConfig,
    train: bool,
    rng: np.random.Generator,
    bgr_input: bool,
    depth_root: str | Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The camera keys of a sample (img, rots, trans, intrins, post_rots, post_trans, and gt_depth when
    ``depth_root`` is given) and the image paths read, in the order of ``views``."""
    imgs, post_rots, post_trans, depths, paths = [], [], [], [], []
    for view in views:
        img = read_image(view.image_path)
        params = sample_image_augmentation(
            (img.height, img.width), input_size, augmentation, train=train, rng=rng
        )
        post_rot, post_tran = augmentation_matrices(params)
        imgs.append(normalize_image(augment_image(img, params), bgr_input=bgr_input))
        post_rots.append(post_rot)
        post_trans.append(post_tran)
        paths.append(str(view.image_path))
        if depth_root is not None:
            points = read_depth_points(depth_path(depth_root, view.data_path))
            depths.append(pixel_depth_targets(points, params, input_size))
    sample: dict[str, Any] = {
        "img": torch.stack(imgs),  # [N, 3, H, W]
        "rots": torch.stack([v.rot for v in views]),  # [N, 3, 3]
        "trans": torch.stack([v.tran for v in views]),  # [N, 3]
        "intrins": torch.stack([v.intrin for v in views]),  # [N, 4, 4]
        "post_rots": torch.stack(post_rots),  # [N, 3, 3]
        "post_trans": torch.stack(post_trans),  # [N, 3]
    }
    if depth_root is not None:
        sample["gt_depth"] = torch.stack(depths)  # [N, H, W]
    return sample, paths


def intrinsics_4x4(K: Any) -> torch.Tensor:
    """A 3x3 pinhole matrix padded to float32 [4, 4] (4th column 0, [3, 3] = 1)."""
    intrin = torch.eye(4)
    intrin[:3, :3] = torch.tensor(np.asarray(K, dtype=np.float64), dtype=torch.float32)
    return intrin
