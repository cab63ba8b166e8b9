import math

import pytest
import torch

from spotocc.models.heads.coarse_losses import (
    LOSS_KEYS,
    coarse_cross_entropy,
    coarse_voxel_losses,
    downsample_labels,
    geometric_scal_loss,
    lovasz_softmax_loss,
    semantic_scal_loss,
)

# --------------------------------------------------------------------------------------------------
# GT downsampling


def grid_from_blocks(blocks: list[list[int]]) -> torch.Tensor:
    """[1, 2 * n, 2, 2] grid whose coarse voxel i (of [n, 1, 1]) is the 2x2x2 block ``blocks[i]``
    (block element order: x offset, then y, then z)."""
    grid = torch.zeros(1, 2 * len(blocks), 2, 2, dtype=torch.uint8)
    for i, block in enumerate(blocks):
        grid[0, 2 * i : 2 * i + 2] = torch.tensor(block, dtype=torch.uint8).view(2, 2, 2)
    return grid


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ([0, 0, 0, 0, 0, 0, 0, 0], 0),  # all empty
        ([0, 0, 0, 0, 0, 3, 3, 7], 3),  # each 0 counts once: 3 (twice) wins
        ([0, 1, 2, 3, 4, 5, 6, 7], 255),  # all values once: a 0 placeholder is the smallest mode
        ([0, 0, 0, 0, 0, 0, 0, 6], 255),  # 7 empty + 1 car voxel: still all "distinct" -> ignored
        ([1, 2, 3, 4, 5, 6, 7, 8], 1),  # all once, no 0: smallest label
        ([255, 255, 255, 0, 0, 0, 0, 4], 255),  # 255 most frequent
        ([255, 255, 5, 5, 0, 0, 0, 0], 5),  # tie 255 vs class: the class (smaller)
        ([9, 9, 4, 4, 0, 0, 0, 0], 4),  # tie between classes: the smaller
        ([255] * 8, 255),
        ([2, 2, 2, 2, 2, 2, 2, 2], 2),
    ],
)
def test_downsample_hand_made_blocks(block, expected):
    labels = downsample_labels(grid_from_blocks([block]), (1, 1, 1))
    assert labels.dtype == torch.int64 and labels.shape == (1, 1, 1, 1)
    assert labels.item() == expected


def test_downsample_layout_and_batch():
    blocks = [[0] * 8, [0, 0, 0, 0, 0, 3, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8], [255, 255, 5, 5, 0, 0, 0, 0]]
    grid = grid_from_blocks(blocks)
    other = grid.flip(1)  # second sample: blocks in reverse order
    out = downsample_labels(torch.cat([grid, other]), (4, 1, 1))
    assert out[0].flatten().tolist() == [0, 3, 1, 5]
    assert out[1].flatten().tolist() == [5, 1, 3, 0]
    # the same blocks along y and z instead of x
    along_y = grid.permute(0, 2, 1, 3)
    assert downsample_labels(along_y, (1, 4, 1)).flatten().tolist() == [0, 3, 1, 5]
    # ratio 1: unchanged
    assert torch.equal(downsample_labels(grid, tuple(grid.shape[1:])), grid.long())


def test_downsample_matches_released_placeholder_mode_on_random_grids():
    """Oracle: the released construction (zeros -> distinct negatives, torch.mode, negative -> 255) on
    CPU, where torch.mode returns the smallest of equally frequent values."""
    gen = torch.Generator().manual_seed(0)
    for ratio, classes in [(2, 4), (4, 17), (2, 20)]:
        gt = torch.randint(0, classes, (2, 4 * ratio, 2 * ratio, 3 * ratio), generator=gen)
        gt[torch.rand(gt.shape, generator=gen) < 0.5] = 0
        gt[torch.rand(gt.shape, generator=gen) < 0.1] = 255
        gt[:, :ratio] = 0  # some all-empty blocks
        b, x, y, z = gt.shape
        blocks = gt.view(b, x // ratio, ratio, y // ratio, ratio, z // ratio, ratio)
        blocks = (
            blocks.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, x // ratio, y // ratio, z // ratio, -1).clone()
        )
        empty = blocks.sum(-1) == 0
        occupied = blocks[~empty]
        zero = occupied == 0
        occupied[zero] = -torch.arange(int(zero.sum())) - 1
        blocks[~empty] = occupied
        expected = torch.mode(blocks, dim=-1).values
        expected[expected < 0] = 255
        got = downsample_labels(gt.to(torch.uint8), (x // ratio, y // ratio, z // ratio))
        assert torch.equal(got, expected)


def test_downsample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="integer multiple"):
        downsample_labels(torch.zeros(1, 6, 4, 4, dtype=torch.uint8), (4, 2, 2))
    with pytest.raises(ValueError, match="non-negative integer"):
        downsample_labels(torch.full((1, 4, 4, 4), -1), (2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, X, Y, Z\]"):
        downsample_labels(torch.zeros(6, 4, 4, dtype=torch.uint8), (3, 2, 2))


# --------------------------------------------------------------------------------------------------
# The losses against independent step-by-step computations


def tiny_case(seed=0, classes=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 3, 2, 2, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (2, 3, 2, 2), generator=gen)
    target[0, 0, 0, 0] = 255
    target[1, 2, 1, 1] = 255
    target[target == classes - 1] = 1  # class classes-1 absent
    return logits, target


def valid_voxels(logits, target):
    """List of (probability vector, label) of labelled voxels, by explicit iteration."""
    items = []
    for b in range(target.shape[0]):
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in target.shape[1:]]):
            x, y, z = idx.tolist()
            label = int(target[b, x, y, z])
            if label != 255:
                items.append((torch.softmax(logits[b, :, x, y, z], 0), logits[b, :, x, y, z], label))
    return items


def bce_one(x: float) -> float:
    return -max(math.log(x), -100.0) if x > 0 else 100.0


def test_cross_entropy_against_hand_computation():
    logits, target = tiny_case()
    weights = torch.tensor([1.0, 1.3, 1.7, 2.0], dtype=torch.float64)
    num = den = 0.0
    for _, logit, label in valid_voxels(logits, target):
        w = float(weights[label])
        num += w * -(float(logit[label]) - math.log(sum(math.exp(float(v)) for v in logit)))
        den += w
    got = coarse_cross_entropy(logits, target, weights)
    assert got.item() == pytest.approx(num / den, rel=1e-5)


def test_semantic_scal_against_hand_computation():
    logits, target = tiny_case()
    items = valid_voxels(logits, target)
    total, count = 0.0, 0
    for c in range(logits.shape[1]):
        p = [float(prob[c]) for prob, _, _ in items]
        t = [1.0 if label == c else 0.0 for _, _, label in items]
        if sum(t) == 0:
            continue
        count += 1
        hits = sum(pi * ti for pi, ti in zip(p, t))
        term = bce_one(hits / sum(p)) + bce_one(hits / sum(t))
        negatives = sum(1 - ti for ti in t)
        term += bce_one(sum((1 - pi) * (1 - ti) for pi, ti in zip(p, t)) / negatives)
        total += term
    assert count == 3
    assert semantic_scal_loss(logits, target).item() == pytest.approx(total / count, rel=1e-5)


def test_semantic_scal_skips_specificity_when_one_class_covers_everything():
    logits = torch.randn(1, 3, 2, 2, 1, dtype=torch.float64)
    target = torch.full((1, 2, 2, 1), 2)
    probs = logits.softmax(1)[0, 2].flatten()
    precision = 1.0  # every labelled voxel is of class 2
    recall = float(probs.sum()) / 4
    expected = bce_one(precision) + bce_one(recall)
    assert semantic_scal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_geometric_scal_against_hand_computation():
    logits, target = tiny_case(seed=1)
    items = valid_voxels(logits, target)
    occ_p = [1 - float(prob[0]) for prob, _, _ in items]
    occ_t = [0.0 if label == 0 else 1.0 for _, _, label in items]
    eps = 1e-5
    inter = sum(p * t for p, t in zip(occ_p, occ_t))
    precision = inter / (sum(occ_p) + eps)
    recall = inter / (sum(occ_t) + eps)
    spec = sum((1 - t) * (1 - p) for p, t in zip(occ_p, occ_t)) / (sum(1 - t for t in occ_t) + eps)
    expected = bce_one(precision) + bce_one(recall) + bce_one(spec)
    assert geometric_scal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def jaccard_loss_of_error_set(fg: list[bool], errors: set[int]) -> float:
    """1 - |fg minus errors| / |fg union errors| (the Jaccard loss when ``errors`` are mispredicted)."""
    fg_set = {i for i, f in enumerate(fg) if f}
    union = fg_set | errors
    return 1.0 - len(fg_set - errors) / len(union) if union else 0.0


def test_lovasz_softmax_against_set_function_definition():
    """Lovasz extension by its definition: errors sorted descending, increments of the Jaccard loss
    of the growing set of mispredicted voxels."""
    logits, target = tiny_case(seed=2)
    items = valid_voxels(logits, target)
    losses = []
    for c in range(logits.shape[1]):
        fg = [label == c for _, _, label in items]
        if not any(fg):
            continue
        errors = [abs((1.0 if f else 0.0) - float(prob[c])) for (prob, _, _), f in zip(items, fg)]
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        value, previous, chosen = 0.0, 0.0, set()
        for i in order:
            chosen.add(i)
            current = jaccard_loss_of_error_set(fg, chosen)
            value += errors[i] * (current - previous)
            previous = current
        losses.append(value)
    assert len(losses) == 3
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_lovasz_on_hard_predictions_is_the_jaccard_loss():
    # one-hot probabilities: the extension equals the mean Jaccard loss (1 - IoU) over present classes
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).double().T.reshape(1, 3, 6, 1, 1) * 1e4
    target = labels.view(1, 6, 1, 1)
    ious = [1 / 3, 2 / 3, 1 / 2]  # class 0: {0} of {0,1,5}; class 1: {2,3} of {1,2,3}; class 2: {4} of {4,5}
    expected = sum(1 - v for v in ious) / 3
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(expected, abs=1e-9)


def test_coarse_voxel_losses_keys_weights_downsampling_and_gradients():
    gen = torch.Generator().manual_seed(3)
    gt = torch.randint(0, 4, (2, 6, 4, 4), generator=gen).to(torch.uint8)
    gt[0, :2] = 0
    gt[1, 4:] = 255
    logits = torch.randn(2, 4, 3, 2, 2, generator=gen, requires_grad=True)
    weights = torch.tensor([1.0, 1.2, 1.4, 1.6])
    losses = coarse_voxel_losses(logits, gt, class_weights=weights, loss_weight=0.5)
    assert tuple(losses) == LOSS_KEYS
    target = downsample_labels(gt, (3, 2, 2))
    torch.testing.assert_close(
        losses["loss_voxel_ce_coarse"], 0.5 * coarse_cross_entropy(logits, target, weights)
    )
    torch.testing.assert_close(losses["loss_voxel_sem_scal_coarse"], 0.5 * semantic_scal_loss(logits, target))
    torch.testing.assert_close(
        losses["loss_voxel_geo_scal_coarse"], 0.5 * geometric_scal_loss(logits, target)
    )
    torch.testing.assert_close(losses["loss_voxel_lovasz_coarse"], 0.5 * lovasz_softmax_loss(logits, target))
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_coarse_losses_are_float32_under_autocast():
    gen = torch.Generator().manual_seed(4)
    gt = torch.randint(0, 3, (1, 4, 4, 4), generator=gen).to(torch.uint8)
    logits = torch.randn(1, 3, 2, 2, 2, generator=gen)
    reference = coarse_voxel_losses(logits, gt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = coarse_voxel_losses(logits.bfloat16(), gt)
    for key in LOSS_KEYS:
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], reference[key], rtol=3e-2, atol=3e-2)


def test_all_ignored_gives_zero_losses_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    losses = coarse_voxel_losses(logits, torch.full((1, 4, 4, 4), 255, dtype=torch.uint8))
    for value in losses.values():
        assert value.item() == 0.0 and value.requires_grad
    sum(losses.values()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="labels outside"):
        coarse_voxel_losses(logits, torch.full((1, 4, 4, 4), 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="class_weights"):
        coarse_voxel_losses(logits, torch.zeros(1, 4, 4, 4, dtype=torch.uint8), class_weights=torch.ones(4))
    with pytest.raises(ValueError, match="same B"):
        coarse_voxel_losses(logits, torch.zeros(2, 4, 4, 4, dtype=torch.uint8))
