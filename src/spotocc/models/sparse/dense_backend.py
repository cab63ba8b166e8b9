"""The dense backend of the sparse convs: scatter to a zero-filled grid, ``conv3d``, read the active sites.

The same function as the reference backend (the inactive sites hold zeros, so they add nothing), with
the same output sites in the same row-major order:

- submanifold: ``conv3d`` with the kernel centred, read at the input's sites;
- regular: ``conv3d``; a site is active iff its receptive field holds an active input (a ``conv3d`` of
  the occupancy with a kernel of ones);
- transposed: ``conv_transpose3d``, active sites likewise.

It pays for every site of the grid, active or not, which pays off where most of the grid is active:
after the encoder's completion layers the first level of ``synthetic_tiny`` (and of the nuScenes
presets at input density 0.4) is more than 99% active (``benchmarks/bench_sparse.py``). ``auto``
never picks it: the reference backend stays the CPU default and the oracle for spconv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from spotocc.models.sparse.reference import Int3, autocast_off, linear_keys

if TYPE_CHECKING:
    from spotocc.models.sparse.conv import SparseTensor


def dense_conv(
    x: SparseTensor, weight: Tensor, kernel: Int3, stride: Int3, padding: Int3, kind: str
) -> tuple[Tensor, Tensor, Int3]:
    """Output (features [M, C_out], indices [M, 4] int32, spatial shape) of one conv of ``kind`` on ``x``;
    ``weight`` in spconv's layout [C_out, kx, ky, kz, C_in]."""
    if kind not in ("subm", "regular", "transposed"):
        raise ValueError(f"dense_conv: unknown conv kind {kind!r}")
    with autocast_off(x.features.device):  # the features' dtype, as in the other backends
        volume = x.dense()  # [B, C_in, X, Y, Z]
        w = weight.to(x.features.dtype)
        if kind == "subm":
            out = F.conv3d(volume, w.permute(0, 4, 1, 2, 3), padding=tuple(k // 2 for k in kernel))
            indices = x.indices
        else:
            occupied = x.replace_feature(x.features.new_ones(x.num_active, 1)).dense()  # [B, 1, X, Y, Z]
            ones = occupied.new_ones(1, 1, *kernel)
            if kind == "regular":
                out = F.conv3d(volume, w.permute(0, 4, 1, 2, 3), stride=stride, padding=padding)
                reached = F.conv3d(occupied, ones, stride=stride, padding=padding)
            else:
                out = F.conv_transpose3d(volume, w.permute(4, 0, 1, 2, 3), stride=stride, padding=padding)
                reached = F.conv_transpose3d(occupied, ones, stride=stride, padding=padding)
            indices = (reached[:, 0] > 0.5).nonzero().to(torch.int32)  # [M, 4], row-major order
        out_shape = tuple(int(n) for n in out.shape[2:])
        idx = indices.long()
        rows = linear_keys(idx[:, 1:], out_shape, batch=idx[:, 0])  # [M] rows of a channels-last grid
        features = out.permute(0, 2, 3, 4, 1).reshape(-1, out.shape[1]).index_select(0, rows)  # [M, C_out]
    return features, indices, out_shape
