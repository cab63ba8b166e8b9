"""The reference of ``occupancy_labels(method="direct")``: the formula evaluated at every output voxel.

One slab of output rows at a time, so that no intermediate exceeds ``chunk_bytes``.
"""

from __future__ import annotations

import torch

from spotocc.models.labels.axis import AxisMap


def _lerp_axis(volume: torch.Tensor, dim: int, m: AxisMap, outs: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at the output indices ``outs``."""
    cells = m.cell[outs]
    a = volume.index_select(dim, m.lower[cells])
    b = volume.index_select(dim, m.upper[cells])
    shape = [1] * volume.dim()
    shape[dim] = -1
    return torch.lerp(a, b, m.lam[outs].view(shape))


def direct_labels(
    p: torch.Tensor, logits: torch.Tensor, maps: tuple[AxisMap, ...], out: torch.Tensor, chunk_bytes: int
) -> None:
    """Write the direct formula's argmax into ``out`` [X', Y', Z'], tiling output x (and y) rows."""
    num_queries = p.shape[0]
    mx, my, mz = maps
    row_bytes = 4 * num_queries * my.out_size * mz.out_size  # one output x-row of upsampled logits
    rows = max(1, chunk_bytes // row_bytes)
    cols = my.out_size if rows > 1 else max(1, chunk_bytes // (4 * num_queries * mz.out_size))
    device = p.device
    for x0 in range(0, mx.out_size, rows):
        xs = torch.arange(x0, min(x0 + rows, mx.out_size), device=device)
        slab = _lerp_axis(logits, 1, mx, xs)  # [Q, r, Y, Z]
        for y0 in range(0, my.out_size, cols):
            ys = torch.arange(y0, min(y0 + cols, my.out_size), device=device)
            tile = _lerp_axis(_lerp_axis(slab, 2, my, ys), 3, mz, torch.arange(mz.out_size, device=device))
            scores = p.t() @ torch.sigmoid_(tile).reshape(num_queries, -1)  # [C, r * y * Z']
            out[x0 : x0 + xs.numel(), y0 : y0 + ys.numel()] = scores.argmax(dim=0).view(
                xs.numel(), ys.numel(), mz.out_size
            )
