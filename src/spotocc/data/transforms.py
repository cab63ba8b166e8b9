"""Image-view augmentation, BEV flips and image normalisation, as released (spec 01 section 5).

Image view (both datasets, per camera): resize -> crop -> horizontal flip -> rotate, done on a PIL
image; the same map of an original pixel ``p`` to the network pixel ``post_rot @ p + post_tran`` is
recorded in ``post_rot`` (3x3, top-left 2x2 used) and ``post_tran`` (3, first two used). The
matrices are built in float32 in the released order, so they equal the released ones bit for bit.

Pixel convention: like the released code, the map treats a pixel's index as its coordinate and PIL
treats pixel ``i`` as the square ``[i, i+1)``. The two differ by under one pixel (a flip maps ``u``
to ``W - u`` while the flipped image holds it at ``W - 1 - u``); this is the released behaviour and
is kept.

BEV (KITTI): flips of x, y and z about the centre of the point-cloud range, as a 4x4 affine ``bda``
applied to the 3D points, and the same flips applied to the ground truth by reversing array axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from spotocc.config import AugmentationConfig

# mmcv imnormalize statistics of the released configs (RGB order).
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------
# Image view


@dataclass(frozen=True)
class ImageAugmentation:
    """One camera's image-view augmentation (released ``sample_augmentation`` output)."""

    resize: float  # scale factor applied to the source image
    resize_dims: tuple[int, int]  # (W, H) of the resized image (int-truncated)
    crop: tuple[int, int, int, int]  # (x0, y0, x1, y1) box cut from the resized image
    flip: bool  # horizontal flip
    rotate: float  # degrees, counter-clockwise on screen, about the crop centre


def sample_image_augmentation(
    source_hw: tuple[int, int],
    input_size: tuple[int, int],
    aug: AugmentationConfig,
    *,
    train: bool,
    rng: np.random.Generator,
) -> ImageAugmentation:
    """Draw (train) or fix (test) the resize/crop/flip/rotate of one camera image.

    Train: scale ``fW/W + U(resize_lim)``, bottom-aligned crop (``crop_h`` range), random
    horizontal offset, flip with p = 0.5 if enabled, rotation ``U(rot_lim)`` degrees. Test: scale
    ``fW/W + resize_test``, bottom-aligned, horizontally centred crop, no flip, no rotation.
    """
    height, width = source_hw
    f_h, f_w = input_size
    if train:
        resize = float(f_w) / float(width) + float(rng.uniform(*aug.resize_lim))
        new_w, new_h = int(width * resize), int(height * resize)
        crop_h = int((1 - rng.uniform(*aug.crop_h)) * new_h) - f_h
        crop_w = int(rng.uniform(0, max(0, new_w - f_w)))
        flip = bool(aug.flip and rng.integers(0, 2))
        rotate = float(rng.uniform(*aug.rot_lim))
    else:
        resize = float(f_w) / float(width) + aug.resize_test
        new_w, new_h = int(width * resize), int(height * resize)
        crop_h = int((1 - float(np.mean(aug.crop_h))) * new_h) - f_h
        crop_w = int(max(0, new_w - f_w) / 2)
        flip = False
        rotate = 0.0
    crop = (crop_w, crop_h, crop_w + f_w, crop_h + f_h)
    return ImageAugmentation(resize=resize, resize_dims=(new_w, new_h), crop=crop, flip=flip, rotate=rotate)


def _rotation_2d(degrees: float) -> torch.Tensor:
    h = degrees / 180 * np.pi
    return torch.tensor([[np.cos(h), np.sin(h)], [-np.sin(h), np.cos(h)]], dtype=torch.float32)


def augmentation_matrices(params: ImageAugmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(post_rot [3, 3], post_tran [3])`` mapping an original pixel to the augmented one."""
    x0, y0, x1, y1 = params.crop
    rot = torch.eye(2) * params.resize  # [2, 2]
    tran = -torch.tensor([x0, y0], dtype=torch.float32)  # [2]
    if params.flip:
        flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
        rot = flip @ rot
        tran = flip @ tran + torch.tensor([float(x1 - x0), 0.0])
    r = _rotation_2d(params.rotate)
    centre = torch.tensor([float(x1 - x0), float(y1 - y0)]) / 2
    rot = r @ rot
    tran = r @ tran + (r @ -centre + centre)
    post_rot = torch.eye(3)
    post_rot[:2, :2] = rot
    post_tran = torch.zeros(3)
    post_tran[:2] = tran
    return post_rot, post_tran


def augment_image(img: Image.Image, params: ImageAugmentation) -> Image.Image:
    """Resize (bicubic), crop (zero padding outside), flip, rotate (nearest, black fill) with PIL."""
    img = img.resize(params.resize_dims, Image.Resampling.BICUBIC)
    img = img.crop(params.crop)
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.rotate(params.rotate, resample=Image.Resampling.NEAREST)


def normalize_image(img: Image.Image, *, bgr_input: bool) -> torch.Tensor:
    """``[3, H, W]`` float32: ``(pixel - mean) / std`` with the RGB statistics.

    ``bgr_input=True`` reproduces the released nuScenes quirk: the RGB image is reversed to B,G,R
    (mmcv's ``to_rgb`` swap applied to an image that was already RGB) and then normalised with the
    R,G,B statistics, so channel 0 is ``(B - 123.675) / 58.395``. ``False`` gives plain RGB, which
    is what the released KITTI pipeline feeds (it read BGR with OpenCV, so its swap was correct).
    """
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3] RGB
    if bgr_input:
        pixels = pixels.flip(-1)
    # float32 arithmetic with float32 statistics, as OpenCV does inside mmcv's imnormalize
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)
    inv_std = torch.tensor([1.0 / s for s in IMAGE_STD], dtype=torch.float32)
    normed = (pixels.to(torch.float32) - mean) * inv_std  # [H, W, 3]
    return normed.permute(2, 0, 1).contiguous()  # [3, H, W]


def denormalize_image(img: torch.Tensor, *, bgr_input: bool) -> np.ndarray:
    """Inverse of :func:`normalize_image`: uint8 ``[H, W, 3]`` RGB (for pictures and tests)."""
    pixels = img.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float64)  # [H, W, 3]
    pixels = pixels * np.asarray(IMAGE_STD) + np.asarray(IMAGE_MEAN)
    if bgr_input:
        pixels = pixels[..., ::-1]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# BEV (3D) augmentation


@dataclass(frozen=True)
class BevFlips:
    """Which grid axes are mirrored about the centre of the point-cloud range."""

    x: bool = False
    y: bool = False
    z: bool = False


def sample_bev_flips(aug: AugmentationConfig, rng: np.random.Generator, *, allow_z: bool = True) -> BevFlips:
    """Independent flips with the configured probabilities (the released order: x, y, z).

    The released KITTI loader also draws a rotation (range 0) and a scale that it never applies; they
    are not drawn here.
    """
    flip_x = bool(rng.uniform() < aug.flip_dx_ratio)
    flip_y = bool(rng.uniform() < aug.flip_dy_ratio)
    flip_z = bool(rng.uniform() < aug.flip_dz_ratio) and allow_z
    return BevFlips(x=flip_x, y=flip_y, z=flip_z)


def bev_matrix(flips: BevFlips, point_cloud_range: Sequence[float]) -> torch.Tensor:
    """4x4 float32 ``T(c) @ Fx @ Fy @ Fz @ T(-c)`` with ``c`` the centre of the range."""
    pcr = torch.tensor([float(v) for v in point_cloud_range], dtype=torch.float32)
    centre = (pcr[:3] + pcr[3:]) / 2
    to_centre = torch.eye(4)
    to_centre[:3, 3] = -centre
    from_centre = torch.eye(4)
    from_centre[:3, 3] = centre
    mirror = torch.eye(4)
    for axis, on in enumerate((flips.x, flips.y, flips.z)):
        if on:
            mirror[axis, axis] = -1.0
    return from_centre @ mirror @ to_centre


def flip_occupancy(gt_occ: np.ndarray, flips: BevFlips) -> np.ndarray:
    """The ``[X, Y, Z]`` grid mirrored like :func:`bev_matrix` (exact: the flips are about the centre)."""
    axes = tuple(axis for axis, on in enumerate((flips.x, flips.y, flips.z)) if on)
    if not axes:
        return gt_occ
    return np.ascontiguousarray(np.flip(gt_occ, axis=axes))


def voxel_centres(
    indices: np.ndarray, point_cloud_range: Sequence[float], occ_size: Sequence[int]
) -> np.ndarray:
    """Metric centres ``[..., 3]`` (grid frame) of integer voxel indices ``[..., 3]``."""
    lower = np.asarray(point_cloud_range[:3], dtype=np.float64)
    upper = np.asarray(point_cloud_range[3:], dtype=np.float64)
    size = (upper - lower) / np.asarray(occ_size, dtype=np.float64)
    return lower + (np.asarray(indices, dtype=np.float64) + 0.5) * size


def check_input_size(input_size: Sequence[int]) -> tuple[int, int]:
    """Validated ``(H, W)`` network input size."""
    if len(input_size) != 2 or any(int(v) <= 0 or int(v) != v for v in input_size):
        raise ValueError(f"input_size must be two positive integers (H, W), got {tuple(input_size)}")
    return int(input_size[0]), int(input_size[1])


def check_grid(point_cloud_range: Sequence[float], occ_size: Sequence[int]) -> None:
    """Raise a clear error for a malformed grid description."""
    if len(point_cloud_range) != 6:
        raise ValueError(f"point_cloud_range must have 6 values, got {tuple(point_cloud_range)}")
    if len(occ_size) != 3 or any(int(v) <= 0 for v in occ_size):
        raise ValueError(f"occ_size must be three positive integers, got {tuple(occ_size)}")
    if any(not math.isfinite(v) for v in point_cloud_range) or any(
        point_cloud_range[i + 3] <= point_cloud_range[i] for i in range(3)
    ):
        raise ValueError(
            f"point_cloud_range must be (min x, min y, min z, max x, max y, max z), got {point_cloud_range}"
        )
