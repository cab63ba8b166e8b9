"""The sample and batch dictionaries every dataset produces and every model consumes.

A dataset item (``dataset[i]``) is a dict of tensors without a batch axis; :func:`collate` stacks
them into a batch. N = cameras, H x W = network input size, X x Y x Z = occupancy grid.

==============  =====================  ==========================================================
key             shape / type           meaning
==============  =====================  ==========================================================
img             float32 [N, 3, H, W]   normalised network input (channel order: see DataConfig)
rots            float32 [N, 3, 3]      camera -> grid frame (LiDAR) rotation
trans           float32 [N, 3]         camera -> grid frame translation
intrins         float32 [N, 4, 4]      projection padded to 4x4: nuScenes K (4th column 0),
                                       KITTI P2 (4th column = stereo offset, subtracted first)
post_rots       float32 [N, 3, 3]      image augmentation: original pixel -> network pixel
post_trans      float32 [N, 3]         (top-left 2x2 / first two entries used, see transforms)
bda             float32 [4, 4]         BEV augmentation applied to the 3D points (identity if off)
gt_depth        float32 [N, H, W]      optional: LiDAR depth at network pixels, 0 = no point
gt_occ          uint8 [X, Y, Z]        optional: labels in the official orientation, 255 = ignore
mask_camera     bool [X, Y, Z]         optional (Occ3D): voxel observed by the current cameras
mask_lidar      bool [X, Y, Z]         optional (Occ3D): voxel observed by the accumulated LiDAR
meta            dict                   "sample_id" (unique str, used for prediction file names),
                                       "dataset", and reader-specific entries (paths, tokens)
==============  =====================  ==========================================================

In a batch every tensor gains a leading batch axis B; ``meta`` becomes a list of B dicts. Optional
keys are present in a batch only if every sample has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

REQUIRED_KEYS = ("img", "rots", "trans", "intrins", "post_rots", "post_trans", "bda")
OPTIONAL_KEYS = ("gt_depth", "gt_occ", "mask_camera", "mask_lidar")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch (any batch size); ``meta`` stays a list of dicts."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    batch: dict[str, Any] = {}
    for key in REQUIRED_KEYS:
        missing = [i for i, s in enumerate(samples) if key not in s]
        if missing:
            raise KeyError(f"collate: samples {missing} lack the required key {key!r}")
        batch[key] = _stack(key, [s[key] for s in samples])
    for key in OPTIONAL_KEYS:
        if all(key in s for s in samples):
            batch[key] = _stack(key, [s[key] for s in samples])
    batch["meta"] = [dict(s.get("meta", {})) for s in samples]
    return batch


def _stack(key: str, values: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"collate: samples disagree on the shape of {key!r}: {sorted(shapes)}")
    return torch.stack(values)
