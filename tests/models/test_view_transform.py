import math

import pytest
import torch
import torch.nn.functional as F

from spotocc.config import get_config
from spotocc.models.view_transform import (
    NO_DEPTH,
    DeformConv2d,
    DepthNet,
    SingleSampleSafeBatchNorm1d,
    ViewTransformer,
    camera_parameter_vector,
    depth_bce_loss,
    depth_distance_weights,
    depth_targets,
    frustum_to_grid,
    image_aug_transform,
    lift_and_pool,
    make_frustum,
    mix_teacher_depth,
    occupancy_depth,
    voxel_indices,
)

# A small camera setup: 64x176 input -> 4x11 features, frustum u = 17.5 j, v = 21 i, d = 2 + 0.5 k.
INPUT = (64, 176)
NUSC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
CAM_TO_LIDAR = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x right/y down/z fwd


def _pad4(k: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(4, 4)
    out[: k.shape[0], : k.shape[1]] = k
    return out


def _cams(rot, tran, intrin, post_rot=None, post_tran=None, bda=None):
    """Batch-of-1, 1-camera tensors in the batch contract."""
    post_rot = torch.eye(3) if post_rot is None else post_rot
    post_tran = torch.zeros(3) if post_tran is None else post_tran
    bda = torch.eye(4) if bda is None else bda
    return (
        rot.view(1, 1, 3, 3),
        tran.view(1, 1, 3),
        intrin.view(1, 1, 4, 4),
        post_rot.view(1, 1, 3, 3),
        post_tran.view(1, 1, 3),
        bda.view(1, 4, 4),
    )


def _tiny_view_transformer(**overrides) -> ViewTransformer:
    kwargs = dict(
        in_channels=8,
        context_channels=4,
        camera_params=27,
        downsample=16,
        depth_bound=(2.0, 58.0, 0.5),
        point_cloud_range=NUSC_RANGE,
        grid_size=(128, 128, 10),
        input_size=INPUT,
    )
    kwargs.update(overrides)
    return ViewTransformer(**kwargs)


# --------------------------------------------------------------------------------------------------
# Frustum, buffers, parameter counts


def test_frustum_uses_linspace_pixel_positions():
    frustum = make_frustum((256, 704), 16, (2.0, 58.0, 0.5))
    assert frustum.shape == (112, 16, 44, 3)
    torch.testing.assert_close(frustum[0, 0, :3, 0], torch.tensor([0.0, 703 / 43, 2 * 703 / 43]))
    assert frustum[0, 0, -1, 0] == 703 and frustum[0, -1, 0, 1] == 255 and frustum[0, 1, 0, 1] == 17
    assert frustum[:, 0, 0, 2].tolist() == [2.0 + 0.5 * k for k in range(112)]


@pytest.mark.parametrize(
    ("preset", "input_size", "total", "dx", "bx", "nx"),
    [
        ("spotocc_nusc_256", (256, 704), 28_078_913, [0.8] * 3, [-50.8, -50.8, -4.6], [128, 128, 10]),
        ("spotocc_kitti", (384, 1280), 44_077_773, [0.4] * 3, [0.2, -25.4, -1.8], [128, 128, 16]),
    ],
)
def test_released_view_transformer_parameters_and_buffers(preset, input_size, total, dx, bx, nx):
    cfg = get_config(preset)
    vt = ViewTransformer.from_config(cfg.model.view_transformer, cfg.grid, input_size)
    trainable = sum(p.numel() for p in vt.parameters() if p.requires_grad)
    buffers = {name: getattr(vt, name) for name in ("dx", "bx", "nx", "frustum")}
    assert trainable + sum(b.numel() for b in buffers.values()) == total
    assert all(p.requires_grad for p in vt.parameters())
    assert {k: v.shape for k, v in vt.state_dict().items() if "." not in k} == {
        k: v.shape for k, v in buffers.items()
    }
    assert torch.equal(vt.dx, torch.tensor(dx)) and torch.equal(vt.bx, torch.tensor(bx))
    assert torch.equal(vt.nx, torch.tensor(nx, dtype=torch.float32))
    assert vt.frustum.shape == (112, input_size[0] // 16, input_size[1] // 16, 3)
    assert vt.depth_net.depth_conv[4].weight.shape[1] == cfg.model.view_transformer.in_channels // 4
    assert vt.depth_net.bn.num_features == cfg.model.view_transformer.camera_params


# --------------------------------------------------------------------------------------------------
# Geometry


def test_image_aug_transform_by_hand():
    post_rot, post_tran = image_aug_transform(
        resize=0.5, crop=(10, 20), flip=True, rotate=90.0, input_size=INPUT
    )
    # (100, 80) -> resize (50, 40) -> crop (40, 20) -> flip (136, 20) -> rotate 90 deg about (88, 32)
    pixel = post_rot[:2, :2] @ torch.tensor([100.0, 80.0]) + post_tran[:2]
    torch.testing.assert_close(pixel, torch.tensor([76.0, -16.0]), atol=1e-4, rtol=0)
    assert post_rot[2].tolist() == [0.0, 0.0, 1.0] and post_tran[2] == 0


def test_geometry_hand_computed_point_and_voxel():
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    cams = _cams(CAM_TO_LIDAR, torch.tensor([1.0, 0.5, 1.5]), k)
    frustum = make_frustum(INPUT, 16, (2.0, 58.0, 0.5))
    points = frustum_to_grid(frustum, *cams)
    # cell (d = 10 -> k 16, v = 42 -> i 2, u = 70 -> j 4): camera (-1.8, 1.0, 10) -> LiDAR (10, 1.8, -1) + t
    torch.testing.assert_close(points[0, 0, 16, 2, 4], torch.tensor([11.0, 2.3, 0.5]))
    lower, dx = torch.tensor(NUSC_RANGE[:3]), torch.tensor([0.8] * 3)
    index, inside = voxel_indices(points, lower, dx, (128, 128, 10))
    # trunc(62.2 / 0.8) = 77, trunc(53.5 / 0.8) = 66, trunc(5.5 / 0.8) = 6
    assert inside[0, 0, 16, 2, 4] and index[0, 0, 16, 2, 4] == (77 * 128 + 66) * 10 + 6


def test_geometry_hand_computed_voxel_with_image_flip_resize_and_a_bev_flip():
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    # image: resized by 0.5 and flipped, u' = 176 - 0.5 u, v' = 0.5 v; BEV: y -> -y
    post_rot = torch.diag(torch.tensor([-0.5, 0.5, 1.0]))
    post_tran = torch.tensor([176.0, 0.0, 0.0])
    bda = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))
    cams = _cams(CAM_TO_LIDAR, torch.tensor([1.0, 0.5, 1.5]), k, post_rot, post_tran, bda)
    points = frustum_to_grid(make_frustum(INPUT, 16, (2.0, 58.0, 0.5)), *cams)
    # cell (d = 10 -> k 16, v' = 42 -> i 2, u' = 105 -> j 6) is the original pixel (142, 84): camera
    # (5.4, 5.2, 10) -> LiDAR (10, -5.4, -5.2) + t = (11, -4.9, -3.7) -> flipped (11, 4.9, -3.7)
    torch.testing.assert_close(points[0, 0, 16, 2, 6], torch.tensor([11.0, 4.9, -3.7]))
    lower, dx = torch.tensor(NUSC_RANGE[:3]), torch.tensor([0.8] * 3)
    index, inside = voxel_indices(points, lower, dx, (128, 128, 10))
    # trunc(62.2 / 0.8) = 77, trunc(56.1 / 0.8) = 70, trunc(1.3 / 0.8) = 1
    assert inside[0, 0, 16, 2, 6] and index[0, 0, 16, 2, 6] == (77 * 128 + 70) * 10 + 1


def test_geometry_subtracts_the_kitti_projection_offset():
    p2 = torch.tensor([[100.0, 0.0, 88.0, 50.0], [0.0, 100.0, 32.0, 0.0], [0.0, 0.0, 1.0, 0.5], [0, 0, 0, 1]])
    cams = _cams(torch.eye(3), torch.zeros(3), p2)
    points = frustum_to_grid(make_frustum(INPUT, 16, (2.0, 58.0, 0.5)), *cams)
    # q = (70 * 10, 42 * 10, 10) - (50, 0, 0.5) = (650, 420, 9.5); K^-1 q = (-1.86, 1.16, 9.5)
    torch.testing.assert_close(points[0, 0, 16, 2, 4], torch.tensor([-1.86, 1.16, 9.5]))


def test_geometry_applies_bev_flips_about_the_range_centre():
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    frustum = make_frustum(INPUT, 16, (2.0, 58.0, 0.5))
    plain = frustum_to_grid(frustum, *_cams(CAM_TO_LIDAR, torch.tensor([1.0, 0.5, 1.5]), k))
    # KITTI bda with all three flips about (25.6, 0, 1.2): x -> 51.2 - x, y -> -y, z -> 2.4 - z
    flip = torch.diag(torch.tensor([-1.0, -1.0, -1.0, 1.0]))
    flip[:3, 3] = torch.tensor([51.2, 0.0, 2.4])
    flipped = frustum_to_grid(frustum, *_cams(CAM_TO_LIDAR, torch.tensor([1.0, 0.5, 1.5]), k, bda=flip))
    expected = torch.stack([51.2 - plain[..., 0], -plain[..., 1], 2.4 - plain[..., 2]], dim=-1)
    torch.testing.assert_close(flipped, expected)


@pytest.mark.parametrize("kitti", [False, True])
def test_every_frustum_point_projects_back_to_its_pixel_and_depth(kitti):
    """Forward projection (bda^-1, LiDAR -> camera, projection, augmentation) of every geometry point."""
    torch.manual_seed(0)
    b, n = 2, 2
    angle = torch.tensor([0.3, -1.2])
    rots = torch.zeros(b, n, 3, 3)
    trans = torch.randn(b, n, 3)
    intrins = torch.zeros(b, n, 4, 4)
    post_rots = torch.zeros(b, n, 3, 3)
    post_trans = torch.zeros(b, n, 3)
    augs = [
        dict(resize=0.44, crop=(12.0, 140.0), flip=False, rotate=0.0),
        dict(resize=0.5, crop=(30.0, 180.0), flip=True, rotate=4.2),
        dict(resize=0.41, crop=(0.0, 120.0), flip=True, rotate=-5.4),
        dict(resize=0.55, crop=(50.0, 200.0), flip=False, rotate=2.0),
    ]
    for i in range(b):
        for j in range(n):
            yaw = angle[j] + i
            rz = torch.tensor(
                [[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]]
            )
            rots[i, j] = rz @ CAM_TO_LIDAR
            k = torch.tensor([[1260.0 + 10 * i, 0.0, 800.0 + j], [0.0, 1250.0, 450.0], [0.0, 0.0, 1.0]])
            intrins[i, j, :3, :3] = k
            if kitti:
                intrins[i, j, :3, 3] = torch.tensor([45.0 + i, -0.3, 0.003 * (j + 1)])
            intrins[i, j, 3, 3] = 1.0
            post_rots[i, j], post_trans[i, j] = image_aug_transform(**augs[2 * i + j], input_size=INPUT)
    bda = torch.eye(4).repeat(b, 1, 1)
    bda[1, 0, 0], bda[1, 2, 2] = -1.0, -1.0
    bda[1, :3, 3] = torch.tensor([51.2, 0.0, 2.4])
    frustum = make_frustum(INPUT, 16, (2.0, 58.0, 0.5))
    points = frustum_to_grid(frustum, rots, trans, intrins, post_rots, post_trans, bda).double()

    # forward projection in float64
    homog = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    lidar = torch.einsum("bij,bnkhwj->bnkhwi", torch.inverse(bda.double()), homog)[..., :3]
    rots64, trans64 = rots.double(), trans.double()
    cam = torch.einsum("bnji,bnkhwj->bnkhwi", rots64, lidar - trans64[:, :, None, None, None])
    cam_h = torch.cat([cam, torch.ones_like(cam[..., :1])], dim=-1)
    proj = torch.einsum("bnij,bnkhwj->bnkhwi", intrins.double()[:, :, :3], cam_h)  # (u d, v d, d)
    depth = proj[..., 2]
    uv = proj[..., :2] / depth[..., None]
    aug_uv = torch.einsum("bnij,bnkhwj->bnkhwi", post_rots.double()[:, :, :2, :2], uv)
    aug_uv = aug_uv + post_trans.double()[:, :, None, None, None, :2]
    expected = frustum.double().expand_as(points)
    torch.testing.assert_close(aug_uv, expected[..., :2], atol=2e-3, rtol=0)
    torch.testing.assert_close(depth, expected[..., 2], atol=1e-4, rtol=0)


def test_camera_parameter_vector_layouts():
    rots = torch.arange(9.0).view(1, 1, 3, 3) + 100  # R00..R22 = 100..108
    trans = torch.tensor([[[200.0, 201.0, 202.0]]])
    intrins = (torch.arange(16.0).view(1, 1, 4, 4) + 300).clone()
    post_rots = torch.arange(9.0).view(1, 1, 3, 3) + 400
    post_trans = torch.tensor([[[500.0, 501.0, 502.0]]])
    bda = (torch.arange(16.0).view(1, 4, 4) + 600).clone()
    args = (rots, trans, intrins, post_rots, post_trans, bda)
    extr = [100, 101, 102, 200, 103, 104, 105, 201, 106, 107, 108, 202]
    nusc = camera_parameter_vector(*args, layout=27)[0, 0].tolist()
    assert nusc == [300, 305, 302, 306, 400, 401, 500, 403, 404, 501, 600, 601, 604, 605, 610] + extr
    kitti = camera_parameter_vector(*args, layout=33)[0, 0].tolist()
    intr = [300, 305, 302, 306, 303, 307, 311]
    assert kitti == intr + [400, 401, 500, 403, 404, 501, 600, 601, 604, 605, 610, 603, 607, 611] + extr


# --------------------------------------------------------------------------------------------------
# Voxel pooling


def _naive_pool(depth, context, points, lower, dx, grid):
    """Python loop over every point: trunc toward zero, drop outside, sum per voxel."""
    b, n, d, h, w = depth.shape
    c = context.shape[2]
    out = torch.zeros(b, c, *grid, dtype=torch.float64)
    for ib in range(b):
        for i_n in range(n):
            for k in range(d):
                for i in range(h):
                    for j in range(w):
                        p = points[ib, i_n, k, i, j].tolist()
                        idx = [math.trunc((p[a] - lower[a]) / dx[a]) for a in range(3)]
                        if all(0 <= idx[a] < grid[a] for a in range(3)):
                            feat = depth[ib, i_n, k, i, j].double() * context[ib, i_n, :, i, j].double()
                            out[ib, :, idx[0], idx[1], idx[2]] += feat
    return out


def test_voxel_pooling_equals_a_naive_loop():
    torch.manual_seed(0)
    b, n, d, h, w, c = 2, 2, 3, 2, 3, 5
    grid, lower, dx = (4, 3, 2), [0.0, -1.5, 0.0], [1.0, 1.0, 0.5]
    # points in [-1.7, 4.5) x [-2.2, 2.0) x [-0.7, 1.4): some below the lower bound by less and more than one
    # voxel (kept in voxel 0 / dropped), some above the upper bound, many sharing voxels
    lo, hi = torch.tensor([-1.7, -2.2, -0.7]), torch.tensor([4.5, 2.0, 1.4])
    points = lo + (hi - lo) * torch.rand(b, n, d, h, w, 3)
    points[0, 0, 0, 0, 0] = torch.tensor([-0.5, -1.9, -0.2])  # trunc -> (0, 0, 0): kept
    points[0, 0, 0, 0, 1] = torch.tensor([-1.5, 0.0, 0.2])  # trunc(-1.5) = -1: dropped
    points[1, 1, 2, 1, 2] = torch.tensor([4.2, 0.0, 0.2])  # above x: dropped
    depth = torch.rand(b, n, d, h, w).softmax(dim=2).requires_grad_()
    context = torch.randn(b, n, c, h, w, requires_grad=True)
    index, inside = voxel_indices(points, torch.tensor(lower), torch.tensor(dx), grid)
    expected = _naive_pool(depth.detach(), context.detach(), points, lower, dx, grid)
    for chunk in (1, 1 << 20):  # one depth bin per chunk, and all at once
        volume = lift_and_pool(depth, context, index, inside, grid, chunk_elements=chunk)
        assert volume.shape == (b, c, *grid) and volume.dtype == torch.float32
        assert volume.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(volume.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(volume == 0, expected == 0)  # empty voxels exactly zero
    assert inside[0, 0, 0, 0, 0] and index[0, 0, 0, 0, 0] == 0
    assert not inside[0, 0, 0, 0, 1] and not inside[1, 1, 2, 1, 2]
    assert (expected.abs().sum(dim=1) > 0).sum() > 10  # a non-trivial case

    # gradient of <weights, volume>: each point gets <weights[voxel], context[pixel]>
    weights = torch.randn(b, c, *grid)
    (volume * weights).sum().backward()
    flat_weights = weights.permute(0, 2, 3, 4, 1).reshape(-1, c)
    expected_grad = (flat_weights[index] * context.detach().permute(0, 1, 3, 4, 2)[:, :, None]).sum(-1)
    expected_grad = torch.where(inside, expected_grad, torch.zeros(()))  # dropped points: no gradient
    torch.testing.assert_close(depth.grad, expected_grad)
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_mean_pooling_divides_each_voxel_by_its_frustum_points():
    torch.manual_seed(1)
    b, n, d, h, w, c = 1, 2, 4, 3, 3, 3
    grid = (3, 2, 2)
    points = torch.rand(b, n, d, h, w, 3) * torch.tensor([3.4, 2.0, 2.0])  # some beyond x = 3: dropped
    depth = torch.rand(b, n, d, h, w).softmax(dim=2)
    context = torch.randn(b, n, c, h, w)
    index, inside = voxel_indices(points, torch.zeros(3), torch.ones(3), grid)
    summed = lift_and_pool(depth, context, index, inside, grid)
    mean = lift_and_pool(depth, context, index, inside, grid, mean=True)
    counts = torch.bincount(index[inside], minlength=b * 3 * 2 * 2).float().view(b, *grid)  # points per voxel
    assert counts.max() > 1 and (counts == 0).sum() < counts.numel()  # shared and (maybe) empty voxels
    torch.testing.assert_close(mean, summed / counts.clamp(min=1)[:, None])
    assert torch.equal(mean == 0, summed == 0)  # the active set is unchanged


def test_pool_must_be_sum_or_mean():
    with pytest.raises(ValueError, match="view_transformer.pool must be 'sum' or 'mean'"):
        _tiny_view_transformer(pool="max")


# --------------------------------------------------------------------------------------------------
# Depth loss


def _bce_row(probs: list[float], target: int) -> float:
    return -sum(math.log(p) if j == target else math.log(1 - p) for j, p in enumerate(probs))


@pytest.mark.parametrize("fix", [False, True])
def test_depth_loss_by_hand(fix):
    # 8x8 map, stride 4 -> 2x2 patches; bins (2.0, 4.0, 0.5): D = 4, idx = (d - 1.75) / 0.5
    gt = torch.zeros(1, 1, 8, 8)
    gt[0, 0, 0, 1], gt[0, 0, 2, 3], gt[0, 0, 3, 0] = 3.1, 2.6, 0.0  # patch (0,0): min 2.6 -> idx 1.7
    gt[0, 0, 5, 2] = 2.0  # patch (1,0): idx 0.5
    gt[0, 0, 6, 6], gt[0, 0, 7, 7] = 3.9, 4.6  # patch (1,1): min 3.9 -> idx 4.3; patch (0,1) empty
    bins, valid = depth_targets(gt, downsample=4, depth_bound=(2.0, 4.0, 0.5), fix_bin_offset=fix)
    # released: bin = trunc(idx) - 1 for 1 <= idx < 5; fixed: bin = trunc(idx) for 0 <= idx < 4
    expected = {0: 0, 3: 3} if not fix else {0: 1, 2: 0}
    assert valid.tolist() == [r in expected for r in range(4)]
    assert [int(bins[r]) for r in expected] == list(expected.values())

    torch.manual_seed(0)
    probs = torch.randn(1, 4, 2, 2).softmax(dim=1)  # [B*N, D, fH, fW]
    loss = depth_bce_loss(probs, bins, valid)
    rows = probs.permute(0, 2, 3, 1).reshape(4, 4)
    hand = sum(_bce_row(rows[r].tolist(), t) for r, t in expected.items()) / len(expected)
    assert loss.item() == pytest.approx(hand, rel=1e-5)

    vt = _tiny_view_transformer(
        depth_bound=(2.0, 4.0, 0.5),
        downsample=4,
        input_size=(8, 8),
        fix_depth_bin_offset=fix,
        depth_loss_weight=2,
    )
    assert vt.depth_loss(gt, probs).item() == pytest.approx(2 * hand, rel=1e-5)


def test_depth_distance_weighting_by_hand():
    """Cells weigh their target depth over the reference, in [1, 4]; off (0), the released average."""
    # 8x8 map, stride 4 -> 2x2 patches; bins (2.0, 4.0, 0.5), fixed offset: depths 2.0, 2.5, 3.0, 3.5
    gt = torch.zeros(1, 1, 8, 8)
    gt[0, 0, 0, 0], gt[0, 0, 0, 4], gt[0, 0, 4, 0] = 2.1, 3.4, 2.6  # bins 0, 3, 1; patch (1,1) empty
    bins, valid = depth_targets(gt, downsample=4, depth_bound=(2.0, 4.0, 0.5), fix_bin_offset=True)
    assert bins.tolist()[:3] == [0, 3, 1] and valid.tolist() == [True, True, True, False]
    bin_depths = torch.tensor([2.0, 2.5, 3.0, 3.5])
    weights = depth_distance_weights(bins[:3], bin_depths, reference=0.5)  # 4.0, 7.0, 5.0 -> capped
    assert weights.tolist() == [4.0, 4.0, 4.0]
    weights = depth_distance_weights(bins[:3], bin_depths, reference=2.5)  # 0.8 -> 1, 1.4, 1.0
    assert weights.tolist() == pytest.approx([1.0, 1.4, 1.0])

    torch.manual_seed(0)
    probs = torch.randn(1, 4, 2, 2).softmax(dim=1)  # [B*N, D, fH, fW]
    rows = probs.permute(0, 2, 3, 1).reshape(4, 4)
    per_cell = [_bce_row(rows[r].tolist(), int(bins[r])) for r in range(3)]
    hand = (1.0 * per_cell[0] + 1.4 * per_cell[1] + 1.0 * per_cell[2]) / 3.4
    common = dict(depth_bound=(2.0, 4.0, 0.5), downsample=4, input_size=(8, 8), fix_depth_bin_offset=True)
    weighted = _tiny_view_transformer(**common, depth_distance_weighting=2.5, depth_loss_weight=3.0)
    assert weighted.depth_loss(gt, probs).item() == pytest.approx(3.0 * hand, rel=1e-5)
    released = _tiny_view_transformer(**common)
    assert released.depth_loss(gt, probs).item() == pytest.approx(sum(per_cell) / 3, rel=1e-5)
    # a weight of 1 everywhere is the released average; the padding cell never counts
    ones = torch.tensor([1.0, 1.0, 1.0, 9.0])
    assert depth_bce_loss(probs, bins, valid, ones).item() == pytest.approx(sum(per_cell) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="depth_distance_weighting must be >= 0"):
        _tiny_view_transformer(depth_distance_weighting=-1.0)


def test_depth_loss_without_valid_cells_is_zero():
    probs = torch.full((2, 4, 2, 2), 0.25, requires_grad=True)
    bins, valid = depth_targets(torch.zeros(1, 2, 8, 8), downsample=4, depth_bound=(2.0, 4.0, 0.5))
    loss = depth_bce_loss(probs, bins, valid)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(probs.grad, torch.zeros_like(probs))


def _axis_rays(num_rays: int, num_bins: int, y_of_ray: list[float]) -> torch.Tensor:
    """[1, 1, D, 1, R, 3] frustum points: ray r runs along x through x = 0.5, 1.5, ... at height 0.5."""
    points = torch.zeros(1, 1, num_bins, 1, num_rays, 3)
    points[..., 0] = (torch.arange(num_bins) + 0.5).view(num_bins, 1, 1)
    points[..., 1] = torch.tensor(y_of_ray).view(1, 1, num_rays)
    points[..., 2] = 0.5
    return points


def test_occupancy_depth_is_the_first_labelled_voxel_along_each_ray():
    gt_occ = torch.zeros(1, 4, 3, 1, dtype=torch.long)  # 1 m voxels over [0, 4) x [0, 3) x [0, 1)
    gt_occ[0, :, 0, 0] = torch.tensor([0, 0, 5, 7])  # ray 0: first hit in voxel x = 2
    gt_occ[0, :, 1, 0] = torch.tensor([0, 255, 3, 0])  # ray 1: meets an unknown voxel first
    # ray 2 (y = 2.5) crosses only empty voxels; ray 3 (y = 3.5) runs outside the grid
    points = _axis_rays(4, 4, [0.5, 1.5, 2.5, 3.5])
    bin_depths = torch.tensor([2.0, 2.5, 3.0, 3.5])
    depth = occupancy_depth(points, bin_depths, gt_occ, (0.0, 0.0, 0.0, 4.0, 3.0, 1.0))
    assert depth.tolist() == [3.0, NO_DEPTH, NO_DEPTH, NO_DEPTH]


@pytest.mark.parametrize("fix", [False, True])
def test_depth_from_occupancy_fills_only_cells_without_lidar(fix):
    # 8x8 input at stride 4: 2x2 cells, four rays along x; bins (2.0, 4.0, 0.5): depths 2.0 .. 3.5
    vt = _tiny_view_transformer(
        depth_bound=(2.0, 4.0, 0.5), downsample=4, input_size=(8, 8), fix_depth_bin_offset=fix,
        point_cloud_range=(0.0, 0.0, 0.0, 4.0, 4.0, 1.0), grid_size=(4, 4, 1), depth_from_occupancy=True,
    )  # fmt: skip
    points = _axis_rays(4, 4, [0.5, 1.5, 2.5, 3.5]).view(1, 1, 4, 2, 2, 3)  # cells (0,0) (0,1) (1,0) (1,1)
    gt_occ = torch.zeros(1, 4, 4, 1, dtype=torch.long)
    gt_occ[0, 3, 0, 0] = gt_occ[0, 1, 1, 0] = gt_occ[0, 2, 2, 0] = 9  # cells 0, 1, 2 hit at x = 3, 1, 2
    gt = torch.zeros(1, 1, 8, 8)
    gt[0, 0, 0, 0] = 2.6  # LiDAR in cell (0, 0) only: it wins over the occupancy depth 3.5
    torch.manual_seed(0)
    probs = torch.randn(1, 4, 2, 2).softmax(dim=1)
    rows = probs.permute(0, 2, 3, 1).reshape(4, 4)
    # depth 2.6 -> idx 1.7; occupancy 2.5 -> idx 1.5, 3.0 -> idx 2.5 (cell 3: no hit, no target)
    expected = {0: 1, 1: 1, 2: 2} if fix else {0: 0, 1: 0, 2: 1}
    hand = sum(_bce_row(rows[r].tolist(), t) for r, t in expected.items()) / len(expected)
    loss = vt.depth_loss(gt, probs, gt_occ=gt_occ, points=points)
    assert loss.item() == pytest.approx(hand, rel=1e-5)

    vt.depth_from_occupancy = False  # LiDAR alone: cell 0 only
    lidar_only = _bce_row(rows[0].tolist(), expected[0])
    loss = vt.depth_loss(gt, probs, gt_occ=gt_occ, points=points).item()
    assert loss == pytest.approx(lidar_only, rel=1e-5)
    vt.depth_from_occupancy = True
    with pytest.raises(ValueError, match="depth_from_occupancy needs gt_occ"):
        vt.depth_loss(gt, probs)


def test_semantic_loss_is_the_cross_entropy_of_each_cell_against_its_first_labelled_voxel():
    vt = _tiny_view_transformer(
        depth_bound=(2.0, 4.0, 0.5), downsample=4, input_size=(8, 8), context_channels=3,
        point_cloud_range=(0.0, 0.0, 0.0, 4.0, 4.0, 1.0), grid_size=(4, 4, 1),
        semantic_loss_weight=2.0, num_classes=10,
    )  # fmt: skip
    points = _axis_rays(4, 4, [0.5, 1.5, 2.5, 3.5]).view(1, 1, 4, 2, 2, 3)  # cells (0,0) (0,1) (1,0) (1,1)
    gt_occ = torch.zeros(1, 4, 4, 1, dtype=torch.long)
    gt_occ[0, 3, 0, 0], gt_occ[0, 1, 1, 0] = 9, 4  # cell 0 sees class 9, cell 1 class 4
    gt_occ[0, 1, 2, 0], gt_occ[0, 3, 2, 0] = 255, 7  # cell 2 meets an unknown voxel first; cell 3 nothing
    torch.manual_seed(0)
    context = torch.randn(1, 3, 2, 2)
    logits = vt.context_classifier(context).permute(0, 2, 3, 1).reshape(4, 10)  # rows = cells
    hand = (F.cross_entropy(logits[0], torch.tensor(9)) + F.cross_entropy(logits[1], torch.tensor(4))) / 2
    loss = vt.semantic_loss(context, gt_occ, points)
    assert loss.item() == pytest.approx(2.0 * hand.item(), rel=1e-5)
    loss.backward()
    assert vt.context_classifier.weight.grad.abs().sum() > 0


def test_semantic_loss_is_off_by_default_and_adds_no_parameters():
    plain = _tiny_view_transformer()
    assert plain.context_classifier is None
    with pytest.raises(RuntimeError, match="semantic_loss_weight is 0"):
        context, gt_occ = torch.zeros(1, 4, 4, 11), torch.zeros(1, 128, 128, 10)
        plain.semantic_loss(context, gt_occ, torch.zeros(1, 1, 112, 4, 11, 3))
    switched = _tiny_view_transformer(semantic_loss_weight=1.0, num_classes=17)
    extra = sum(p.numel() for p in switched.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 4 * 17 + 17  # one 1x1 conv from the context channels to the classes
    with pytest.raises(ValueError, match="semantic_loss_weight"):
        _tiny_view_transformer(semantic_loss_weight=1.0)  # no num_classes


# --------------------------------------------------------------------------------------------------
# Depth net pieces


def test_deform_conv_offsets_are_dy_dx_per_kernel_position():
    torch.manual_seed(0)
    dcn = DeformConv2d(8, 8, groups=4)
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(dcn(x), F.conv2d(x, dcn.weight, padding=1, groups=4))  # zero offsets
    with torch.no_grad():  # offset (dy, dx) = (0, 1) at every kernel position: sample one pixel to the right
        dcn.conv_offset.bias.copy_(torch.tensor([0.0, 1.0] * 9))
    # output column j reads input columns j .. j + 2 (zero outside the image)
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), dcn.weight, groups=4)
    torch.testing.assert_close(dcn(x), expected)


def test_single_sample_batchnorm_uses_running_stats_and_tracks_the_mean():
    bn = SingleSampleSafeBatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.fill_(4.0)
    x = torch.tensor([[2.0, -4.0, 6.0]])
    out = bn.train()(x)
    torch.testing.assert_close(out, x / math.sqrt(4 + 1e-5) * bn.weight.detach())
    torch.testing.assert_close(bn.running_mean, 0.1 * x[0])
    assert torch.equal(bn.running_var, torch.full((3,), 4.0)) and int(bn.num_batches_tracked) == 1
    # more than one sample: exactly torch's BatchNorm1d
    ref = torch.nn.BatchNorm1d(3)
    ref.load_state_dict(bn.state_dict())
    xs = torch.randn(4, 3)
    torch.testing.assert_close(bn(xs), ref.train()(xs))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_depth_net_trains_with_a_single_camera_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = DepthNet(in_channels=8, context_channels=4, depth_channels=6, camera_params=33).train()
    out = net(torch.randn(1, 8, 3, 5), torch.randn(1, 33))
    assert out.shape == (1, 10, 3, 5)
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_depth_net_checkpointing_is_numerically_neutral():
    torch.manual_seed(0)
    plain = DepthNet(in_channels=8, context_channels=4, depth_channels=6, camera_params=27).train()
    ckpt = DepthNet(
        in_channels=8, context_channels=4, depth_channels=6, camera_params=27, activation_checkpointing=True
    )
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    x, cam = torch.randn(2, 8, 3, 5), torch.randn(2, 27)
    results = []
    for net in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks
        out = net(x, cam)
        out.square().sum().backward()
        results.append((out, [p.grad for p in net.parameters()], net.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    for key, value in results[0][2].items():  # BN statistics updated once, as without checkpointing
        torch.testing.assert_close(results[1][2][key], value)


# --------------------------------------------------------------------------------------------------
# The module


def test_view_transformer_places_a_one_hot_depth_in_the_right_voxel():
    vt = _tiny_view_transformer().eval()
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    cams = _cams(CAM_TO_LIDAR, torch.tensor([1.0, 0.5, 1.5]), k)
    points = vt.geometry(*cams)
    index, inside = voxel_indices(points, vt.bx - vt.dx / 2, vt.dx, vt.grid_size)
    depth = torch.zeros(1, 1, 112, 4, 11)
    depth[0, 0, 16, 2, 4] = 1.0
    context = torch.zeros(1, 1, 4, 4, 11)
    context[0, 0, :, 2, 4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    volume = lift_and_pool(depth, context, index, inside, vt.grid_size)
    assert volume.shape == (1, 4, 128, 128, 10)
    assert volume[0, :, 77, 66, 6].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert int((volume != 0).sum()) == 4


def test_view_transformer_forward_shapes_and_input_checks():
    torch.manual_seed(0)
    vt = _tiny_view_transformer(camera_params=33, grid_size=(16, 16, 4)).train()
    b, n = 2, 3
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    cams = (
        CAM_TO_LIDAR.expand(b, n, 3, 3),
        torch.zeros(b, n, 3),
        k.expand(b, n, 4, 4),
        torch.eye(3).expand(b, n, 3, 3),
        torch.zeros(b, n, 3),
        torch.eye(4).expand(b, 4, 4),
    )
    feats = torch.randn(b, n, 8, 4, 11)
    volume, depth_prob = vt(feats, *cams)
    assert volume.shape == (b, 4, 16, 16, 4) and depth_prob.shape == (b * n, 112, 4, 11)
    torch.testing.assert_close(depth_prob.sum(dim=1), torch.ones(b * n, 4, 11))
    assert volume.abs().sum() > 0
    with pytest.raises(ValueError, match="bda must be"):
        vt(feats, *cams[:5], torch.eye(3).expand(b, 3, 3))
    with pytest.raises(ValueError, match="frustum"):
        vt(torch.randn(b, n, 8, 5, 11), *cams)
    with pytest.raises(ValueError, match="gt_depth"):
        vt.depth_loss(torch.zeros(b, n, 32, 32), depth_prob)


def test_teacher_forcing_mixes_the_one_hot_target_into_valid_cells_only():
    torch.manual_seed(0)
    prob = torch.randn(2, 5, 2, 3).softmax(dim=1)  # [B*N, D, fH, fW]
    bins = torch.tensor([0, 4, 2, 1, 3, 0, 1, 1, 2, 2, 4, 4])  # (camera, row, column) order
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    mixed = mix_teacher_depth(prob, bins, valid, 0.25)
    flat_prob = prob.permute(0, 2, 3, 1).reshape(12, 5)
    flat_mixed = mixed.permute(0, 2, 3, 1).reshape(12, 5)
    for m in range(12):
        expected = flat_prob[m].clone()
        if valid[m]:
            expected = 0.75 * expected
            expected[bins[m]] += 0.25
        torch.testing.assert_close(flat_mixed[m], expected)
    assert mix_teacher_depth(prob, bins, valid, 0.0) is prob


def test_fully_teacher_forced_lift_ignores_the_predicted_depth():
    torch.manual_seed(0)
    vt = _tiny_view_transformer(grid_size=(16, 16, 4)).train()
    k = _pad4(torch.tensor([[100.0, 0.0, 88.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]))
    cams = _cams(CAM_TO_LIDAR, torch.tensor([0.0, 0.0, 0.0]), k)
    feats = torch.randn(1, 1, 8, 4, 11)
    bins = torch.randint(0, vt.num_bins, (44,))
    teacher = (bins, torch.ones(44, dtype=torch.bool), 1.0)
    volume, depth_prob, context = vt(feats, *cams, with_context=True, teacher=teacher)
    onehot = F.one_hot(bins.reshape(1, 4, 11), vt.num_bins).permute(0, 3, 1, 2).float()
    index, inside = voxel_indices(vt.geometry(*cams), vt.bx - vt.dx / 2, vt.dx, vt.grid_size)
    expected = lift_and_pool(onehot[None], context[None], index, inside, vt.grid_size)
    torch.testing.assert_close(volume, expected)
    assert not torch.allclose(depth_prob, onehot)  # the prediction is returned, for the depth loss
    free, _ = vt(feats, *cams)
    assert not torch.allclose(free, volume)
