"""Point sampling, match costs and Hungarian assignment for mask classification (spec 03, sections 4.3-4.4).

Everything works on one sample's ground-truth grid ``[X, Y, Z]`` (flattened row-major, z fastest) and
on low-resolution mask logits ``[..., X0, Y0, Z0]``:

- :class:`VoxelGroups` groups the GT voxels by class once per sample; every draw of a training step
  (matching points and mask-loss points of every stage, denoising points) reuses it.
- :func:`sample_without_replacement` draws distinct voxels with per-class weights, with the law of
  PyTorch's ``multinomial(replacement=False)`` fast path (an exponential race ``w / Exp(1)`` then
  top-k), including its behaviour when the positive weights run out (zero-weight voxels fill the
  rest; here uniformly at random, an explicit rule instead of a tie-break of ``topk``).
- :func:`point_sample_3d` samples logits trilinearly at GT-voxel coordinates (``align_corners=True``).
- :func:`importance_sample_points` is the released uncertainty-based point selection for the losses.
- :func:`classification_cost`, :func:`mask_bce_cost`, :func:`mask_dice_cost` and
  :func:`hungarian_match` are the released ``MaskHungarianAssigner`` pieces.

About 470 lines in one module: these are the steps of one released assigner, each used by the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Draw budget (in units of k) of the "first distinct draws" sampler before it falls back to an explicit race.
_MAX_REDRAW_FACTOR = 4.0


# --------------------------------------------------------------------------------------------------
# Voxel groups: the per-sample sampling structure


@dataclass(frozen=True)
class VoxelGroups:
    """One GT grid's voxels grouped by class, built once per sample and shared by all its draws.

    Group ``c < num_classes`` holds the voxels labelled ``c``; the last group (index ``num_classes``)
    holds every other voxel (label 255 and any label ``>= num_classes``), which never is a target.
    """

    labels: Tensor  # [N] the grid's labels, flattened row-major (z fastest), original integer dtype
    order: Tensor  # int64 [N] flat voxel indices sorted by group (stable: ascending within a group)
    offsets: Tensor  # int64 [num_groups + 1]: group g is order[offsets[g]:offsets[g + 1]]
    counts: tuple[int, ...]  # voxels per group (host copy: sampling decisions are made on the host)
    grid_shape: tuple[int, int, int]
    num_classes: int

    @classmethod
    def from_occupancy(cls, gt_occ: Tensor, num_classes: int) -> VoxelGroups:
        """Group the voxels of ``gt_occ`` ``[X, Y, Z]`` (integer labels, 255 = ignore) by class."""
        if gt_occ.dim() != 3:
            raise ValueError(f"gt_occ must be one sample's grid [X, Y, Z], got shape {tuple(gt_occ.shape)}")
        if gt_occ.is_floating_point() or gt_occ.is_complex() or gt_occ.dtype == torch.bool:
            raise ValueError(f"gt_occ must hold integer labels, got dtype {gt_occ.dtype}")
        if not 0 < num_classes < 255:
            raise ValueError(f"num_classes must be in [1, 254], got {num_classes}")
        labels = gt_occ.reshape(-1)  # [N]
        if labels.dtype != torch.uint8 and bool((labels < 0).any()):
            raise ValueError("gt_occ holds negative labels; expected 0..num_classes-1 or 255 (ignore)")
        group = labels.clamp(max=num_classes).to(torch.uint8)  # [N] one byte: fast stable sort
        order = torch.sort(group, stable=True).indices  # [N] int64
        counts = torch.bincount(group, minlength=num_classes + 1)  # [num_classes + 1]
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(
            labels=labels,
            order=order,
            offsets=offsets,
            counts=tuple(int(c) for c in counts.tolist()),
            grid_shape=tuple(int(s) for s in gt_occ.shape),  # type: ignore[arg-type]
            num_classes=num_classes,
        )

    @property
    def num_voxels(self) -> int:
        return len(self.labels)

    @property
    def num_groups(self) -> int:
        return self.num_classes + 1

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def present_classes(self) -> Tensor:
        """int64 ``[G]``: the classes present, ascending (= ``occupancy_to_class_masks`` labels)."""
        present = [c for c in range(self.num_classes) if self.counts[c] > 0]
        return torch.tensor(present, dtype=torch.long, device=self.device)

    def labels_at(self, indices: Tensor) -> Tensor:
        """The GT labels at flat voxel ``indices`` (any shape)."""
        return _take(self.labels, indices)

    def class_weight_rows(self, class_weights: Tensor, num_rows: int) -> Tensor:
        """float64 ``[num_rows, num_groups]``: ``class_weights`` (``[num_classes]``) on every class group,
        0 on the ignore group: the released per-voxel weight ``sum_g w[label_g] * mask_g``."""
        row = torch.zeros(self.num_groups, dtype=torch.float64)
        row[: self.num_classes] = class_weights.detach().to("cpu", torch.float64)
        return row.expand(num_rows, -1)

    def single_class_rows(self, class_weights: Tensor, row_classes: Tensor) -> Tensor:
        """float64 ``[R, num_groups]``: row r weights only the voxels of class ``row_classes[r]``
        (with ``class_weights[row_classes[r]]``), i.e. the released one-GT-per-row distribution."""
        classes = row_classes.detach().to("cpu", torch.long)
        rows = torch.zeros(len(classes), self.num_groups, dtype=torch.float64)
        rows[torch.arange(len(classes)), classes] = class_weights.detach().to("cpu", torch.float64)[classes]
        return rows


# --------------------------------------------------------------------------------------------------
# Sampling without replacement


def exponential_race(
    weights: Tensor, num_samples: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Reference law of ``torch.multinomial(weights, k, replacement=False)``, written out.

    PyTorch's fast path draws ``key = w / Exp(1)`` per entry and keeps the top-k keys; zero-weight
    entries all get key 0 and, once the positive ones run out, fill the remaining slots in an
    implementation-defined tie order. Here those fill entries are ordered by an independent uniform
    key instead (uniform without replacement among the zero-weight entries).

    Args:
        weights: ``[R, N]`` non-negative weights, one distribution per row.
        num_samples: k <= N.

    Returns:
        int64 ``[R, k]`` distinct column indices per row, in race order.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights must be [R, N], got shape {tuple(weights.shape)}")
    if num_samples > weights.shape[1]:
        raise ValueError(f"cannot draw {num_samples} distinct entries out of {weights.shape[1]}")
    weights = weights.to(torch.float64)
    exp = torch.empty_like(weights).exponential_(generator=generator)
    keys = weights / exp
    tie = torch.rand(weights.shape, dtype=torch.float64, device=weights.device, generator=generator)
    keys = torch.where(weights > 0, keys, -tie)  # zero weights: after every positive key, in random order
    return keys.topk(num_samples, dim=1).indices


def sample_without_replacement(
    groups: VoxelGroups,
    group_weights: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Distinct GT voxels per row, drawn with a per-group weight (every voxel of group g weighs w[g]).

    The law is that of :func:`exponential_race` on the per-voxel weights: positive-weight voxels by
    successive sampling (each next voxel proportional to its weight among those not yet drawn);
    if a row has fewer than ``num_samples`` positive-weight voxels, all of them are taken and the rest
    is drawn uniformly without replacement among its zero-weight voxels (what PyTorch's fast path
    returns once the positive entries run out, spec 03 section 3.3). Cost is O(num_samples) per row:
    the first distinct values of i.i.d. draws with replacement follow exactly that law, so no per-voxel
    random key is needed; rows whose positive voxels are too few for that run the race explicitly.

    Args:
        groups: the sample's :class:`VoxelGroups`.
        group_weights: ``[R, num_groups]`` non-negative weights (any device; read on the host).
        num_samples: k, at most the number of voxels.

    Returns:
        int64 ``[R, k]`` flat GT voxel indices, distinct within each row (their order within a row is
        unspecified), on ``groups.device``.
    """
    weights = group_weights.detach().to("cpu", torch.float64)
    if weights.dim() != 2 or weights.shape[1] != groups.num_groups:
        raise ValueError(f"group_weights must be [R, {groups.num_groups}], got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("group_weights must be finite and non-negative")
    if num_samples > groups.num_voxels:
        raise ValueError(f"cannot draw {num_samples} distinct voxels out of a grid of {groups.num_voxels}")
    counts = torch.tensor(groups.counts, dtype=torch.float64)
    weights = torch.where(counts > 0, weights, torch.zeros_like(weights))  # empty groups play no part
    distributions = _rows_by_distribution(weights)
    if len(distributions) == 1 and int(counts[distributions[0][1] > 0].sum()) >= num_samples:
        # The usual case (all rows from one distribution, enough positive voxels): no scatter needed.
        positions = _draw_positive(groups, distributions[0][1], len(weights), num_samples, generator)
        return _take(groups.order, positions)
    positions = torch.empty(len(weights), num_samples, dtype=torch.long, device=groups.device)
    for rows, row_weights in distributions:
        positive = row_weights > 0  # [num_groups]
        num_positive = int(counts[positive].sum())
        if num_positive >= num_samples:
            positions[rows] = _draw_positive(groups, row_weights, len(rows), num_samples, generator)
            continue
        # Every positive voxel wins the race; the rest comes uniformly from the zero-weight voxels.
        positions[rows, :num_positive] = _group_positions(groups, positive)
        fill_weights = (~positive & (counts > 0)).to(torch.float64)  # [num_groups]
        fill = _draw_positive(groups, fill_weights, len(rows), num_samples - num_positive, generator)
        positions[rows, num_positive:] = fill
    return _take(groups.order, positions)


def _take(source: Tensor, index: Tensor) -> Tensor:
    """``source[index]`` for a 1-D source (index_select: much faster than advanced indexing on CPU)."""
    return source.index_select(0, index.flatten()).view(index.shape)


def _rows_by_distribution(weights: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Rows sharing one weight vector, drawn together: [(row indices, weights [num_groups])]."""
    unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
    return [(torch.nonzero(inverse == u).flatten(), unique[u]) for u in range(len(unique))]


def _group_positions(groups: VoxelGroups, selected: Tensor) -> Tensor:
    """Positions in ``groups.order`` of all voxels of the selected groups (``selected``: bool [groups])."""
    offsets = groups.offsets.tolist()
    parts = [
        torch.arange(offsets[g], offsets[g + 1], device=groups.device)
        for g in range(groups.num_groups)
        if bool(selected[g])
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=groups.device)


def _draw_positive(
    groups: VoxelGroups, weights: Tensor, num_rows: int, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """k distinct positions in ``groups.order`` for each of ``num_rows`` rows of one distribution.

    ``weights``: float64 [num_groups] on the host, with at least k positive-weight voxels. Returns
    int64 ``[num_rows, k]``, positive-weight voxels only (order within a row unspecified).
    """
    if num_samples == 0:
        return torch.empty(num_rows, 0, dtype=torch.long, device=groups.device)
    counts = torch.tensor(groups.counts, dtype=torch.float64)
    num_draws = _draws_for_distinct(weights, counts, num_samples)
    if num_draws is not None:
        return _first_distinct_draws(groups, weights, num_rows, num_samples, num_draws, generator)
    # Few positive voxels relative to k: run the race over them explicitly (O(#positive) per row).
    selected = weights > 0
    candidates = _group_positions(groups, selected)  # [n_pos]
    voxel_weights = torch.repeat_interleave(weights[selected], counts[selected].long()).to(groups.device)
    won = exponential_race(voxel_weights.expand(num_rows, -1), num_samples, generator=generator)
    return candidates[won]  # [num_rows, k]


def _draws_for_distinct(weights: Tensor, counts: Tensor, num_samples: int) -> int | None:
    """Draws with replacement after which k distinct voxels are expected, plus a safety margin.

    With per-voxel probability p_g in group g, ``E[distinct after M draws] = sum_g n_g (1 - (1 - p_g)^M)``;
    bisection on M. None when even ``4 k + 64`` draws are not expected to give k distinct voxels
    comfortably (too few positive voxels for k): the caller then runs the race explicitly.
    """
    total = float((weights * counts).sum())
    groups = [
        (float(n), math.log1p(-min(float(w) / total, 1.0 - 1e-16))) for w, n in zip(weights, counts) if w > 0
    ]

    def expected_distinct(m: float) -> float:
        return sum(n * -math.expm1(m * log_keep) for n, log_keep in groups)

    limit = _MAX_REDRAW_FACTOR * num_samples + 64
    if expected_distinct(limit) < num_samples + 3.0 * math.sqrt(num_samples):
        return None
    low, high = float(num_samples), limit
    for _ in range(40):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if expected_distinct(mid) < num_samples else (low, mid)
    return int(math.ceil(high + 4.0 * math.sqrt(high - num_samples + 1.0) + 16))


def _first_distinct_draws(
    groups: VoxelGroups,
    weights: Tensor,
    num_rows: int,
    num_samples: int,
    num_draws: int,
    generator: torch.Generator | None,
) -> Tensor:
    """The first k distinct values of i.i.d. weighted draws with replacement, per row.

    Returns int64 ``[R, k]`` positions in ``groups.order``, ascending within a row (the set is what
    matters; ascending positions make the later lookups in ``groups.order`` cache-friendly).
    """
    device = groups.device
    counts_host = torch.tensor(groups.counts, dtype=torch.float64)
    mass = weights * counts_host  # [num_groups]
    last_group = int(torch.nonzero(mass > 0).max())  # last group with positive mass
    bounds = mass.cumsum(0).to(device)  # [num_groups] upper end of each group's interval
    start = bounds - mass.to(device)  # [num_groups] lower end
    inverse_weight = torch.where(weights > 0, 1.0 / weights, torch.zeros_like(weights)).to(device)
    last_rank = (counts_host - 1).clamp(min=0).to(device)
    offsets = groups.offsets[:-1]
    draws = torch.empty(num_rows, 0, dtype=torch.long, device=device)
    while True:
        # One uniform per draw: the group by its cumulative mass, then the rank inside the group.
        u = torch.rand(num_rows * num_draws, dtype=torch.float64, device=device, generator=generator)
        u = u * bounds[-1]  # [R * M]
        group = torch.searchsorted(bounds, u, right=True)  # zero-mass groups are never hit
        group.clamp_(max=last_group)  # u rounded up to the total mass
        rank = ((u - start.index_select(0, group)) * inverse_weight.index_select(0, group)).floor_()
        rank = torch.minimum(rank.clamp_(min=0), last_rank.index_select(0, group)).long()
        new = (offsets.index_select(0, group) + rank).view(num_rows, num_draws)
        draws = torch.cat([draws, new], dim=1)  # [R, M_total] positions, in draw order
        selected = _first_distinct(draws, num_samples, groups.num_voxels)
        if selected is not None:
            return selected
        num_draws = max(64, 2 * num_samples)  # rare: not enough distinct values yet; draw more


def _first_distinct(values: Tensor, num_samples: int, num_values: int) -> Tensor | None:
    """Per row, the first k distinct entries of ``values`` [R, M] (in [0, num_values)), ascending.

    None if some row has fewer than k distinct entries.
    """
    num_rows, num_draws = values.shape
    # One sort for all rows: rows never collide in the keys; int32 keys sort faster when they fit.
    key_dtype = torch.int32 if num_rows * num_values < 2**31 else torch.long
    row_offset = torch.arange(num_rows, device=values.device)[:, None] * num_values
    keys = (values + row_offset).to(key_dtype).flatten()  # [R * M]
    sorted_keys, perm = torch.sort(keys, stable=True)  # stable: earliest draw first among equals
    first_sorted = torch.ones_like(sorted_keys, dtype=torch.bool)
    first_sorted[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = torch.empty_like(first_sorted).index_copy_(0, perm, first_sorted).view(num_rows, num_draws)
    rank = first.cumsum(1)  # [R, M] number of distinct values up to each draw
    if bool((rank[:, -1] < num_samples).any()):
        return None
    keep = (first & (rank <= num_samples)).flatten().index_select(0, perm)  # in sorted order
    kept = sorted_keys[keep].long().view(num_rows, num_samples)  # ascending within each row
    return kept - row_offset


# --------------------------------------------------------------------------------------------------
# Coordinates and trilinear point sampling


def voxel_coords(indices: Tensor, grid_shape: tuple[int, int, int]) -> Tensor:
    """Flat GT voxel indices -> normalised ``(x, y, z)`` coordinates ``(i/(X-1), j/(Y-1), k/(Z-1))``.

    Args:
        indices: int64 ``[...]`` flat indices into ``grid_shape`` (row-major, z fastest).

    Returns:
        float32 ``[..., 3]`` in [0, 1]. An axis of size 1 maps to 0 (the release divides by zero there).
    """
    _, size_y, size_z = grid_shape
    quotient = torch.div(indices, size_z, rounding_mode="floor")
    k = indices - quotient * size_z
    i = torch.div(quotient, size_y, rounding_mode="floor")
    j = quotient - i * size_y
    coords = torch.stack([i, j, k], dim=-1).float()  # [..., 3]
    scale = torch.tensor([max(s - 1, 1) for s in grid_shape], dtype=torch.float32, device=indices.device)
    return coords / scale


def point_sample_3d(volume: Tensor, coords: Tensor) -> Tensor:
    """Trilinear samples of ``volume`` at normalised ``(x, y, z)`` points, ``align_corners=True``.

    Args:
        volume: ``[N, C, X0, Y0, Z0]``.
        coords: ``[N, P, 3]`` in [0, 1], ordered like the volume's axes ``(x, y, z)``.

    Returns:
        ``[N, C, P]``: coordinate 0 hits the first voxel of an axis and 1 its last one.
    """
    # grid_sample's grid is (W, H, D) = (z, y, x) for a [N, C, D=X0, H=Y0, W=Z0] input: reverse the
    # coordinate order here and only here, so the last coordinate indexes the last axis.
    grid = coords.flip(-1).to(volume.dtype) * 2.0 - 1.0  # [N, P, 3] in [-1, 1]
    samples = F.grid_sample(volume, grid[:, :, None, None, :], mode="bilinear", align_corners=True)
    return samples[:, :, :, 0, 0]  # [N, C, P, 1, 1] -> [N, C, P]


@torch.no_grad()
def importance_sample_points(
    groups: VoxelGroups,
    row_logits: Tensor,
    candidate_weights: Tensor,
    random_weights: Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Points for the mask losses of R prediction rows of one sample (released uncertainty sampling).

    1. ``int(num_points * oversample_ratio)`` distinct candidates per row with ``candidate_weights``;
    2. each row's logits at its candidates (trilinear; a direct gather if the logits are at GT size);
    3. keep the ``int(importance_sample_ratio * num_points)`` most uncertain (smallest ``|logit|``);
    4. append the remaining points, drawn independently with ``random_weights`` (they may repeat
       points of step 3, as released).

    Args:
        row_logits: ``[R, X0, Y0, Z0]`` mask logits of the rows (only read).
        candidate_weights, random_weights: ``[R, num_groups]`` group weights per row.

    Returns:
        int64 ``[R, num_points]`` flat GT voxel indices: the uncertain points first, then the random ones.
    """
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if not (num_candidates >= num_uncertain >= 0 and num_random >= 0):
        raise ValueError(
            f"need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, got {oversample_ratio} "
            f"and {importance_sample_ratio}"
        )
    candidates = sample_without_replacement(groups, candidate_weights, num_candidates, generator=generator)
    if tuple(row_logits.shape[-3:]) == groups.grid_shape:
        candidate_logits = row_logits.flatten(1).gather(1, candidates)  # [R, M]
    else:
        coords = voxel_coords(candidates, groups.grid_shape)  # [R, M, 3]
        candidate_logits = point_sample_3d(row_logits[:, None].float(), coords)[:, 0]  # [R, M]
    most_uncertain = (-candidate_logits.abs()).topk(num_uncertain, dim=1).indices  # [R, num_uncertain]
    points = candidates.gather(1, most_uncertain)
    if num_random > 0:
        random = sample_without_replacement(groups, random_weights, num_random, generator=generator)
        points = torch.cat([points, random], dim=1)
    return points


# --------------------------------------------------------------------------------------------------
# Match costs and assignment


def classification_cost(cls_logits: Tensor, gt_labels: Tensor, weight: float = 2.0) -> Tensor:
    """``-weight * softmax(cls_logits)[:, gt_labels]``: ``[Q, C+1]``, ``[G]`` -> ``[Q, G]``."""
    return -weight * cls_logits.float().softmax(-1)[:, gt_labels]


def mask_bce_cost(point_logits: Tensor, point_targets: Tensor, weight: float = 5.0) -> Tensor:
    """Mean over points of sigmoid BCE between every query and every GT: ``[Q, P]``, ``[G, P]`` -> ``[Q, G]``.

    ``sum_p BCE(x,1) t + BCE(x,0) (1-t) = sum_p softplus(x) - sum_p x t`` since ``BCE(x,1) - BCE(x,0) = -x``:
    one ``[Q, P]`` elementwise pass and one matrix product.
    """
    logits = point_logits.float()
    targets = point_targets.float()
    cost = F.softplus(logits).sum(1, keepdim=True) - logits @ targets.T  # [Q, G]
    return weight * cost / logits.shape[1]


def mask_dice_cost(
    point_logits: Tensor, point_targets: Tensor, weight: float = 5.0, eps: float = 1.0
) -> Tensor:
    """Naive dice cost ``1 - (2 sum s t + eps) / (sum s + sum t + eps)``, ``s = sigmoid(x)``: ``[Q, G]``."""
    probs = point_logits.float().sigmoid()
    targets = point_targets.float()
    numerator = 2.0 * probs @ targets.T + eps  # [Q, G]
    denominator = probs.sum(1)[:, None] + targets.sum(1)[None, :] + eps
    return weight * (1.0 - numerator / denominator)


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of ``cost`` ``[Q, G]`` (scipy, on the host).

    Returns:
        (query indices, GT indices): int64 ``[min(Q, G)]`` each on ``cost.device``, sorted by query.
    """
    matrix = cost.detach().float().cpu().numpy()
    if not np.isfinite(matrix).all():
        raise ValueError("matching cost has non-finite entries; are the class and mask logits finite?")
    rows, cols = linear_sum_assignment(matrix)
    return (
        torch.as_tensor(rows, dtype=torch.long, device=cost.device),
        torch.as_tensor(cols, dtype=torch.long, device=cost.device),
    )
