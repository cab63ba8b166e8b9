import math

import numpy as np
import pytest
import torch

from spotocc.evaluation.ray_iou import (
    NUSCENES_LIDAR_ORIGIN,
    OCC3D_PC_MIN,
    RayIoU,
    cast_rays,
    first_hits,
    lidar_origins_in_ego,
    lidar_ray_directions,
    ray_starts_and_directions,
    select_ray_origins,
)

FREE = 17
VOXEL = 0.4


# --------------------------------------------------------------------------------------------------
# brute force: one ray at a time, in plain Python floats


def brute_force_first_hit(occupied: np.ndarray, start, direction):
    """Walk the ray's whole path through the grid, voxel by voxel, then take its first occupied voxel.

    Amanatides-Woo stepping as the reference kernel does it: the next voxel is across the nearest
    boundary, ties go to z, then y. Returns (distance at which the ray leaves that voxel, voxel, hit).
    """
    size = occupied.shape
    voxel = [math.floor(c) for c in start]
    step = [1 if d >= 0 else -1 for d in direction]
    t_max = [
        ((voxel[a] + (1 if step[a] > 0 else 0)) - start[a]) / direction[a] if direction[a] != 0 else math.inf
        for a in range(3)
    ]
    t_delta = [step[a] / direction[a] if direction[a] != 0 else math.inf for a in range(3)]
    path = []
    while all(0 <= voxel[a] < size[a] for a in range(3)):
        if t_max[0] < t_max[1]:
            axis = 0 if t_max[0] < t_max[2] else 2
        else:
            axis = 1 if t_max[1] < t_max[2] else 2
        path.append((tuple(voxel), t_max[axis]))
        voxel[axis] += step[axis]
        t_max[axis] += t_delta[axis]
    for cell, leave in path:
        if occupied[cell]:
            return leave, cell, True
    return path[-1][1], path[-1][0], False


def brute_force_rays(labels: np.ndarray, origins, directions, pc_min):
    """(label, depth in float32 metres) of every ray, origin-major, one ray at a time."""
    start, direction = ray_starts_and_directions(
        torch.as_tensor(origins, dtype=torch.float64), torch.as_tensor(directions), pc_min, VOXEL
    )
    out_label, out_depth = [], []
    for s, d in zip(start.tolist(), direction.tolist()):
        leave, cell, _ = brute_force_first_hit(labels != FREE, s, d)
        out_label.append(int(labels[cell]))
        out_depth.append(np.float32(leave) * np.float32(VOXEL))
    return np.array(out_label), np.array(out_depth, dtype=np.float32)


def brute_force_counts(pred_rays, gt_rays, thresholds=(1, 2, 4)):
    """The reference's per-class counts, ray by ray."""
    gt_count, pred_count, tp = [0] * 18, [0] * 18, [[0] * 18 for _ in thresholds]
    for pl, pd, gl, gd in zip(*pred_rays, *gt_rays):
        if gl == FREE:
            continue
        gt_count[gl] += 1
        pred_count[pl] += 1
        for j, t in enumerate(thresholds):
            if pl == gl and abs(pd - gd) < t:
                tp[j][gl] += 1
    return np.array(gt_count), np.array(pred_count), np.array(tp)


def random_scene(seed, shape=(9, 8, 5)):
    rng = np.random.default_rng(seed)
    gt = np.full(shape, FREE, dtype=np.uint8)
    solid = rng.random(shape) < 0.12
    gt[solid] = rng.integers(0, FREE, size=int(solid.sum()))
    pred = gt.copy()
    flip = rng.random(shape) < 0.1
    pred[flip] = rng.integers(0, 18, size=int(flip.sum()))
    return pred, gt


def random_origins(rng, shape, pc_min, count):
    extent = np.array(shape) * VOXEL
    origins = np.array(pc_min) + rng.random((count, 3)) * extent * 0.98 + 0.01 * extent
    # one origin exactly at a voxel centre, where the diagonal rays below tie at every corner
    origins[0] = np.array(pc_min) + (np.array(shape) // 2 + 0.5) * VOXEL
    return origins


def test_directions():
    directions = lidar_ray_directions()
    assert directions.shape == (39 * 360, 3) and directions.dtype == torch.float32
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(39 * 360), rtol=0, atol=1e-6)
    pitch = torch.asin(directions[::360, 2].double())
    assert pitch[0].item() == pytest.approx(-math.pi / 4, abs=1e-6)
    assert pitch[9].item() == pytest.approx(-(math.pi / 2 - math.atan(10)), abs=1e-6)
    assert pitch[-2].item() < 0.21 <= pitch[-1].item()
    # azimuth 0 points along +x, azimuth 90 degrees along +y
    assert directions[0, 1].item() == 0.0 and directions[0, 0].item() > 0
    assert directions[90, 0].abs().item() < 1e-6 and directions[90, 1].item() > 0


# --------------------------------------------------------------------------------------------------
# vectorised traversal == brute force, exactly


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_hits_equal_brute_force_exactly(seed):
    rng = np.random.default_rng(seed)
    shape = (7 + seed, 6, 4 + seed % 2)
    occupied = rng.random(shape) < 0.08
    starts = rng.random((300, 3)) * np.array(shape)
    directions = rng.normal(size=(300, 3))
    s2, s3 = math.sqrt(0.5), 1 / math.sqrt(3)
    special = [(1, 0, 0), (0, -1, 0), (0, 0, 1), (s2, s2, 0), (-s2, 0, s2), (s3, -s3, s3), (0.0, -s2, -s2)]
    directions[: len(special)] = special
    starts[: len(special)] = np.array(shape) // 2 + 0.5  # exact ties at every voxel corner
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    directions[: len(special)] = special
    start_t, dir_t = torch.from_numpy(starts), torch.from_numpy(directions)
    distance, voxel, hit = first_hits(
        torch.from_numpy(occupied)[None], torch.zeros(300, dtype=torch.long), start_t, dir_t
    )
    for i in range(300):
        leave, cell, was_hit = brute_force_first_hit(occupied, starts[i].tolist(), directions[i].tolist())
        assert distance[i].item() == leave, i
        assert tuple(voxel[i].tolist()) == cell, i
        assert bool(hit[i]) == was_hit, i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ray_iou_equals_brute_force_on_random_scenes(seed):
    rng = np.random.default_rng(100 + seed)
    pc_min = (-1.6, -2.0, -0.4)
    batch = [random_scene(10 * seed + k, shape=(9, 8, 5)) for k in range(2)]
    origins = [random_origins(rng, (9, 8, 5), pc_min, 3 - k) for k in range(2)]
    directions = lidar_ray_directions()[::37]  # 380 of the reference rays, every pitch
    metric = RayIoU(pc_min=pc_min, directions=directions)
    pred = np.stack([p for p, _ in batch])
    gt = np.stack([g for _, g in batch])
    metric.update(pred, gt, [torch.from_numpy(o) for o in origins])

    gt_count, pred_count, tp = np.zeros(18, int), np.zeros(18, int), np.zeros((3, 18), int)
    for (p, g), o in zip(batch, origins):
        pred_rays = brute_force_rays(p, o, directions, pc_min)
        gt_rays = brute_force_rays(g, o, directions, pc_min)
        vectorised = cast_rays(
            torch.from_numpy(np.stack([p, g])).long(), [torch.from_numpy(o)] * 2, directions, FREE, pc_min
        )
        n = len(pred_rays[0])
        np.testing.assert_array_equal(vectorised[0][:n].numpy(), pred_rays[0])
        np.testing.assert_array_equal(vectorised[1][:n].numpy(), pred_rays[1])
        np.testing.assert_array_equal(vectorised[0][n:].numpy(), gt_rays[0])
        np.testing.assert_array_equal(vectorised[1][n:].numpy(), gt_rays[1])
        counts = brute_force_counts(pred_rays, gt_rays)
        gt_count, pred_count, tp = gt_count + counts[0], pred_count + counts[1], tp + counts[2]
    np.testing.assert_array_equal(metric.gt_count, gt_count)
    np.testing.assert_array_equal(metric.pred_count, pred_count)
    np.testing.assert_array_equal(metric.tp_count, tp)
    assert gt_count.sum() > 100 and 0 < tp[0].sum() < gt_count.sum()  # the scene tests something

    with np.errstate(invalid="ignore", divide="ignore"):
        iou = (tp / (gt_count + pred_count - tp))[:, :FREE]
    results = metric.compute()
    for j, t in enumerate((1, 2, 4)):
        assert results[f"RayIoU@{t}"] == round(100 * np.nanmean(iou[j]), 2)
        assert results[f"car_RayIoU@{t}"] == pytest.approx(round(100 * iou[j, 4], 2), nan_ok=True)
    assert results["RayIoU"] == round(100 * np.nanmean(iou), 2)
    assert results["ray_samples"] == 2 and results["ray_origins_per_sample"] == 2.5


def test_batch_equals_one_sample_at_a_time():
    pc_min = (-1.6, -2.0, -0.4)
    directions = lidar_ray_directions()[::53]
    rng = np.random.default_rng(4)
    scenes = [random_scene(k) for k in range(3)]
    origins = torch.from_numpy(np.stack([random_origins(rng, (9, 8, 5), pc_min, 2) for _ in range(3)]))
    together = RayIoU(pc_min=pc_min, directions=directions)
    together.update(
        torch.from_numpy(np.stack([p for p, _ in scenes])), np.stack([g for _, g in scenes]), origins
    )
    apart = RayIoU(pc_min=pc_min, directions=directions)
    for (p, g), o in zip(scenes, origins):
        apart.update(p, torch.from_numpy(g), o)
    np.testing.assert_array_equal(together.counts_tensor().numpy(), apart.counts_tensor().numpy())
    restored = RayIoU(pc_min=pc_min, directions=directions)
    restored.load_counts_tensor(together.counts_tensor())
    assert restored.compute() == pytest.approx(together.compute(), nan_ok=True)


# --------------------------------------------------------------------------------------------------
# hand-built scenes on the Occ3D grid


def empty_grid():
    return np.full((200, 200, 16), FREE, dtype=np.uint8)


def centre(i, j, k):
    """Metres of a voxel centre on the Occ3D grid."""
    return [
        OCC3D_PC_MIN[0] + (i + 0.5) * VOXEL,
        OCC3D_PC_MIN[1] + (j + 0.5) * VOXEL,
        OCC3D_PC_MIN[2] + (k + 0.5) * VOXEL,
    ]


def test_wall_at_a_known_depth():
    gt = empty_grid()
    gt[150] = 15  # manmade wall, x in [20.0, 20.4) m
    origin = torch.tensor([[1.0, 0.2, 2.0]], dtype=torch.float64)
    directions = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0]])
    label, depth = cast_rays(torch.from_numpy(gt)[None].long(), [origin], directions, FREE)
    assert label.tolist() == [15, FREE, FREE]
    # the depth is where the ray leaves the wall voxel: 20.4 - 1.0; the misses leave the grid
    torch.testing.assert_close(depth, torch.tensor([19.4, 41.0, 39.8]), rtol=0, atol=1e-4)

    def score(shift):
        pred = empty_grid()
        pred[150 + shift] = 15
        metric = RayIoU(directions=directions)
        metric.update(pred, gt, origin)
        return metric.compute()

    assert score(0)["RayIoU"] == 100.0
    near = score(2)  # 0.8 m too far: inside every threshold
    assert (near["RayIoU@1"], near["RayIoU@2"], near["RayIoU@4"]) == (100.0, 100.0, 100.0)
    far = score(4)  # 1.6 m too far: outside 1 m, inside 2 m and 4 m
    assert (far["RayIoU@1"], far["RayIoU@2"], far["RayIoU@4"]) == (0.0, 100.0, 100.0)
    assert far["RayIoU"] == 66.67 and far["manmade_RayIoU@1"] == 0.0
    assert math.isnan(far["car_RayIoU@1"])  # in no ray: left out of the mean
    # only the +x ray hits anything in the GT; the other two count for nothing, whatever is predicted
    metric = RayIoU(directions=directions)
    pred = gt.copy()
    pred[:, 190] = 4  # cars at y = 36 m: the +y ray meets them, but its GT ray leaves the grid
    metric.update(pred, gt, origin)
    assert metric.gt_count.sum() == 1 and metric.pred_count[4] == 0


def test_a_depth_error_of_exactly_the_threshold_is_a_miss():
    # 0.5 m voxels and an origin at a voxel centre: every distance is exact in float32
    gt = np.full((12, 2, 2), FREE, dtype=np.uint8)
    gt[3] = 15  # the +x ray leaves it at x = 2.0 m: depth 1.75 m
    pred = np.full_like(gt, FREE)
    pred[7] = 15  # depth 3.75 m: off by exactly 2 m
    metric = RayIoU(pc_min=(0.0, 0.0, 0.0), voxel_size=0.5, directions=torch.tensor([[1.0, 0, 0]]))
    metric.update(pred, gt, np.array([[0.25, 0.25, 0.25]]))
    r = metric.compute()
    assert (r["RayIoU@1"], r["RayIoU@2"], r["RayIoU@4"]) == (0.0, 0.0, 100.0)


def test_thin_object_that_one_ray_misses():
    scene = empty_grid()
    scene[150] = 15  # wall behind
    gt = scene.copy()
    gt[125, 100, 7] = 8  # a traffic cone, one voxel: x [10.0, 10.4), y [0.0, 0.4), z [1.8, 2.2)
    origin = torch.tensor([centre(102, 100, 7)], dtype=torch.float64)  # (1.0, 0.2, 2.0) m
    # the second ray has slope 0.05 in y: it passes the cone at y = 0.65 .. 0.67 m, beside it, and
    # leaves the wall voxel across x = 20.4 (y = 1.17 there, short of the boundary at 1.2)
    slope = 0.05
    directions = torch.tensor([[1.0, 0, 0], [1 / math.hypot(1, slope), slope / math.hypot(1, slope), 0]])
    label, depth = cast_rays(torch.from_numpy(gt)[None].long(), [origin], directions, FREE)
    assert label.tolist() == [8, 15]
    torch.testing.assert_close(depth, torch.tensor([9.4, 19.4 * math.hypot(1, slope)]), rtol=0, atol=1e-4)

    metric = RayIoU(directions=directions)
    metric.update(scene, gt, origin)  # the prediction misses the cone
    r = metric.compute()
    # ray 1: GT cone at 9.4 m, predicted wall at 19.4 m; ray 2: wall on both, same depth
    assert metric.gt_count[8] == 1 and metric.gt_count[15] == 1 and metric.pred_count[15] == 2
    assert r["traffic_cone_RayIoU@4"] == 0.0 and r["manmade_RayIoU@1"] == 50.0
    assert r["RayIoU"] == 25.0
    # the brute force agrees on both rays
    assert brute_force_rays(gt, origin.numpy(), directions, OCC3D_PC_MIN)[0].tolist() == [8, 15]


def test_tie_at_a_voxel_corner_goes_to_y_first():
    # from a voxel centre along the x-y diagonal the ray crosses voxel corners exactly; the
    # reference steps y before x there, so it passes a voxel that sits diagonally ahead in x
    occupied = torch.zeros(1, 6, 6, 3, dtype=torch.bool)
    occupied[0, 3, 2, 1] = True  # beside the diagonal, across the x boundary
    s = math.sqrt(0.5)
    start = torch.tensor([[2.5, 2.5, 1.5]], dtype=torch.float64)
    direction = torch.tensor([[s, s, 0.0]], dtype=torch.float64)
    distance, voxel, hit = first_hits(occupied, torch.zeros(1, dtype=torch.long), start, direction)
    assert not bool(hit[0])
    occupied[0, 2, 3, 1] = True  # across the y boundary: on the path
    distance, voxel, hit = first_hits(occupied, torch.zeros(1, dtype=torch.long), start, direction)
    assert bool(hit[0]) and voxel[0].tolist() == [2, 3, 1]
    # the ray only touches (2, 3, 1) at the corner (3, 3): it enters and leaves it 0.5 / s along
    assert distance[0].item() == 0.5 / s


# --------------------------------------------------------------------------------------------------
# origins


def test_origins_in_ego_and_their_selection():
    ego = np.eye(4)
    ego[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about z
    ego[:3, 3] = [100, 50, 0]
    lidar = np.stack([np.eye(4)] * 2)
    lidar[0, :3, 3] = [100.9, 50.0, 1.8]  # 0.9 m ahead of the ego along its +y ... in global x
    lidar[1, :3, 3] = [100.0, 55.0, 1.8]
    origins = lidar_origins_in_ego(ego, lidar)
    torch.testing.assert_close(
        origins, torch.tensor([[0.0, -0.9, 1.8], [5.0, 0.0, 1.8]], dtype=torch.float64)
    )

    frames = torch.zeros(23, 3, dtype=torch.float64)
    frames[:, 0] = torch.arange(23) * 3.0 - 30  # -30 .. 36 m, all within 39 m
    frames[:, 2] = 1.8
    frames[0, 1] = 39.0  # |y| >= 39: dropped
    frames[1, 2] = -1.5  # below the grid: dropped (the reference would keep it)
    chosen = select_ray_origins(frames)
    kept = frames[2:]  # 21 origins -> round(linspace(0, 20, 8)) = 0, 3, 6, 9, 11, 14, 17, 20
    torch.testing.assert_close(chosen, kept[[0, 3, 6, 9, 11, 14, 17, 20]])
    assert select_ray_origins(frames[5:8]).shape == (3, 3)


def test_missing_origins_fall_back_to_the_sample_lidar_and_say_so():
    gt = empty_grid()
    gt[150] = 15
    directions = torch.tensor([[1.0, 0, 0]])
    metric = RayIoU(directions=directions)
    metric.update(gt, gt, None)
    explicit = RayIoU(directions=directions)
    explicit.update(gt, gt, torch.tensor([NUSCENES_LIDAR_ORIGIN]))
    assert metric.compute() == pytest.approx(explicit.compute(), nan_ok=True)
    r = metric.compute()
    assert r["ray_samples_single_origin"] == 1 and r["ray_origins_per_sample"] == 1
    assert r["RayIoU"] == 100.0


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("pred", "gt", "origins", "message"),
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 3), int), None, "one shape"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), None, r"\[X, Y, Z\]"),
        (np.full((4, 4, 4), 18), np.zeros((4, 4, 4), int), None, r"pred labels must lie in 0..17"),
        (np.zeros((4, 4, 4), int), np.full((4, 4, 4), 255), None, r"gt labels must lie in 0..17"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), np.zeros((2, 2)), r"\[T, 3\]"),
        (
            np.zeros((2, 4, 4, 4), int),
            np.zeros((2, 4, 4, 4), int),
            [np.full((1, 3), 0.5)],
            "1 origin sets for a batch of 2",
        ),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), np.array([[0.5, 0.5, 9.0]]), "outside the grid"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(pred, gt, origins, message):
    metric = RayIoU(pc_min=(0.0, 0.0, 0.0), directions=torch.tensor([[1.0, 0, 0]]))
    with pytest.raises(ValueError, match=message):
        metric.update(pred, gt, origins)


def test_float_labels_are_refused():
    with pytest.raises(TypeError, match="integer"):
        RayIoU().update(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), int))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_counts():
    pc_min = (-1.6, -2.0, -0.4)
    rng = np.random.default_rng(9)
    pred, gt = random_scene(9)
    origins = torch.from_numpy(random_origins(rng, (9, 8, 5), pc_min, 3))
    cpu = RayIoU(pc_min=pc_min)
    cpu.update(pred, gt, origins)
    gpu = RayIoU(pc_min=pc_min)
    gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(gt).cuda(), origins.cuda())
    np.testing.assert_array_equal(cpu.counts_tensor().numpy(), gpu.counts_tensor().numpy())
