"""Ground-truth-mask denoising (DN) queries of the SPOT-Occ head (spec 03, section 3).

During training the head prepends ``pad = scalar * max_num_gts`` DN queries to its matching queries.
DN slot ``g * max_num_gts + t`` of sample ``b`` stands for GT ``t`` of that sample (GTs as given by
:func:`spotocc.models.heads.targets.occupancy_to_class_masks`); slots ``t >= n_b`` of a sample with
fewer GTs are padding. A DN query's content is the label embedding of its (possibly label-noised)
class plus uniform noise; its cross-attention is restricted to the coarse cells its clean GT mask
touches (max-pooled to the memory level's grid).

Released behaviour kept here (the head decides where it applies): the released code also draws a
voxel-flip noise for the GT masks and then never uses it; that dead draw is not reproduced (it only
consumed random numbers). Batch > 1 works: padded slots are reported in ``query_padding_mask`` so
that attention and SPOT-CA's query-axis normalisation can ignore them, and everything is created on
the device of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DenoisingQueries:
    """The DN part of one training batch.

    Attributes:
        content: [B, pad, C] DN query content (zero at padded slots).
        self_attn_mask: [pad + Q, pad + Q] bool, True = may not attend (shared by the batch).
        query_padding_mask: [B, pad + Q] bool, True = padded DN slot (no GT behind it).
        labels: per sample, the clean GT labels [n_b] (targets; slot layout as above).
        meta: ``{"pad_size", "scalar", "max_num_gts", "num_gts_list"}`` for the criterion.
    """

    content: torch.Tensor
    self_attn_mask: torch.Tensor
    query_padding_mask: torch.Tensor
    labels: list[torch.Tensor]
    meta: dict


def denoising_self_attn_mask(
    *, max_num_gts: int, scalar: int, num_queries: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[pad + Q, pad + Q] bool self-attention mask, True = blocked (DN queries come first).

    DN groups do not see each other (only matters for ``scalar > 1``); matching queries do not see any
    DN query; DN queries see their own group and every matching query.
    """
    pad = scalar * max_num_gts
    total = pad + num_queries
    group = torch.arange(pad, device=device) // max(max_num_gts, 1)  # [pad] group of each DN slot
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:pad, :pad] = group[:, None] != group[None, :]
    mask[pad:, :pad] = True
    return mask


def denoising_query_padding_mask(
    num_gts_list: list[int], *, scalar: int, num_queries: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[B, pad + Q] bool, True at DN slots ``g * max_num_gts + t`` with ``t >= n_b`` (no GT)."""
    max_num_gts = max(num_gts_list)
    pad = scalar * max_num_gts
    slot_gt = torch.arange(pad, device=device) % max(max_num_gts, 1)  # [pad] GT index of each slot
    num_gts = torch.as_tensor(num_gts_list, device=device)
    padded_dn = slot_gt[None, :] >= num_gts[:, None]  # [B, pad]
    matching = torch.zeros(len(num_gts_list), num_queries, dtype=torch.bool, device=device)
    return torch.cat([padded_dn, matching], dim=1)


def build_denoising_queries(
    gt_labels: list[torch.Tensor],
    label_embed: nn.Embedding,
    *,
    num_queries: int,
    num_classes: int,
    scalar: int,
    noise_scale: float,
    label_noise_ratio: float,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """DN queries for a batch, or None when no sample has a GT (or ``scalar == 0``): no DN then.

    Per sample, in order (so a batch draws the same random numbers as its samples run one after
    another): each of the ``scalar * n_b`` repeated labels is replaced with probability
    ``label_noise_ratio`` by a uniform class in ``[0, num_classes)`` (the targets stay clean), then
    ``content = label_embed(labels) + U[-noise_scale, noise_scale)``.

    Args:
        gt_labels: per sample, int64 GT class ids [n_b] (ascending, from ``occupancy_to_class_masks``).
        label_embed: the head's DN label embedding (``num_classes`` rows).
        num_queries: matching queries that follow the DN slots.
        generator: optional RNG for the noise.
    """
    if scalar < 0:
        raise ValueError(f"build_denoising_queries: scalar must be >= 0, got {scalar}")
    num_gts_list = [int(labels.numel()) for labels in gt_labels]
    max_num_gts = max(num_gts_list, default=0)
    if max_num_gts == 0 or scalar == 0:
        return None
    weight = label_embed.weight
    device = weight.device
    batch, pad = len(gt_labels), scalar * max_num_gts
    content = weight.new_zeros(batch, pad, weight.shape[1])  # [B, pad, C]
    for b, labels in enumerate(gt_labels):
        num_gts = num_gts_list[b]
        if num_gts == 0:
            continue
        noisy = labels.to(device=device, dtype=torch.long).repeat(scalar)  # [scalar * n_b]
        if label_noise_ratio > 0:
            flip = torch.rand(noisy.shape, device=device, generator=generator) < label_noise_ratio
            random_labels = torch.randint(
                0, num_classes, (int(flip.sum()),), device=device, generator=generator
            )
            noisy = noisy.masked_scatter(flip, random_labels)
        features = label_embed(noisy)  # [scalar * n_b, C]
        if noise_scale > 0:
            uniform = torch.rand(features.shape, device=device, dtype=features.dtype, generator=generator)
            features = features + (uniform * 2 - 1.0) * noise_scale
        slots = (
            torch.arange(scalar, device=device)[:, None] * max_num_gts + torch.arange(num_gts, device=device)
        ).flatten()  # [scalar * n_b], group-major like the repeated labels
        content = content.index_put((torch.full_like(slots, b), slots), features)
    meta = {"pad_size": pad, "scalar": scalar, "max_num_gts": max_num_gts, "num_gts_list": num_gts_list}
    return DenoisingQueries(
        content=content,
        self_attn_mask=denoising_self_attn_mask(
            max_num_gts=max_num_gts, scalar=scalar, num_queries=num_queries, device=device
        ),
        query_padding_mask=denoising_query_padding_mask(
            num_gts_list, scalar=scalar, num_queries=num_queries, device=device
        ),
        labels=[labels.to(device=device, dtype=torch.long) for labels in gt_labels],
        meta=meta,
    )


def pool_class_masks(masks: torch.Tensor, level_size: tuple[int, int, int]) -> torch.Tensor:
    """Max-pool GT-resolution binary masks to a memory level's grid: True where a cell holds a GT voxel.

    Same result as the released ``max_pool3d(masks, kernel = stride = gt_size // level_size)``: cells
    are ``stride``-sized blocks from the origin and voxels beyond the last whole block are dropped. If
    that pooling would give more cells than the level has (a GT size that is not a multiple), the
    extra trailing cells are cropped (the released code would fail there).

    Args:
        masks: bool [G, X, Y, Z] at GT resolution.
        level_size: (x, y, z) of the memory level; each must divide into the GT size at least once.

    Returns:
        bool [G, x, y, z].
    """
    if masks.dim() != 4:
        raise ValueError(f"pool_class_masks: masks must be [G, X, Y, Z], got shape {tuple(masks.shape)}")
    gt_size = masks.shape[1:]
    strides = [g // l for g, l in zip(gt_size, level_size)]
    if min(strides) < 1:
        raise ValueError(
            f"pool_class_masks: GT grid {tuple(gt_size)} is coarser than level {tuple(level_size)}"
        )
    (sx, sy, sz), (lx, ly, lz) = strides, level_size
    cropped = masks[:, : lx * sx, : ly * sy, : lz * sz].bool()
    blocks = cropped.reshape(masks.shape[0], lx, sx, ly, sy, lz, sz)  # [G, x, sx, y, sy, z, sz]
    return blocks.any(dim=6).any(dim=4).any(dim=2)  # [G, x, y, z]


def denoising_cross_attn_mask(
    pooled_masks: list[torch.Tensor], *, max_num_gts: int, scalar: int, num_queries: int
) -> torch.Tensor:
    """[B, pad + Q, K] bool cross-attention mask, True = may not attend.

    DN slot ``g * max_num_gts + t`` may attend to the cells of GT ``t``'s pooled mask; padded slots are
    blocked everywhere (SPOT-CA then gives them a zero aggregate); matching queries are never masked.

    Args:
        pooled_masks: per sample, bool [n_b, x, y, z] from :func:`pool_class_masks`.
    """
    if not pooled_masks:
        raise ValueError("denoising_cross_attn_mask: empty batch")
    num_keys = math.prod(pooled_masks[0].shape[1:])
    device = pooled_masks[0].device
    pad = scalar * max_num_gts
    rows = []
    for pooled in pooled_masks:
        allowed = torch.zeros(max_num_gts, num_keys, dtype=torch.bool, device=device)  # [n_max, K]
        allowed[: pooled.shape[0]] = pooled.flatten(1)
        dn_rows = ~allowed.repeat(scalar, 1)  # [pad, K]
        matching_rows = torch.zeros(num_queries, num_keys, dtype=torch.bool, device=device)
        rows.append(torch.cat([dn_rows, matching_rows], dim=0))
    mask = torch.stack(rows, dim=0)  # [B, pad + Q, K]
    assert mask.shape[1] == pad + num_queries
    return mask
