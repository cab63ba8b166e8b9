import math

import numpy as np
import pytest
import torch
from PIL import Image

from spotocc.config import AugmentationConfig
from spotocc.data import NuScenesOccupancy, SemanticKITTI
from spotocc.data.transforms import (
    BevFlips,
    ImageAugmentation,
    augment_image,
    augmentation_matrices,
    bev_matrix,
    denormalize_image,
    flip_occupancy,
    normalize_image,
    sample_image_augmentation,
    voxel_centres,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "source_wh, input_hw, resize_dims, crop",
    [
        ((1226, 370), (384, 1280), (1280, 386), (0, 2, 1280, 386)),  # KITTI seq 08 (spec 04 1.8)
        ((1241, 376), (384, 1280), (1279, 387), (0, 3, 1280, 387)),  # int truncation quirk
        ((1600, 900), (256, 704), (704, 396), (0, 140, 704, 396)),  # nuScenes
    ],
)
def test_test_time_parameters_match_the_release(source_wh, input_hw, resize_dims, crop):
    params = sample_image_augmentation(source_wh[::-1], input_hw, AugmentationConfig(), train=False, rng=RNG)
    assert params.resize_dims == resize_dims and params.crop == crop
    assert not params.flip and params.rotate == 0.0
    assert params.resize == pytest.approx(input_hw[1] / source_wh[0])


def test_train_parameters_stay_in_their_ranges():
    aug = AugmentationConfig()
    flips = []
    for _ in range(50):
        p = sample_image_augmentation((900, 1600), (256, 704), aug, train=True, rng=RNG)
        assert 0.44 - 0.06 <= p.resize <= 0.44 + 0.11 and -5.4 <= p.rotate <= 5.4
        assert p.crop[1] == p.resize_dims[1] - 256 and p.crop[3] - p.crop[1] == 256  # bottom aligned
        assert 0 <= p.crop[0] <= max(0, p.resize_dims[0] - 704) and p.crop[2] - p.crop[0] == 704
        flips.append(p.flip)
    assert any(flips) and not all(flips)
    no_flip = AugmentationConfig(flip=False)
    assert not any(
        sample_image_augmentation((90, 160), (32, 64), no_flip, train=True, rng=RNG).flip for _ in range(20)
    )


def test_augmentation_matrices_by_hand():
    params = ImageAugmentation(resize=0.5, resize_dims=(50, 40), crop=(2, 3, 42, 23), flip=True, rotate=90.0)
    post_rot, post_tran = augmentation_matrices(params)
    # p -> 0.5 p - (2, 3) -> flip u: 40 - u -> rotate 90 deg about (20, 10): R = [[0, 1], [-1, 0]].
    p = np.array([30.0, 16.0])
    q = 0.5 * p - np.array([2.0, 3.0])
    q[0] = 40 - q[0]
    c = np.array([20.0, 10.0])
    q = np.array([[0.0, 1.0], [-1.0, 0.0]]) @ (q - c) + c
    got = post_rot[:2, :2].double().numpy() @ p + post_tran[:2].double().numpy()
    assert np.allclose(got, q, atol=1e-4)
    assert post_rot[2].tolist() == [0.0, 0.0, 1.0] and post_tran[2] == 0.0


def test_image_ops_follow_the_matrices_on_a_single_pixel():
    # No resize (scale 1), a crop, a flip, no rotation: the pixel moves exactly as the matrices say,
    # up to the released flip convention (u -> W - u, the image puts it at W - 1 - u).
    src = np.zeros((20, 30, 3), dtype=np.uint8)
    src[12, 7] = 255
    params = ImageAugmentation(resize=1.0, resize_dims=(30, 20), crop=(4, 6, 28, 22), flip=True, rotate=0.0)
    out = np.asarray(augment_image(Image.fromarray(src), params))
    assert out.shape == (16, 24, 3)
    post_rot, post_tran = augmentation_matrices(params)
    u, v = (post_rot[:2, :2] @ torch.tensor([7.0, 12.0]) + post_tran[:2]).tolist()
    assert (u, v) == (21.0, 6.0)
    assert out[6, 20, 0] == 255 and out[..., 0].sum() == 255  # column W - 1 - 3 = 20
    # A crop box outside the image is zero padded.
    padded = np.asarray(augment_image(Image.fromarray(np.full((4, 4, 3), 9, np.uint8)), ImageAugmentation(
        resize=1.0, resize_dims=(4, 4), crop=(-2, -1, 4, 4), flip=False, rotate=0.0
    )))  # fmt: skip
    assert padded[0].sum() == 0 and padded[:, :2].sum() == 0 and (padded[1:, 2:] == 9).all()


def test_normalisation_round_trip_and_channel_order():
    img = Image.fromarray(np.array([[[200, 100, 30]]], dtype=np.uint8))
    rgb = normalize_image(img, bgr_input=False)
    bgr = normalize_image(img, bgr_input=True)
    assert rgb.shape == (3, 1, 1)
    assert torch.allclose(
        rgb[:, 0, 0], torch.tensor([(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (30 - 103.53) / 57.375])
    )
    assert torch.allclose(
        bgr[:, 0, 0], torch.tensor([(30 - 123.675) / 58.395, (100 - 116.28) / 57.12, (200 - 103.53) / 57.375])
    )
    for t, flag in ((rgb, False), (bgr, True)):
        assert denormalize_image(t, bgr_input=flag).tolist() == [[[200, 100, 30]]]


def test_bev_matrix_and_grid_flip_agree():
    pcr, size = (0.0, -25.6, -2.0, 51.2, 25.6, 4.4), (8, 8, 4)
    flips = BevFlips(x=True, y=False, z=True)
    bda = bev_matrix(flips, pcr).double().numpy()
    point = np.array([10.0, 3.0, 0.5, 1.0])
    assert np.allclose(bda @ point, [51.2 - 10.0, 3.0, 2.4 - 0.5, 1.0], atol=1e-5)
    assert torch.equal(bev_matrix(BevFlips(), pcr), torch.eye(4))
    gt = np.arange(8 * 8 * 4, dtype=np.uint8).reshape(size)
    flipped = flip_occupancy(gt, flips)
    for idx in [(0, 0, 0), (3, 5, 2), (7, 1, 3)]:
        # The voxel at idx moves to the voxel whose centre is bda @ centre(idx).
        centre = np.append(voxel_centres(np.array(idx), pcr, size), 1.0)
        moved = bda @ centre
        new_idx = tuple(np.floor((moved[:3] - np.array(pcr[:3])) / np.array([6.4, 6.4, 1.6])).astype(int))
        assert flipped[new_idx] == gt[idx]


# ---------------------------------------------------------------------------------------------------
# Image, geometry and GT stay consistent under every augmentation: a voxel's marker in the source image


def _project(sample, cam, point_grid):
    """Grid-frame point (after bda) -> augmented pixel with the sample's own geometry (float64)."""
    bda = sample["bda"].double().numpy()
    lidar = np.linalg.solve(bda, np.append(point_grid, 1.0))[:3]  # undo the BEV augmentation
    rots, trans = sample["rots"][cam].double().numpy(), sample["trans"][cam].double().numpy()
    cam_pt = np.linalg.solve(rots, lidar - trans)
    h = sample["intrins"][cam].double().numpy() @ np.append(cam_pt, 1.0)  # P2's 4th column included
    uv = h[:2] / h[2]
    return (
        sample["post_rots"][cam, :2, :2].double().numpy() @ uv
        + sample["post_trans"][cam, :2].double().numpy()
    )


def _marker_centroid(image_rgb, colour):
    ref = np.array(colour)
    mask = np.all(np.abs(image_rgb.astype(int) - ref) < 70, axis=-1)
    assert mask.sum() >= 4, f"marker {colour} not visible"
    v, u = np.nonzero(mask)
    return np.array([u.mean(), v.mean()])


def _draw(image, uv, colour, half):
    u, v = int(round(uv[0])), int(round(uv[1]))
    image[v - half : v + half + 1, u - half : u + half + 1] = colour


def _source_pixel(p, k, tr, point):
    cam = tr @ np.append(point, 1.0)
    h = p @ np.append(cam[:3], 1.0)
    return h[:2] / h[2]


RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_kitti_markers_follow_image_and_bev_augmentation(tmp_path, tiny):
    occ_size, pcr = tiny.KITTI_OCC_SIZE, tiny.KITTI_RANGE
    voxels = {RED: ((6, 8, 3), 10, 1), BLUE: ((10, 5, 2), 40, 9)}  # colour: (index, raw id, class)
    p2 = np.vstack([tiny.KITTI_P2, [0, 0, 0, 1]])
    tr = np.vstack([tiny.KITTI_TR, [0, 0, 0, 1]])
    image = tiny.grey_image(*tiny.KITTI_IMAGE_WH)
    raw = np.zeros(occ_size, dtype=np.uint16)
    for colour, (idx, raw_id, _) in voxels.items():
        raw[idx] = raw_id
        _draw(image, _source_pixel(p2, None, tr, voxel_centres(np.array(idx), pcr, occ_size)), colour, half=3)
    root = tmp_path
    tiny.write_calib(root / "dataset/sequences/00/calib.txt", tiny.kitti_calib())
    tiny.write_kitti_frame(
        root,
        "00",
        "000000",
        raw_labels=raw,
        invalid=np.zeros(occ_size, bool),
        image=image,
        points=np.zeros((1, 4)),
    )
    aug = AugmentationConfig(bda=True)
    test_ds = SemanticKITTI(root, "train", occ_size=occ_size, input_size=tiny.KITTI_INPUT_SIZE)
    train_ds = SemanticKITTI(
        root, "train", occ_size=occ_size, input_size=tiny.KITTI_INPUT_SIZE, augmentation=aug, train=True
    )
    torch.manual_seed(1)
    seen_flips, seen_image_flips = set(), set()
    samples = [(test_ds[0], 1.0)] + [(train_ds[0], 2.0) for _ in range(16)]
    for sample, tolerance in samples:
        img = denormalize_image(sample["img"][0], bgr_input=False)
        seen_flips.add(sample["meta"]["bev_flips"])
        seen_image_flips.add(bool(sample["post_rots"][0, 0, 0] < 0))
        for colour, (_, _, cls) in voxels.items():
            idx = np.argwhere(sample["gt_occ"].numpy() == cls)
            assert len(idx) == 1  # the labelled voxel, wherever the BEV flip moved it
            uv = _project(sample, 0, voxel_centres(idx[0], pcr, occ_size))
            assert np.linalg.norm(uv - _marker_centroid(img, colour)) < tolerance, (colour, sample["meta"])
    assert len(seen_flips) >= 4 and seen_image_flips == {False, True}


def test_nuscenes_markers_follow_image_augmentation_and_optional_bev_flips(tmp_path, tiny):
    occ_size, pcr = tiny.NUSC_OCC_SIZE, tiny.NUSC_RANGE
    voxels = {"CAM_FRONT": ((8, 12, 1), 4, RED), "CAM_BACK": ((7, 3, 2), 10, BLUE)}
    info = tiny.nusc_info(0, timestamp=5)
    images, rows = {}, []
    for camera, (idx, label, colour) in voxels.items():
        rot, tran = tiny.NUSC_SENSOR2LIDAR[camera]
        cam_pt = np.linalg.solve(rot, voxel_centres(np.array(idx), pcr, occ_size) - tran)
        uv = (tiny.NUSC_K @ cam_pt)[:2] / cam_pt[2]
        images[camera] = tiny.grey_image(*tiny.NUSC_IMAGE_WH)
        _draw(images[camera], uv, colour, half=5)
        rows.append([idx[2], idx[1], idx[0], label])
    paths = {"data_root": tmp_path / "nusc", "occ_root": tmp_path / "occ", "depth_root": tmp_path / "depth"}
    tiny.write_nusc_sample(*paths.values(), info, rows=np.array(rows), images=images)
    tiny.write_infos(tmp_path / "infos.pkl", [info])
    common = dict(cameras=tiny.NUSC_CAMERAS, input_size=tiny.NUSC_INPUT_SIZE, occ_size=occ_size)
    args = (paths["data_root"], tmp_path / "infos.pkl", paths["occ_root"])
    test_ds = NuScenesOccupancy(*args, **common)
    train_ds = NuScenesOccupancy(*args, depth_root=paths["depth_root"], train=True, **common)
    bda_ds = NuScenesOccupancy(
        *args, depth_root=paths["depth_root"], train=True, augmentation=AugmentationConfig(bda=True), **common
    )
    torch.manual_seed(2)
    samples = [(test_ds[0], 1.0, False)] + [(train_ds[0], 2.0, False) for _ in range(6)]
    samples += [(bda_ds[0], 2.0, True) for _ in range(8)]
    seen_flips = set()
    for sample, tolerance, bev_augmented in samples:
        if bev_augmented:
            seen_flips.add(sample["meta"]["bev_flips"])
        else:  # released nuScenes: no BEV augmentation even in training
            assert torch.equal(sample["bda"], torch.eye(4))
        for cam, (camera, (_, label, colour)) in enumerate(voxels.items()):
            img = denormalize_image(sample["img"][cam], bgr_input=True)
            idx = np.argwhere(sample["gt_occ"].numpy() == label)
            assert len(idx) == 1
            uv = _project(sample, cam, voxel_centres(idx[0], pcr, occ_size))
            assert np.linalg.norm(uv - _marker_centroid(img, colour)) < tolerance, (camera, sample["meta"])
    assert all(not f[2] for f in seen_flips) and len(seen_flips) >= 3  # x/y flips only for nuScenes


def test_rotation_matches_pil_rotate_direction():
    # The released rotation matrix [[cos, sin], [-sin, cos]] in image coordinates (v down) is PIL's
    # counter-clockwise rotate: a pixel right of the centre moves up.
    src = np.zeros((41, 41, 3), dtype=np.uint8)
    src[20, 35] = 255
    params = ImageAugmentation(resize=1.0, resize_dims=(41, 41), crop=(0, 0, 41, 41), flip=False, rotate=30.0)
    out = np.asarray(augment_image(Image.fromarray(src), params))
    v, u = np.argwhere(out[..., 0] == 255)[0]
    post_rot, post_tran = augmentation_matrices(params)
    expected = post_rot[:2, :2].double().numpy() @ np.array([35.0, 20.0]) + post_tran[:2].double().numpy()
    assert math.dist((u, v), expected) < 1.0 and v < 20
