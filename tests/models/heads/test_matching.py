import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from spotocc.models.heads.matching import (
    VoxelGroups,
    classification_cost,
    exponential_race,
    hungarian_match,
    importance_sample_points,
    mask_bce_cost,
    mask_dice_cost,
    point_sample_3d,
    sample_without_replacement,
    voxel_coords,
)
from spotocc.models.heads.targets import occupancy_to_class_masks


def _grid(shape, class_sizes, num_ignore, seed=0):
    """A uint8 grid with exactly ``class_sizes[c]`` voxels of class c and ``num_ignore`` 255s, shuffled."""
    values = [c for c, n in enumerate(class_sizes) for _ in range(n)] + [255] * num_ignore
    assert len(values) == math.prod(shape)
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(values, dtype=torch.uint8)[perm].view(shape)


# --------------------------------------------------------------------------------------------------
# Hungarian matching


def _brute_force_min_cost(cost):
    num_queries, num_gts = cost.shape
    return min(
        sum(float(cost[q, g]) for g, q in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_gts)
    )


@pytest.mark.parametrize("num_queries,num_gts", [(1, 1), (3, 2), (4, 4), (6, 3), (7, 5)])
def test_hungarian_match_is_optimal_against_brute_force(num_queries, num_gts):
    gen = torch.Generator().manual_seed(10 * num_queries + num_gts)
    for _ in range(4):
        cost = torch.randn(num_queries, num_gts, generator=gen)
        query, gt = hungarian_match(cost)
        assert query.dtype == gt.dtype == torch.long
        assert sorted(gt.tolist()) == list(range(num_gts))  # every GT exactly once
        assert query.tolist() == sorted(set(query.tolist()))  # distinct queries, ascending
        assert float(cost[query, gt].sum()) == pytest.approx(_brute_force_min_cost(cost), abs=1e-5)


def test_hungarian_match_rejects_non_finite_costs():
    with pytest.raises(ValueError, match="non-finite"):
        hungarian_match(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


# --------------------------------------------------------------------------------------------------
# Match costs against hand computations


def test_classification_cost_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = torch.tensor([1, 0])
    cost = classification_cost(logits, labels, weight=2.0)
    for q in range(2):
        norm = sum(math.exp(v) for v in logits[q].tolist())
        for g, label in enumerate(labels.tolist()):
            assert float(cost[q, g]) == pytest.approx(
                -2.0 * math.exp(float(logits[q, label])) / norm, rel=1e-6
            )


def _softplus(x):
    return math.log1p(math.exp(x))


def test_mask_bce_cost_by_hand():
    logits = torch.tensor(
        [[0.3, -1.2, 2.0, 0.0, -0.4], [1.5, 0.2, -2.5, 0.7, 3.0], [-0.1, 0.0, 0.1, -3.0, 1.0]]
    )
    targets = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    cost = mask_bce_cost(logits, targets, weight=5.0)
    assert cost.shape == (3, 2)
    for q in range(3):
        for g in range(2):
            bce = [
                _softplus(-x) if t else _softplus(x) for x, t in zip(logits[q].tolist(), targets[g].tolist())
            ]  # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
            assert float(cost[q, g]) == pytest.approx(5.0 * sum(bce) / 5, rel=1e-5)


def test_mask_dice_cost_by_hand():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0], [1.5, 0.2, -2.5, 0.7]])
    targets = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    cost = mask_dice_cost(logits, targets, weight=5.0, eps=1.0)
    for q in range(2):
        probs = [1.0 / (1.0 + math.exp(-x)) for x in logits[q].tolist()]
        for g in range(3):
            t = [float(v) for v in targets[g].tolist()]
            dice = (2 * sum(p * v for p, v in zip(probs, t)) + 1.0) / (sum(probs) + sum(t) + 1.0)
            assert float(cost[q, g]) == pytest.approx(5.0 * (1.0 - dice), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Voxel groups


def test_voxel_groups_partition_the_grid_by_class():
    gt = _grid((4, 5, 3), class_sizes=[23, 0, 11, 9, 7], num_ignore=10)
    gt.view(-1)[:3] = 7  # >= num_classes: grouped with the ignored voxels
    groups = VoxelGroups.from_occupancy(gt, num_classes=5)
    labels, _ = occupancy_to_class_masks(gt, num_classes=5)
    assert torch.equal(groups.present_classes(), labels)
    flat = gt.reshape(-1).long()
    offsets = groups.offsets.tolist()
    for g in range(6):
        members = groups.order[offsets[g] : offsets[g + 1]]
        assert members.tolist() == sorted(members.tolist())
        if g < 5:
            assert bool((flat[members] == g).all()) and len(members) == int((flat == g).sum())
        else:
            assert bool((flat[members] >= 5).all()) and len(members) == int((flat >= 5).sum())
        assert groups.counts[g] == len(members)
    assert sorted(groups.order.tolist()) == list(range(60))


def test_voxel_groups_reject_bad_grids():
    with pytest.raises(ValueError, match="integer"):
        VoxelGroups.from_occupancy(torch.zeros(2, 2, 2), num_classes=3)
    with pytest.raises(ValueError, match="negative"):
        VoxelGroups.from_occupancy(torch.full((2, 2, 2), -1), num_classes=3)
    with pytest.raises(ValueError, match="X, Y, Z"):
        VoxelGroups.from_occupancy(torch.zeros(2, 2, dtype=torch.uint8), num_classes=3)


# --------------------------------------------------------------------------------------------------
# Sampling without replacement


def _class_rows(groups, class_weights, num_rows):
    return groups.class_weight_rows(torch.tensor(class_weights, dtype=torch.float64), num_rows)


@pytest.mark.parametrize("num_samples", [1, 7, 60, 99, 100, 101, 110, 120])
def test_sampling_is_distinct_and_skips_zero_weight_voxels_while_positive_ones_remain(num_samples):
    # 100 labelled voxels (class 3 has weight 0, so 85 positive ones) and 20 ignored ones.
    gt = _grid((6, 5, 4), class_sizes=[40, 30, 15, 15], num_ignore=20)
    groups = VoxelGroups.from_occupancy(gt, num_classes=4)
    weights = _class_rows(groups, [1.0, 2.0, 5.0, 0.0], num_rows=3)
    points = sample_without_replacement(
        groups, weights, num_samples, generator=torch.Generator().manual_seed(1)
    )
    assert points.shape == (3, num_samples) and points.dtype == torch.long
    labels = gt.reshape(-1)[points].long()  # [3, k]
    positive = (labels < 3).sum(1)
    for row in points.tolist():
        assert len(set(row)) == num_samples
    if num_samples <= 85:
        assert positive.tolist() == [num_samples] * 3  # neither 255 nor the zero-weight class
    else:
        assert positive.tolist() == [85] * 3  # all positive voxels, then a fill from the others


def test_single_class_rows_take_their_class_first_then_fill_with_anything_else():
    gt = _grid((6, 5, 4), class_sizes=[40, 30, 15, 15], num_ignore=20)
    groups = VoxelGroups.from_occupancy(gt, num_classes=4)
    rows = groups.single_class_rows(torch.tensor([1.0, 2.0, 5.0, 3.0]), torch.tensor([2, 2, 0]))
    assert rows.tolist() == [[0, 0, 5, 0, 0], [0, 0, 5, 0, 0], [1, 0, 0, 0, 0]]
    points = sample_without_replacement(groups, rows, 30, generator=torch.Generator().manual_seed(2))
    labels = gt.reshape(-1)[points].long()
    assert (labels[:2] == 2).sum(1).tolist() == [15, 15]  # the whole class, then 15 other voxels
    assert bool((labels[2] == 0).all())
    fill = labels[:2][labels[:2] != 2]
    assert len(set(fill.tolist())) > 1  # other classes and/or 255: arbitrary outside voxels


def test_sampling_is_reproducible_with_a_generator():
    gt = _grid((6, 5, 4), class_sizes=[40, 30, 15, 15], num_ignore=20)
    groups = VoxelGroups.from_occupancy(gt, num_classes=4)
    weights = _class_rows(groups, [1.0, 2.0, 5.0, 3.0], num_rows=2)

    def draw(seed):
        return sample_without_replacement(groups, weights, 40, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_sampling_rejects_bad_requests():
    groups = VoxelGroups.from_occupancy(_grid((2, 2, 2), [4, 4], 0), num_classes=2)
    with pytest.raises(ValueError, match="distinct voxels"):
        sample_without_replacement(groups, _class_rows(groups, [1.0, 1.0], 1), 9)
    with pytest.raises(ValueError, match="non-negative"):
        sample_without_replacement(groups, _class_rows(groups, [1.0, -1.0], 1), 2)
    with pytest.raises(ValueError, match="group_weights"):
        sample_without_replacement(groups, torch.ones(1, 2), 2)


def test_exponential_race_fills_with_zero_weight_entries_only_at_the_end():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 3.0]]).expand(50, -1)
    drawn = exponential_race(weights, 5, generator=torch.Generator().manual_seed(0))
    for row in drawn.tolist():
        assert len(set(row)) == 5
        assert set(row[:3]) == {1, 3, 5}  # positive keys always beat the zero-weight fill
    fill = {row[3] for row in drawn.tolist()}
    assert fill == {0, 2, 4}  # uniform among zero-weight entries: each one shows up


@pytest.mark.parametrize("num_samples", [4, 33, 38])
def test_sampling_has_the_law_of_the_exponential_race(num_samples):
    # 4: first distinct draws; 33 of 35 positive voxels: explicit race; 38: all 35, then 3 of the 5 255s.
    gt = _grid((5, 4, 2), class_sizes=[20, 10, 5], num_ignore=5)
    groups = VoxelGroups.from_occupancy(gt, num_classes=3)
    class_weights = [1.0, 3.0, 9.0]
    num_rows = 2000
    ours = sample_without_replacement(
        groups,
        _class_rows(groups, class_weights, num_rows),
        num_samples,
        generator=torch.Generator().manual_seed(5),
    )
    voxel_weights = torch.tensor([class_weights[v] if v < 3 else 0.0 for v in gt.reshape(-1).tolist()])
    reference = exponential_race(
        voxel_weights.expand(num_rows, -1), num_samples, generator=torch.Generator().manual_seed(6)
    )

    def inclusion(draws):
        hits = torch.zeros(num_rows, 40)
        hits.scatter_(1, draws, 1.0)
        return hits.mean(0)

    ours_p, reference_p = inclusion(ours), inclusion(reference)
    tolerance = 4.5 * torch.sqrt(2 * reference_p * (1 - reference_p) / num_rows) + 0.01  # ~4.5 sigma
    assert bool(((ours_p - reference_p).abs() <= tolerance).all())
    if num_samples == 4:
        assert float(inclusion(ours)[gt.reshape(-1) == 2].mean()) > 3 * float(
            inclusion(ours)[gt.reshape(-1) == 0].mean()
        )


# --------------------------------------------------------------------------------------------------
# Coordinates and trilinear sampling


def test_voxel_coords_unravel_row_major_and_normalise_per_axis():
    shape = (4, 3, 5)
    index = torch.arange(60)
    coords = voxel_coords(index, shape)
    i, j, k = torch.meshgrid(torch.arange(4), torch.arange(3), torch.arange(5), indexing="ij")
    expected = torch.stack([i.flatten() / 3, j.flatten() / 2, k.flatten() / 4], dim=-1)
    assert torch.allclose(coords, expected)
    assert voxel_coords(torch.tensor([0, 1]), (1, 1, 2)).tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_point_sample_3d_reads_the_right_low_res_location():
    # Logits that are a known linear function of the low-res position; trilinear sampling is exact on it.
    low = (3, 4, 2)
    gt_shape = (5, 7, 3)
    x0, y0, z0 = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in low), indexing="ij")
    volume = torch.stack([100 * x0 + 10 * y0 + z0 + 0.5, -x0 + 2 * z0])[None]  # [1, 2, 3, 4, 2]
    index = torch.arange(math.prod(gt_shape))
    samples = point_sample_3d(volume, voxel_coords(index, gt_shape)[None])  # [1, 2, P]
    i, j, k = (
        c.flatten().float() for c in torch.meshgrid(*(torch.arange(s) for s in gt_shape), indexing="ij")
    )
    x, y, z = i * 2 / 4, j * 3 / 6, k * 1 / 2  # GT voxel -> low-res position (align_corners=True)
    assert torch.allclose(samples[0, 0], 100 * x + 10 * y + z + 0.5, atol=1e-4)
    assert torch.allclose(samples[0, 1], -x + 2 * z, atol=1e-5)


def test_point_sample_3d_matches_trilinear_upsampling_per_row():
    volume = torch.randn(2, 3, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    gt_shape = (7, 9, 5)
    coords = voxel_coords(torch.arange(math.prod(gt_shape)), gt_shape)[None].expand(2, -1, -1)
    samples = point_sample_3d(volume, coords)  # [2, 3, P]
    upsampled = F.interpolate(volume, size=gt_shape, mode="trilinear", align_corners=True).flatten(2)
    assert torch.allclose(samples, upsampled, atol=1e-5)
    same_size = point_sample_3d(volume, voxel_coords(torch.arange(60), (4, 5, 3))[None].expand(2, -1, -1))
    assert torch.allclose(same_size, volume.flatten(2), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Importance sampling


def _importance(groups, logits, candidate_weights, random_weights, **kw):
    return importance_sample_points(
        groups, logits, candidate_weights, random_weights, generator=torch.Generator().manual_seed(0), **kw
    )


@pytest.mark.parametrize("low_res", [True, False])
def test_importance_sampling_keeps_exactly_the_most_uncertain_candidates(low_res):
    # 144 labelled voxels and 3 * 48 = 144 candidates: the candidates are every labelled voxel.
    gt_shape = (6, 6, 5)
    gt = _grid(gt_shape, class_sizes=[60, 50, 34], num_ignore=36)
    groups = VoxelGroups.from_occupancy(gt, num_classes=3)
    logits = torch.randn(2, *((3, 3, 2) if low_res else gt_shape), generator=torch.Generator().manual_seed(1))
    weights = _class_rows(groups, [1.0, 2.0, 4.0], 2)
    uniform = _class_rows(groups, [1.0, 1.0, 1.0], 2)
    points = _importance(
        groups, logits, weights, uniform, num_points=48, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    assert points.shape == (2, 48)
    labelled = torch.nonzero(gt.reshape(-1) < 3).flatten()
    if low_res:
        values = point_sample_3d(logits[:, None], voxel_coords(labelled, gt_shape)[None].expand(2, -1, -1))[
            :, 0
        ]
    else:
        values = logits.flatten(1)[:, labelled]
    for row in range(2):
        most_uncertain = labelled[values[row].abs().argsort()[:36]]
        assert set(points[row, :36].tolist()) == set(most_uncertain.tolist())
        random = points[row, 36:].tolist()
        assert len(set(random)) == 12 and all(int(gt.reshape(-1)[v]) < 3 for v in random)


def test_importance_sampling_of_a_small_class_fills_with_outside_voxels():
    # The released DN sampling: candidates come from one GT's own mask only; a small mask runs out.
    gt = _grid((6, 6, 5), class_sizes=[100, 50, 10], num_ignore=20)
    groups = VoxelGroups.from_occupancy(gt, num_classes=3)
    rows = groups.single_class_rows(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2]))
    uniform = groups.single_class_rows(torch.ones(3), torch.tensor([2]))
    points = _importance(
        groups,
        torch.zeros(1, 3, 3, 3),
        rows,
        uniform,
        num_points=30,
        oversample_ratio=1.0,
        importance_sample_ratio=1.0,
    )
    labels = gt.reshape(-1)[points[0]].long()
    assert len(set(points[0].tolist())) == 30
    assert int((labels == 2).sum()) == 10  # the whole mask, then 20 outside voxels (target 0)
