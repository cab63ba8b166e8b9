"""Trilinear ``align_corners=True`` upsampling along one axis, grouped by low-resolution cell.

Output index ``x`` samples the source coordinate ``x * (in - 1) / (out - 1)`` (computed in float32,
as PyTorch does for float32 tensors); it lies in cell ``c = floor(x_src)`` (the last index belongs to
the last cell, with weight 1), between low-resolution indices ``c`` and ``c + 1``, with weight
``x_src - c`` on the upper one. Outputs of one cell are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AxisMap:
    """Output index -> low-res cell and weight along one axis, and cell -> its output indices."""

    in_size: int
    out_size: int
    cell: torch.Tensor  # [out] int64: cell c covers low-res indices (lower[c], upper[c])
    lam: torch.Tensor  # [out] float32: weight of the cell's upper corner
    lower: torch.Tensor  # [nc] int64
    upper: torch.Tensor  # [nc] int64
    start: torch.Tensor  # [nc] int64: first output index in the cell
    count: torch.Tensor  # [nc] int64: number of output indices in the cell (0 when downsampling)
    lam_lo: torch.Tensor  # [nc] float32: smallest weight of the cell's outputs (sub-box bound)
    lam_hi: torch.Tensor  # [nc] float32: largest weight

    @property
    def num_cells(self) -> int:
        return self.lower.numel()


def axis_map(in_size: int, out_size: int, device: torch.device) -> AxisMap:
    """The map of one axis (in_size >= 1 low-res samples, out_size >= 1 outputs)."""
    num_cells = max(in_size - 1, 1)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = torch.tensor(scale, dtype=torch.float32, device=device) * torch.arange(
        out_size, dtype=torch.float32, device=device
    )  # [out]
    cell = src.floor().long().clamp(0, num_cells - 1)
    lam = (src - cell.float()).clamp(0.0, 1.0) if in_size > 1 else torch.zeros_like(src)
    lower = torch.arange(num_cells, device=device)
    upper = (lower + 1).clamp(max=in_size - 1)
    count = torch.bincount(cell, minlength=num_cells)
    start = torch.cumsum(count, 0) - count  # cells are monotone in the output index
    lam_lo = torch.ones(num_cells, device=device).scatter_reduce(0, cell, lam, "amin", include_self=False)
    lam_hi = torch.zeros(num_cells, device=device).scatter_reduce(0, cell, lam, "amax", include_self=False)
    empty = count == 0
    lam_lo = torch.where(empty, torch.zeros_like(lam_lo), lam_lo)
    lam_hi = torch.where(empty, torch.ones_like(lam_hi), lam_hi)
    return AxisMap(in_size, out_size, cell, lam, lower, upper, start, count, lam_lo, lam_hi)
