"""Coarse voxel losses of the SparseOcc baseline head (spec 03, section 5.4).

The baseline's ``occ_pred_conv`` predicts class logits [B, C, X0, Y0, Z0] at the resolution of the
finest voxel features. It is trained by four losses against the ground truth downsampled to that
resolution, each with weight ``loss_weight`` (1 as released):

- ``loss_voxel_ce_coarse``: class-weighted cross-entropy (weights ``cw[:C]``), ignoring 255;
- ``loss_voxel_sem_scal_coarse``: semantic scene-class affinity (MonoScene);
- ``loss_voxel_geo_scal_coarse``: geometric scene-class affinity (MonoScene), empty class 0;
- ``loss_voxel_lovasz_coarse``: Lovasz-softmax over the classes present, ignoring 255.

Every loss pools the whole batch (as released with ``per_image=False``; at the released batch size 1
this is the per-sample loss). All of them run in float32 with autocast disabled. Deliberate edge-case
deviation: when no voxel of the batch is labelled (all 255) every loss is 0 (with a graph); the
released code gives NaN (cross-entropy), 300 (geometric affinity) or an empty tensor (Lovasz) there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spotocc.data.classes import IGNORE_INDEX

LOSS_KEYS = (
    "loss_voxel_ce_coarse",
    "loss_voxel_sem_scal_coarse",
    "loss_voxel_geo_scal_coarse",
    "loss_voxel_lovasz_coarse",
)


# --------------------------------------------------------------------------------------------------
# Ground truth at the coarse resolution


def downsample_labels(gt_occ: torch.Tensor, out_size: tuple[int, int, int]) -> torch.Tensor:
    """Released block-mode downsampling of labels [B, X, Y, Z] to int64 [B, *out_size].

    Each output voxel covers a block of ``(X/X0) * (Y/Y0) * (Z/Z0)`` GT voxels:

    - a block whose labels are all 0 (empty) gets 0;
    - otherwise every 0 of the block counts as a distinct value of its own (the released code
      replaces zeros by distinct negative placeholders), the block takes the most frequent value,
      and a placeholder result becomes 255 (ignore).

    Ties (several values equally frequent) go to the **smallest** value, placeholders being smaller
    than every label. This is what ``torch.mode`` returns on CPU, and what its CUDA kernel (ascending
    sort, then a first-wins max reduction) returns; here it is explicit and device-independent.
    Consequences: a block in which every nonzero label occurs once and which contains a 0 becomes
    255 (e.g. 7 empty voxels and 1 car voxel); such a block without a 0 takes its smallest label;
    between 255 and a class of equal count the class wins.

    Implemented by counting each label per block (no sort, no placeholders).
    """
    if gt_occ.dim() != 4:
        raise ValueError(f"downsample_labels: gt_occ must be [B, X, Y, Z], got {tuple(gt_occ.shape)}")
    batch, *size = gt_occ.shape
    if len(out_size) != 3 or any(s % o or o <= 0 for s, o in zip(size, out_size)):
        raise ValueError(
            f"downsample_labels: GT grid {tuple(size)} is not an integer multiple of the coarse grid "
            f"{tuple(out_size)}"
        )
    x0, y0, z0 = out_size
    rx, ry, rz = (s // o for s, o in zip(size, out_size))
    if rx * ry * rz == 1:
        return gt_occ.long()
    if gt_occ.dtype.is_floating_point or bool((gt_occ < 0).any()):
        raise ValueError("downsample_labels: gt_occ must hold non-negative integer labels")
    # compact the label values present: code i <-> values[i], ascending, so code order = value order
    blocks = gt_occ.view(batch, x0, rx, y0, ry, z0, rz).permute(0, 1, 3, 5, 2, 4, 6)
    blocks = blocks.reshape(-1, rx * ry * rz).long()  # [M, n] one row per coarse voxel
    present = torch.bincount(blocks.view(-1)) > 0
    values = present.nonzero().squeeze(1)  # [V] ascending
    blocks = (present.long().cumsum(0) - 1)[blocks]  # label codes
    counts = torch.zeros(len(blocks), len(values), dtype=torch.int32, device=blocks.device)
    counts.scatter_add_(1, blocks, torch.ones_like(blocks, dtype=torch.int32))  # [M, V] occurrences
    zeros = torch.zeros_like(counts[:, 0])
    if bool(values[0] == 0):
        zeros = counts[:, 0].clone()
        counts[:, 0] = 0  # each 0 is a value of its own (count 1), never a run
    # argmax returns the first maximum: the smallest value among the most frequent nonzero labels
    best = counts.argmax(dim=1)  # [M]
    best_count = counts.gather(1, best[:, None]).squeeze(1)
    mode = values[best]
    # every nonzero label occurs at most once and a 0 (placeholder, smaller than any label) ties: 255
    mode = torch.where((best_count <= 1) & (zeros > 0), torch.full_like(mode, IGNORE_INDEX), mode)
    mode = torch.where(zeros == blocks.shape[1], torch.zeros_like(mode), mode)  # all empty
    return mode.view(batch, x0, y0, z0)


# --------------------------------------------------------------------------------------------------
# The four losses (logits [B, C, X, Y, Z], target int64 [B, X, Y, Z])


def _flatten_valid(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Labelled voxels only: logits [P, C] (float32) and target [P]."""
    num_classes = logits.shape[1]
    flat = logits.float().movedim(1, -1).reshape(-1, num_classes)  # [B * N, C]
    labels = target.reshape(-1)
    valid = labels != ignore_index
    return flat[valid], labels[valid]


def _bce_to_one(x: torch.Tensor) -> torch.Tensor:
    """``binary_cross_entropy(x, 1)`` = ``-log(x)`` with PyTorch's -100 floor, per element."""
    x = x.clamp(0.0, 1.0)  # rounding can push a ratio of equal sums a hair past 1
    return F.binary_cross_entropy(x, torch.ones_like(x), reduction="none")


def _zero(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().sum() * 0.0


def coarse_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Weighted mean cross-entropy ``sum w_y * CE / sum w_y`` over labelled voxels."""
    probs_logits, labels = _flatten_valid(logits, target, ignore_index)
    if labels.numel() == 0:
        return _zero(logits)
    weight = None if class_weights is None else class_weights.float()
    return F.cross_entropy(probs_logits, labels, weight=weight)


def semantic_scal_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """MonoScene semantic scene-class affinity loss (released ``sem_scal_loss``).

    For every class c present among the labelled voxels, with p_c its softmax probability and t_c
    its indicator: ``BCE(precision, 1) + BCE(recall, 1) + BCE(specificity, 1)`` where precision =
    sum p_c t_c / sum p_c (skipped if sum p_c = 0), recall = sum p_c t_c / sum t_c, specificity =
    sum (1 - p_c)(1 - t_c) / sum (1 - t_c) (skipped if every labelled voxel is of class c). The loss
    is the mean over present classes.
    """
    flat, labels = _flatten_valid(logits, target, ignore_index)
    if labels.numel() == 0:
        return _zero(logits)
    probs = flat.softmax(dim=1)  # [P, C]
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)  # [P, C]
    count = onehot.sum(dim=0)  # [C]
    present = count > 0
    hits = (probs * onehot).sum(dim=0)
    prob_sum = probs.sum(dim=0)
    others = (1.0 - onehot).sum(dim=0)
    true_negatives = ((1.0 - probs) * (1.0 - onehot)).sum(dim=0)
    # safe denominators: a NaN in a skipped entry would still poison the gradient through where()
    precision = hits / torch.where(prob_sum > 0, prob_sum, torch.ones_like(prob_sum))
    recall = hits / torch.where(present, count, torch.ones_like(count))
    specificity = true_negatives / torch.where(others > 0, others, torch.ones_like(others))
    per_class = (
        torch.where(prob_sum > 0, _bce_to_one(precision), torch.zeros_like(precision))
        + _bce_to_one(recall)
        + torch.where(others > 0, _bce_to_one(specificity), torch.zeros_like(specificity))
    )
    return (per_class * present).sum() / present.sum()


def geometric_scal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    empty_index: int = 0,
) -> torch.Tensor:
    """MonoScene geometric scene-class affinity loss (released ``geo_scal_loss``).

    Occupied vs. empty over labelled voxels, p = 1 - softmax[empty]: ``BCE(precision, 1) +
    BCE(recall, 1) + BCE(specificity, 1)`` with an epsilon of 1e-5 in every denominator.
    """
    flat, labels = _flatten_valid(logits, target, ignore_index)
    if labels.numel() == 0:
        return _zero(logits)
    empty_probs = flat.softmax(dim=1)[:, empty_index]
    occupied_probs = 1.0 - empty_probs
    occupied = (labels != empty_index).to(flat.dtype)
    eps = 1e-5
    intersection = (occupied * occupied_probs).sum()
    precision = intersection / (occupied_probs.sum() + eps)
    recall = intersection / (occupied.sum() + eps)
    specificity = ((1.0 - occupied) * empty_probs).sum() / ((1.0 - occupied).sum() + eps)
    return _bce_to_one(precision) + _bce_to_one(recall) + _bce_to_one(specificity)


def lovasz_softmax_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018) of ``softmax(logits)``, mean over the classes present.

    Per present class c: errors e = |t_c - p_c| sorted descending, and the loss is the dot product of
    the sorted errors with the discrete gradient of the Jaccard loss along that order. All classes
    are handled in one sort; the value does not depend on how equal errors are ordered.
    """
    flat, labels = _flatten_valid(logits, target, ignore_index)
    if labels.numel() == 0:
        return _zero(logits)
    probs = flat.softmax(dim=1)
    classes = torch.unique(labels)  # the classes present
    fg = (labels[:, None] == classes[None, :]).to(probs.dtype)  # [P, c]
    errors = (fg - probs[:, classes]).abs()
    errors_sorted, order = errors.sort(dim=0, descending=True)
    fg_sorted = fg.gather(0, order)
    total = fg_sorted.sum(dim=0, keepdim=True)  # [1, c] >= 1 for present classes
    intersection = total - fg_sorted.cumsum(dim=0)
    union = total + (1.0 - fg_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union  # [P, c]
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    return (errors_sorted * grad).sum(dim=0).mean()


def coarse_voxel_losses(
    logits: torch.Tensor,
    gt_occ: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    loss_weight: float = 1.0,
    empty_index: int = 0,
) -> dict[str, torch.Tensor]:
    """The four coarse losses of logits [B, C, X0, Y0, Z0] against GT labels [B, X, Y, Z].

    The GT is downsampled with :func:`downsample_labels`; its labels must be in ``[0, C)`` or 255.
    Runs in float32 with autocast disabled. Returns the keys of :data:`LOSS_KEYS`.
    """
    if logits.dim() != 5 or gt_occ.dim() != 4 or logits.shape[0] != gt_occ.shape[0]:
        raise ValueError(
            f"coarse_voxel_losses: expected logits [B, C, X0, Y0, Z0] and gt_occ [B, X, Y, Z] with the "
            f"same B, got {tuple(logits.shape)} and {tuple(gt_occ.shape)}"
        )
    num_classes = logits.shape[1]
    if class_weights is not None and class_weights.shape != (num_classes,):
        raise ValueError(
            f"coarse_voxel_losses: class_weights must have {num_classes} entries, got "
            f"{tuple(class_weights.shape)}"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        bad = (gt_occ >= num_classes) & (gt_occ != IGNORE_INDEX)
        if bool(bad.any()):
            raise ValueError(
                f"coarse_voxel_losses: gt_occ has labels outside [0, {num_classes}) and != "
                f"{IGNORE_INDEX}: {torch.unique(gt_occ[bad]).tolist()}"
            )
        target = downsample_labels(gt_occ, tuple(logits.shape[2:]))
        logits = logits.float()
        losses = {
            "loss_voxel_ce_coarse": coarse_cross_entropy(logits, target, class_weights),
            "loss_voxel_sem_scal_coarse": semantic_scal_loss(logits, target),
            "loss_voxel_geo_scal_coarse": geometric_scal_loss(logits, target, empty_index=empty_index),
            "loss_voxel_lovasz_coarse": lovasz_softmax_loss(logits, target),
        }
    return {key: value * loss_weight for key, value in losses.items()}
