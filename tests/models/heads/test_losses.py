import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from spotocc.config import HeadConfig
from spotocc.data.classes import NUSCENES_OCC_FREQUENCIES, cross_entropy_class_weights
from spotocc.models.heads.losses import (
    MaskSetCriterion,
    naive_dice_loss,
    weighted_bce_loss,
    weighted_cross_entropy,
)

NUM_CLASSES = 4
FREQUENCIES = (5.0e8, 3.0e6, 2.0e5, 7.0e4)
CLASS_WEIGHT = cross_entropy_class_weights(FREQUENCIES, 0.1)  # [C + 1]
GT_SHAPE = (4, 4, 3)  # 48 voxels
LOW_SHAPE = (2, 3, 2)


def _criterion(num_points, **kw):
    return MaskSetCriterion(
        num_classes=NUM_CLASSES, class_frequencies=FREQUENCIES, num_points=num_points, **kw
    )


def _full_coverage_criterion(num_points):
    """Every labelled voxel is a point of matching and of the losses: results are hand-computable."""
    return _criterion(num_points, oversample_ratio=1.0, importance_sample_ratio=1.0)


def _grid(class_sizes, num_ignore=0, seed=0):
    values = [c for c, n in enumerate(class_sizes) for _ in range(n)] + [255] * num_ignore
    assert len(values) == math.prod(GT_SHAPE)
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(values, dtype=torch.uint8)[perm].view(GT_SHAPE)


def _logits(batch, num_queries, seed, num_stages=1):
    gen = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, num_queries, NUM_CLASSES + 1, generator=gen) for _ in range(num_stages)]
    mask = [3 * torch.randn(batch, num_queries, *LOW_SHAPE, generator=gen) for _ in range(num_stages)]
    return cls, mask


# --------------------------------------------------------------------------------------------------
# Independent oracle: float64, trilinear upsampling to GT size, brute-force assignment


def _upsampled(mask_b):
    return F.interpolate(mask_b[None].double(), size=GT_SHAPE, mode="trilinear", align_corners=True)[
        0
    ].flatten(1)


def _oracle_rows(cls_b, mask_b, gt_b):
    """Matched (query, label) pairs of one sample with every labelled voxel as a point."""
    flat = gt_b.reshape(-1).long()
    labelled = flat < NUM_CLASSES
    labels = sorted(set(flat[labelled].tolist()))
    x = _upsampled(mask_b)[:, labelled]  # [Q, n]
    probs = cls_b.double().softmax(-1)
    cost = torch.zeros(len(cls_b), len(labels), dtype=torch.float64)
    for g, label in enumerate(labels):
        t = (flat[labelled] == label).double()
        bce = (F.softplus(-x) * t + F.softplus(x) * (1 - t)).mean(1)
        s = x.sigmoid()
        dice = 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum() + 1)
        cost[:, g] = -2 * probs[:, label] + 5 * bce + 5 * dice
    best = min(
        itertools.permutations(range(len(cls_b)), len(labels)),
        key=lambda queries: sum(float(cost[q, g]) for g, q in enumerate(queries)),
    )
    return sorted(zip(best, labels))


def _oracle_point_losses(rows):
    """rows: (upsampled logits over the points [n], targets [n], class weight); every row has n points."""
    weights = torch.tensor([w for _, _, w in rows], dtype=torch.float64)
    bce = torch.stack([F.binary_cross_entropy_with_logits(x, t, reduction="sum") for x, t, _ in rows])
    dice = torch.stack(
        [1 - (2 * (x.sigmoid() * t).sum() + 1) / (x.sigmoid().sum() + t.sum() + 1) for x, t, _ in rows]
    )
    num_points = len(rows[0][0])
    return 5 * float((weights * bce).sum() / (weights.sum() * num_points)), 5 * float(
        (weights * dice).sum() / weights.sum()
    )


def _oracle_matching(cls, mask, gt):
    """(loss_cls, loss_mask, loss_dice) of one stage, points = all labelled voxels of each sample."""
    ce_sum, ce_norm, rows = 0.0, 0.0, []
    for b in range(len(gt)):
        matched = dict(_oracle_rows(cls[b], mask[b], gt[b]))
        flat = gt[b].reshape(-1).long()
        labelled = flat < NUM_CLASSES
        for q in range(cls.shape[1]):
            label = matched.get(q, NUM_CLASSES)
            ce_sum += CLASS_WEIGHT[label] * -float(cls[b, q].double().log_softmax(-1)[label])
            ce_norm += CLASS_WEIGHT[label]
            if q in matched:
                x = _upsampled(mask[b])[q][labelled]
                rows.append((x, (flat[labelled] == label).double(), CLASS_WEIGHT[label]))
    return (2 * ce_sum / ce_norm, *_oracle_point_losses(rows))


# --------------------------------------------------------------------------------------------------
# Loss functions by hand


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.1], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 2])
    class_weight = torch.tensor([1.0, 1.5, 0.1])
    label_weights = torch.tensor([1.0, 1.0, 0.0])
    nll = [-float(logits[n].log_softmax(-1)[labels[n]]) for n in range(3)]
    expected = (1.0 * nll[0] + 0.1 * nll[1]) / 1.7
    loss = weighted_cross_entropy(logits, labels, class_weight, avg_factor=1.7, label_weights=label_weights)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_bce_and_dice_losses_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    weights = torch.tensor([1.5, 0.5])
    bce = [
        sum(math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x)) for x, t in zip(xs, ts))
        for xs, ts in zip(logits.tolist(), targets.tolist())
    ]
    assert float(weighted_bce_loss(logits, targets, weights, avg_factor=6.0)) == pytest.approx(
        (1.5 * bce[0] + 0.5 * bce[1]) / 6.0, rel=1e-6
    )
    dice = []
    for xs, ts in zip(logits.tolist(), targets.tolist()):
        s = [1 / (1 + math.exp(-x)) for x in xs]
        dice.append(1 - (2 * sum(a * b for a, b in zip(s, ts)) + 1) / (sum(s) + sum(ts) + 1))
    assert float(naive_dice_loss(logits, targets, weights, avg_factor=2.0)) == pytest.approx(
        (1.5 * dice[0] + 0.5 * dice[1]) / 2.0, rel=1e-6
    )


# --------------------------------------------------------------------------------------------------
# The criterion against the oracle


def test_matching_losses_equal_the_hand_computation_with_ignored_voxels():
    gt = _grid([20, 10, 0, 6], num_ignore=12)[None]  # 36 labelled voxels, class 2 absent
    cls, mask = _logits(1, 5, seed=0)
    losses = _full_coverage_criterion(36)(cls, mask, gt)
    expected = _oracle_matching(cls[0], mask[0], gt)
    assert set(losses) == {"loss_cls", "loss_mask", "loss_dice"}
    for key, value in zip(("loss_cls", "loss_mask", "loss_dice"), expected):
        assert float(losses[key]) == pytest.approx(value, rel=1e-4), key


def test_batch_of_two_with_different_gt_counts_equals_the_hand_computation():
    gt = torch.stack([_grid([20, 10, 12, 6], seed=1), _grid([30, 0, 0, 18], seed=2)])  # 4 and 2 GT classes
    cls, mask = _logits(2, 5, seed=3, num_stages=2)
    losses = _full_coverage_criterion(48)(cls, mask, gt)
    for stage, prefix in ((0, "d0."), (1, "")):
        expected = _oracle_matching(cls[stage], mask[stage], gt)
        for name, value in zip(("loss_cls", "loss_mask", "loss_dice"), expected):
            assert float(losses[prefix + name]) == pytest.approx(value, rel=1e-4), prefix + name


@pytest.mark.parametrize("scalar", [1, 2])
def test_dn_losses_equal_the_hand_computation(scalar):
    gt = torch.stack([_grid([20, 10, 12, 6], seed=1), _grid([30, 0, 0, 18], seed=2)])
    num_gts = [4, 2]
    pad = scalar * 4
    gen = torch.Generator().manual_seed(7)
    dn_cls = torch.randn(2, pad, NUM_CLASSES + 1, generator=gen)
    dn_mask = 3 * torch.randn(2, pad, *LOW_SHAPE, generator=gen)
    cls, mask = _logits(2, 5, seed=8)
    meta = {"pad_size": pad, "scalar": scalar, "max_num_gts": 4, "num_gts_list": num_gts}
    losses = _full_coverage_criterion(48)(cls, mask, gt, [(0, dn_cls, dn_mask)], meta)
    assert {"loss_cls_dn", "loss_mask_dn", "loss_dice_dn"} <= set(losses)

    ce_sum, ce_norm, rows = 0.0, 0.0, []
    for b, labels in enumerate([[0, 1, 2, 3], [0, 3]]):
        flat = gt[b].reshape(-1).long()
        for slot in range(pad):
            group, t = divmod(slot, 4)
            if t < len(labels):  # slot g * max_num_gts + t <- GT t of the sample
                label = labels[t]
                ce_sum += CLASS_WEIGHT[label] * -float(dn_cls[b, slot].double().log_softmax(-1)[label])
                ce_norm += CLASS_WEIGHT[label]
                rows.append((_upsampled(dn_mask[b])[slot], (flat == label).double(), CLASS_WEIGHT[label]))
            else:  # padded: no loss, but its no-object weight 0.1 enters the average factor (as released)
                ce_norm += CLASS_WEIGHT[NUM_CLASSES]
    expected_mask, expected_dice = _oracle_point_losses(rows)
    assert float(losses["loss_cls_dn"]) == pytest.approx(2 * ce_sum / ce_norm, rel=1e-5)
    assert float(losses["loss_mask_dn"]) == pytest.approx(expected_mask, rel=1e-4)
    assert float(losses["loss_dice_dn"]) == pytest.approx(expected_dice, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Keys, gradients, edge cases, autocast


def _dn_inputs(gt, pad_seed=0, stage=0):
    num_gts = [len(set(g.reshape(-1)[g.reshape(-1) < NUM_CLASSES].tolist())) for g in gt]
    pad = max(num_gts)
    gen = torch.Generator().manual_seed(pad_seed)
    dn = [
        (
            stage,
            torch.randn(len(gt), pad, NUM_CLASSES + 1, generator=gen),
            torch.randn(len(gt), pad, *LOW_SHAPE, generator=gen),
        )
    ]
    return dn, {"pad_size": pad, "scalar": 1, "max_num_gts": pad, "num_gts_list": num_gts}


def test_ten_stages_with_dn_give_the_released_keys():
    gt = torch.stack([_grid([20, 10, 12, 6], seed=1), _grid([24, 0, 6, 6], num_ignore=12, seed=2)])
    cls, mask = _logits(2, 6, seed=0, num_stages=10)
    dn, meta = _dn_inputs(gt)
    losses = _criterion(8)(cls, mask, gt, dn, meta)
    names = ("loss_cls", "loss_mask", "loss_dice")
    expected = set(names) | {f"d{k}.{n}" for k in range(9) for n in names} | {f"d0.{n}_dn" for n in names}
    assert set(losses) == expected
    assert all(v.dim() == 0 and v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values())
    dn_last, _ = _dn_inputs(gt, stage=9)
    assert {f"{n}_dn" for n in names} <= set(_criterion(8)(cls, mask, gt, dn_last, meta))


def test_gradients_reach_every_supervised_logit():
    gt = torch.stack([_grid([20, 10, 12, 6], seed=1), _grid([24, 0, 6, 6], num_ignore=12, seed=2)])
    cls, mask = _logits(2, 6, seed=0, num_stages=3)
    dn, meta = _dn_inputs(gt)
    tensors = [*cls, *mask, dn[0][1], dn[0][2]]
    for t in tensors:
        t.requires_grad_(True)
    losses = _criterion(8)(cls, mask, gt, dn, meta)
    sum(losses.values()).backward()
    for t in tensors:
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and float(t.grad.abs().sum()) > 0


def test_samples_without_labels_give_finite_losses():
    empty = torch.full(GT_SHAPE, 255, dtype=torch.uint8)
    gt = torch.stack([empty, _grid([20, 10, 12, 6], seed=1)])
    cls, mask = _logits(2, 5, seed=0, num_stages=2)
    for t in [*cls, *mask]:
        t.requires_grad_(True)
    losses = _criterion(8)(cls, mask, gt)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    only_empty = _criterion(8)(cls, mask, torch.stack([empty, empty]))
    assert only_empty["loss_mask"].item() == 0.0 and only_empty["loss_dice"].item() == 0.0
    assert bool(torch.isfinite(only_empty["loss_cls"]))
    sum(only_empty.values()).backward()  # still a graph
    assert bool(torch.isfinite(cls[1].grad).all())


def test_autocast_bf16_equals_fp32_on_the_rounded_values():
    gt = torch.stack([_grid([20, 10, 12, 6], seed=1), _grid([24, 0, 6, 6], num_ignore=12, seed=2)])
    cls, mask = _logits(2, 6, seed=0, num_stages=2)
    dn, meta = _dn_inputs(gt)
    cls16 = [c.bfloat16() for c in cls]
    mask16 = [m.bfloat16() for m in mask]
    dn16 = [(s, c.bfloat16(), m.bfloat16()) for s, c, m in dn]
    criterion = _criterion(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(cls16, mask16, gt, dn16, meta, generator=torch.Generator().manual_seed(0))
    reference = criterion(
        [c.float() for c in cls16],
        [m.float() for m in mask16],
        gt,
        [(s, c.float(), m.float()) for s, c, m in dn16],
        meta,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(mixed) == set(reference)
    for key in reference:
        assert mixed[key].dtype == torch.float32
        assert torch.equal(mixed[key], reference[key]), key


def test_from_config_and_input_checks():
    head = HeadConfig(num_classes=17, class_frequencies=NUSCENES_OCC_FREQUENCIES, num_points=1000)
    criterion = MaskSetCriterion.from_config(head)
    assert criterion.num_points == 1000 and criterion.num_classes == 17
    assert torch.allclose(
        criterion.class_weight, torch.tensor(cross_entropy_class_weights(NUSCENES_OCC_FREQUENCIES))
    )
    assert criterion.state_dict() == {}  # derived weights are not checkpointed
    with pytest.raises(ValueError, match="class_frequencies"):
        MaskSetCriterion(num_classes=3, class_frequencies=FREQUENCIES)
    gt = _grid([20, 10, 12, 6])[None]
    cls, mask = _logits(1, 5, seed=0)
    with pytest.raises(ValueError, match="cls_logits"):
        _criterion(8)([c[..., :-1] for c in cls], mask, gt)
    with pytest.raises(ValueError, match="num_points"):
        _criterion(40)(cls, mask, gt)  # 3 * 40 candidates > 48 voxels
    with pytest.raises(ValueError, match="num_gts_list"):
        _criterion(8)(cls, mask, gt, *_dn_inputs(torch.stack([_grid([30, 0, 0, 18])])))


def test_class_weights_equal_the_spec_tables():
    """Spec 04 section 4 lists the released weights computed from the frequency arrays (4 decimals)."""
    from spotocc.data.classes import SEMANTIC_KITTI_FREQUENCIES, point_sampling_weights

    kitti_ce = cross_entropy_class_weights(SEMANTIC_KITTI_FREQUENCIES)
    nusc_ce = cross_entropy_class_weights(NUSCENES_OCC_FREQUENCIES)
    kitti_sampling = point_sampling_weights(SEMANTIC_KITTI_FREQUENCIES, 0.25)
    nusc_sampling = point_sampling_weights(NUSCENES_OCC_FREQUENCIES, 0.25)
    assert len(kitti_ce) == 21 and len(nusc_ce) == 18 and kitti_ce[-1] == nusc_ce[-1] == 0.1
    expected = {
        "kitti_ce": (kitti_ce, {0: 1.0, 1: 1.3523, 2: 1.9096, 9: 1.2495, 19: 1.7621}),
        "nusc_ce": (nusc_ce, {1: 1.2244, 2: 1.6567, 11: 1.0037, 16: 1.0549}),
        "kitti_sampling": (kitti_sampling, {0: 1.0, 1: 4.3043, 3: 14.6131, 15: 2.4182, 19: 11.2842}),
        "nusc_sampling": (nusc_sampling, {1: 2.4604, 2: 7.0083, 11: 1.0184, 16: 1.2915}),
    }
    for name, (values, spot_values) in expected.items():
        for index, value in spot_values.items():
            assert values[index] == pytest.approx(value, abs=6e-5), (name, index)


def test_matching_and_mask_losses_sample_points_with_the_released_weights_and_ratios(monkeypatch):
    """Matching draws its points with (f_max / f)^0.25 per voxel class; the mask losses take their
    candidates with the same weights and the random share uniformly, at ratios 3 / 0.75 by default."""
    from spotocc.data.classes import point_sampling_weights
    from spotocc.models.heads import losses

    calls = {"match": [], "importance": []}
    sample, importance = losses.sample_without_replacement, losses.importance_sample_points

    def recording_sample(groups, weights, num, **kw):
        calls["match"].append(weights.clone())
        return sample(groups, weights, num, **kw)

    def recording_importance(groups, logits, candidate_weights, random_weights, **kw):
        calls["importance"].append((candidate_weights.clone(), random_weights.clone(), kw))
        return importance(groups, logits, candidate_weights, random_weights, **kw)

    monkeypatch.setattr(losses, "sample_without_replacement", recording_sample)
    monkeypatch.setattr(losses, "importance_sample_points", recording_importance)
    criterion = _criterion(8)  # the released ratios: HeadConfig's defaults
    cfg = HeadConfig()
    assert (cfg.oversample_ratio, cfg.importance_sample_ratio, cfg.sample_weight_gamma) == (3.0, 0.75, 0.25)
    gt = torch.stack([_grid((30, 10, 4, 2), num_ignore=2, seed=1)])
    cls, mask = _logits(1, 6, seed=3)
    criterion(cls, mask, gt)

    per_class = torch.tensor([*point_sampling_weights(FREQUENCIES, 0.25), 0.0], dtype=torch.float64)
    uniform = torch.tensor([1.0] * NUM_CLASSES + [0.0], dtype=torch.float64)  # ignore group: never drawn
    assert len(calls["match"]) == 1 and torch.equal(calls["match"][0], per_class[None])
    assert len(calls["importance"]) == 1
    candidates, randoms, kw = calls["importance"][0]
    assert candidates.shape == randoms.shape == (4, NUM_CLASSES + 1)  # one row per matched GT class
    assert torch.equal(candidates, per_class.expand(4, -1)) and torch.equal(randoms, uniform.expand(4, -1))
    assert kw["oversample_ratio"] == 3.0 and kw["importance_sample_ratio"] == 0.75 and kw["num_points"] == 8
