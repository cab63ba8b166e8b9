"""Ground-truth occupancy -> per-class binary masks (the targets of mask classification)."""

from __future__ import annotations

import torch

from spotocc.data.classes import IGNORE_INDEX


def occupancy_to_class_masks(gt_occ: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target per class present in one sample's grid, as released (semantic, not instance).

    Args:
        gt_occ: integer labels [X, Y, Z]; ``IGNORE_INDEX`` (255) is skipped, class 0 (empty) is a
            regular target.
        num_classes: classes including the empty class; larger label values are ignored too.

    Returns:
        labels: int64 [G], ascending class ids present in the grid.
        masks: bool [G, X, Y, Z], ``masks[g] = (gt_occ == labels[g])``.
    """
    if gt_occ.dim() != 3:
        raise ValueError(f"gt_occ must be [X, Y, Z], got shape {tuple(gt_occ.shape)}")
    values = torch.unique(gt_occ.long())  # sorted ascending
    labels = values[(values < num_classes) & (values != IGNORE_INDEX)]
    masks = gt_occ.long().unsqueeze(0) == labels.view(-1, 1, 1, 1)  # [G, X, Y, Z]
    return labels, masks
