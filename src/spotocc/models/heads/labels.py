"""Full-resolution occupancy labels from a mask-classification head's low-resolution outputs.

The released inference (spec 03 section 2.5, spec 04 section 3.1) labels every output voxel v with

    label(v) = argmax_c  sum_q p[q, c] * sigmoid(up(L_q)(v))

where ``p`` are the per-query class probabilities without the no-object column, ``L_q`` a query's
mask logits on the finest feature grid and ``up`` trilinear upsampling with ``align_corners=True``.
Evaluated literally this needs the [Q, X', Y', Z'] volume (4 GB for nuScenes) and costs more than the
rest of the model. ``occupancy_labels(method="bounded")`` returns the same labels and evaluates the
formula only near class boundaries. Each output voxel belongs to one low-resolution cell
[floor(x_src), floor(x_src) + 1] per axis (x_src = x_out * (in - 1) / (out - 1)), and inside a cell
trilinear interpolation is a convex combination of the cell's 8 corner logits:

1. Every cell: each query's logit lies between its corners' min and max; sigmoid is monotone and
   ``p >= 0``, so every class score lies in an interval. A cell whose best lower bound beats every
   other class's upper bound by a float-error margin is labelled whole.
2. Undecided cells: tighter bounds over the box spanned by the cell's output voxels only (3/4 of the
   cell per axis for 128 -> 512), and the class with the best lower bound ("lead") is compared with
   each other class pairwise, ``sum_q (p_qa - p_qc) s_q``, so queries weighing both alike cancel.
   Classes the lead provably beats drop out; if none is left the cell is labelled whole.
3. Still undecided: per voxel, only the few queries whose sigmoid varies in the cell and that
   separate the remaining classes are evaluated exactly; the others stay bounded pairwise. Voxels
   this cannot decide (within the bounds' width of a tie) get the formula with every query, from a
   gather of their 8 corner rows.

Voxels are evaluated in dense batches of cells with equal voxel counts per axis (no per-voxel Python
and no per-cell loops), and every chunked intermediate stays under ``chunk_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

METHODS = ("bounded", "direct")
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def class_probs_from_logits(cls_logits: torch.Tensor) -> torch.Tensor:
    """Released per-query class probabilities: softmax over the C+1 logits, no-object column dropped.

    Args:
        cls_logits: [B, Q, C+1], the last logit is "no object".

    Returns:
        [B, Q, C] probabilities in float32 (float64 if given float64), not renormalised.
    """
    if cls_logits.dim() != 3 or cls_logits.shape[-1] < 2:
        raise ValueError(f"cls_logits must be [B, Q, C+1] with C >= 1, got shape {tuple(cls_logits.shape)}")
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    return cls_logits.to(dtype).softmax(dim=-1)[..., :-1]


def occupancy_labels(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size: tuple[int, int, int],
    method: str = "bounded",
    *,
    chunk_bytes: int | None = None,
    num_contenders: int = 4,
    num_exact_queries: int = 8,
    margin: float | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Labels ``argmax_c sum_q p[q,c] * sigmoid(trilinear_up(mask_logits[q]))`` at ``out_size``.

    Args:
        class_probs: [B, Q, C] per-query class probabilities (see ``class_probs_from_logits``).
        mask_logits: [B, Q, X, Y, Z] mask logits on the low-resolution grid.
        out_size: (X', Y', Z') output grid; upsampling is trilinear with ``align_corners=True``.
        method: ``"bounded"`` (exact, fast) or ``"direct"`` (the formula evaluated voxel by voxel in
            chunks; the reference).
        chunk_bytes: bound on the size of the largest chunked intermediate tensor (default 16 MiB on
            CPU, where small chunks stay in cache, and 256 MiB on other devices).
        num_contenders: classes compared per ambiguous cell ("bounded" only); a cell where more
            classes can still win is evaluated exactly.
        num_exact_queries: queries evaluated per voxel in ambiguous cells ("bounded" only); the others
            stay bounded, and voxels where that is not enough are evaluated with all queries.
        margin: certify a label only if its score provably beats the others' by more than this; by
            default a bound on the float32 rounding error of the scores.
        stats: if given, cleared and filled ("bounded" only) with counts summed over the batch:
            ``cells``, ``cells_certified_coarse`` (stage 1), ``cells_certified_refined`` (stage 2),
            ``cells_exact`` (more than ``num_contenders`` classes in contention), ``voxels``,
            ``voxels_refined`` (stage 3) and ``voxels_exact`` (evaluated with every query).

    Returns:
        int64 labels [B, X', Y', Z']; ties go to the lowest class index, as ``torch.argmax``. Inputs
        of any float dtype are computed in float32.
    """
    if chunk_bytes is None:
        chunk_bytes = 16 * 2**20 if mask_logits.device.type == "cpu" else 256 * 2**20
    probs, logits, out_size = _checked_inputs(class_probs, mask_logits, out_size, method, chunk_bytes)
    if margin is not None and not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if num_contenders < 2 or num_exact_queries < 1:
        raise ValueError(
            f"num_contenders must be >= 2 and num_exact_queries >= 1, "
            f"got {num_contenders} and {num_exact_queries}"
        )
    batch, num_queries, num_classes = probs.shape
    if num_queries == 0:  # every score is 0: argmax is class 0
        return torch.zeros((batch, *out_size), dtype=torch.long, device=probs.device)
    labels = torch.empty((batch, *out_size), dtype=torch.long, device=probs.device)  # every voxel is written
    maps = tuple(_axis_map(n, m, probs.device) for n, m in zip(logits.shape[2:], out_size))
    if stats is not None:
        stats.clear()
    for b in range(batch):
        p = probs[b].float()  # [Q, C]
        volume = logits[b].float()  # [Q, X, Y, Z]
        if method == "direct":
            _direct_labels(p, volume, maps, labels[b], chunk_bytes)
        else:
            sample_margin = _rounding_margin(p, volume) if margin is None else float(margin)
            solver = _BoundedSolver(
                p=p,
                logits=volume,
                maps=maps,
                out=labels[b],
                chunk_bytes=chunk_bytes,
                num_contenders=min(num_contenders, num_classes),
                num_exact_queries=min(num_exact_queries, num_queries),
                margin=sample_margin,
            )
            solver.run()
            if stats is not None:
                for key, value in solver.stats.items():
                    stats[key] = stats.get(key, 0) + value
    return labels


def _checked_inputs(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size: tuple[int, int, int],
    method: str,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if class_probs.dim() != 3 or not class_probs.is_floating_point():
        raise ValueError(
            f"class_probs must be a float [B, Q, C] tensor, got {class_probs.dtype} "
            f"{tuple(class_probs.shape)}"
        )
    if mask_logits.dim() != 5 or not mask_logits.is_floating_point():
        raise ValueError(
            f"mask_logits must be a float [B, Q, X, Y, Z] tensor, got {mask_logits.dtype} "
            f"{tuple(mask_logits.shape)}"
        )
    if class_probs.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"class_probs [B, Q, C] {tuple(class_probs.shape)} and mask_logits [B, Q, X, Y, Z] "
            f"{tuple(mask_logits.shape)} disagree on B or Q"
        )
    if class_probs.shape[2] < 1 or min(mask_logits.shape[2:]) < 1:
        raise ValueError(
            f"need C >= 1 classes and a non-empty grid, got class_probs "
            f"{tuple(class_probs.shape)}, mask_logits {tuple(mask_logits.shape)}"
        )
    if class_probs.device != mask_logits.device:
        raise ValueError(f"class_probs on {class_probs.device} but mask_logits on {mask_logits.device}")
    out = tuple(int(s) for s in out_size)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"out_size must be three positive ints (X', Y', Z'), got {out_size!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if mask_logits.numel() and not math.isfinite(_largest_magnitude(mask_logits)):
        raise ValueError("mask_logits must be finite (found inf or NaN)")
    if class_probs.numel() and not 0.0 <= float(class_probs.min()) <= float(class_probs.max()) < math.inf:
        raise ValueError("class_probs must be finite non-negative probabilities")
    return class_probs, mask_logits, out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# One axis of align_corners=True linear interpolation, grouped by low-resolution cell.


@dataclass(frozen=True)
class _AxisMap:
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


def _axis_map(in_size: int, out_size: int, device: torch.device) -> _AxisMap:
    """One axis's map, with source coordinates as PyTorch computes them in float32 (x_out * scale)."""
    num_cells = max(in_size - 1, 1)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = torch.tensor(scale, dtype=torch.float32, device=device) * torch.arange(
        out_size, dtype=torch.float32, device=device
    )  # [out]
    cell = src.floor().long().clamp(0, num_cells - 1)
    # the last output lies on the last low-res index: its cell is the last one, with weight 1
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
    return _AxisMap(in_size, out_size, cell, lam, lower, upper, start, count, lam_lo, lam_hi)


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |x| in one pass without a temporary (NaN or inf if the tensor holds any)."""
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def _rounding_margin(p: torch.Tensor, logits: torch.Tensor) -> float:
    """Bound on the float32 error of a score difference (interpolation, sigmoid, sums over queries).

    Interpolated logits carry an error of a few ulps of the largest corner magnitude, sigmoid damps it
    by at most 1/4, and summing Q terms weighted by p adds up to Q ulps of the largest class total.
    A safety factor of 2 over that estimate keeps certification conservative.
    """
    num_queries = p.shape[0]
    largest_total = max(1.0, float(p.sum(dim=0).max()))
    largest_logit = _largest_magnitude(logits)
    return 4.0 * _FLOAT32_EPS * largest_total * (2.0 * largest_logit + num_queries + 2.0)


# --------------------------------------------------------------------------------------------------
# The reference: the formula evaluated at every output voxel, one slab of output rows at a time.


def _lerp_axis(volume: torch.Tensor, dim: int, m: _AxisMap, outs: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at the output indices ``outs``."""
    cells = m.cell[outs]
    a = volume.index_select(dim, m.lower[cells])
    b = volume.index_select(dim, m.upper[cells])
    shape = [1] * volume.dim()
    shape[dim] = -1
    return torch.lerp(a, b, m.lam[outs].view(shape))


def _direct_labels(
    p: torch.Tensor, logits: torch.Tensor, maps: tuple[_AxisMap, ...], out: torch.Tensor, chunk_bytes: int
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


# --------------------------------------------------------------------------------------------------
# The bounded method.


class _Workspace:
    """Buffers reused across chunks for a call's largest temporaries.

    A fresh multi-megabyte CPU allocation is usually handed back to the OS when freed, so every
    chunk would page-fault its temporaries in again (a third of the bounded method's time here).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of ``shape``; the previous contents of ``name`` become invalid."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)


@dataclass(frozen=True)
class _Block:
    """Cells whose output voxels form equally shaped [nx, ny, nz] blocks, evaluated as one batch."""

    positions: torch.Tensor  # [n] int64: index of each cell in the caller's list of cells
    cells: torch.Tensor  # [n] int64 flat cell ids
    ox: torch.Tensor  # [n, nx] int64 output x index of each cell's voxels
    oy: torch.Tensor  # [n, ny]
    oz: torch.Tensor  # [n, nz]
    tx: torch.Tensor  # [n, nx] float32 weight of the upper corner
    ty: torch.Tensor  # [n, ny]
    tz: torch.Tensor  # [n, nz]

    def flat(self, out_size: tuple[int, int, int]) -> torch.Tensor:
        """Flat output indices [n, V] (V = nx * ny * nz, x-major)."""
        _, ys, zs = out_size
        flat = (self.ox[:, :, None, None] * ys + self.oy[:, None, :, None]) * zs + self.oz[:, None, None, :]
        return flat.view(self.cells.numel(), -1)

    def coords(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output (x, y, z) indices of the voxels where ``mask`` [n, V] is true."""
        ny, nz = self.oy.shape[1], self.oz.shape[1]
        cell, voxel = mask.nonzero().unbind(1)
        return (
            self.ox[cell, voxel // (ny * nz)],
            self.oy[cell, (voxel // nz) % ny],
            self.oz[cell, voxel % nz],
        )

    def interpolate(self, corners: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
        """Trilinear values [n, V, J] at the voxels from cell corner values [n, 2, 2, 2, J]."""
        n, j = corners.shape[0], corners.shape[-1]
        nx, ny, nz = self.tx.shape[1], self.ty.shape[1], self.tz.shape[1]
        v = torch.lerp(
            corners[:, :, :, :1],
            corners[:, :, :, 1:],
            self.tz.view(n, 1, 1, nz, 1),
            out=workspace.get("lerp_z", (n, 2, 2, nz, j)),
        )
        v = torch.lerp(
            v[:, :, :1],
            v[:, :, 1:],
            self.ty.view(n, 1, ny, 1, 1),
            out=workspace.get("lerp_y", (n, 2, ny, nz, j)),
        )
        v = torch.lerp(
            v[:, :1], v[:, 1:], self.tx.view(n, nx, 1, 1, 1), out=workspace.get("lerp_x", (n, nx, ny, nz, j))
        )
        return v.view(n, -1, j)


@dataclass(frozen=True)
class _CellSummary:
    """What the per-voxel stage needs of a cell: a few queries' corners and weights, a bound on the rest."""

    cells: torch.Tensor  # [n] flat cell ids
    contenders: torch.Tensor  # [n, k] classes that may win
    chosen_corners: torch.Tensor  # [n, 2, 2, 2, ks] corner logits of the queries evaluated exactly
    weights: torch.Tensor  # [n, ks, k] their class probabilities ([n, ks, 1]: p_0 - p_1 when k == 2)
    rest_bound: torch.Tensor  # [n, k, k] lower bound of the other queries' part of score_a - score_b

    @staticmethod
    def concatenate(parts: list[_CellSummary]) -> _CellSummary:
        names = [f.name for f in fields(_CellSummary)]
        return _CellSummary(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names})


class _BoundedSolver:
    """Labels of one sample by interval bounds per cell, refined only where the bounds cannot decide."""

    def __init__(
        self,
        *,
        p: torch.Tensor,
        logits: torch.Tensor,
        maps: tuple[_AxisMap, ...],
        out: torch.Tensor,
        chunk_bytes: int,
        num_contenders: int,
        num_exact_queries: int,
        margin: float,
    ) -> None:
        self.p = p  # [Q, C]
        self.logits = logits  # [Q, X, Y, Z]
        self.maps = maps
        self.out = out  # [X', Y', Z'] int64, written in place
        self.out_flat = out.view(-1)
        self.out_size = tuple(out.shape)
        self.chunk_bytes = chunk_bytes
        self.num_contenders = num_contenders
        self.num_exact_queries = num_exact_queries
        self.margin = margin
        self.num_queries, self.num_classes = p.shape
        self.grid = tuple(logits.shape[1:])
        self.cells_shape = tuple(m.num_cells for m in maps)
        self.device = p.device
        self.rows = torch.empty(0)  # [X*Y*Z, Q] logits per low-res voxel, built when first needed
        self.workspace = _Workspace(p.device)
        # Chunk sizes count the largest tensor of a step (the others are smaller or few).
        # voxels per batch of the all-query evaluation: [v, 8, Q] corners
        self.exact_step = max(1, chunk_bytes // (32 * self.num_queries))
        self.exact_queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.exact_queued = 0
        self.voxel_queue: dict[int, list[_CellSummary]] = {}  # per number of contenders
        self.voxels_queued: dict[int, int] = {}
        self.cell_queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cells_queued = 0
        mx, my, mz = maps
        counts = (mx.count.view(-1, 1, 1), my.count.view(1, -1, 1), mz.count.view(1, 1, -1))
        self.voxels_per_cell = (counts[0] * counts[1] * counts[2]).view(-1)  # [cells]
        self.shape_key_per_cell = (
            (counts[0] * (my.out_size + 1) + counts[1]) * (mz.out_size + 1) + counts[2]
        ).view(-1)  # [cells]: equal for equal voxel counts per axis
        self.num_rivals = min(num_contenders, self.num_classes - 1)  # compared pairwise with the lead
        self.stats = {
            "cells": 0,
            "cells_certified_coarse": 0,
            "cells_certified_refined": 0,
            "cells_exact": 0,
            "voxels": out.numel(),
            "voxels_refined": 0,
            "voxels_exact": 0,
        }

    def run(self) -> None:
        cell_labels = self._coarse_cell_labels()  # [ncx, ncy, ncz], -1 = undecided
        self._fill_from_cells(cell_labels)
        undecided = (cell_labels.view(-1) < 0).nonzero().squeeze(1)  # flat cell ids
        undecided = undecided[self._cell_voxel_counts(undecided) > 0]  # cells without outputs need nothing
        # cells with equal voxel counts per axis next to each other: fewer, larger blocks later
        undecided = undecided[torch.sort(self._shape_key(undecided), stable=True).indices]
        self.stats["cells"] = cell_labels.numel()
        self.stats["cells_certified_coarse"] = cell_labels.numel() - int((cell_labels < 0).sum())
        if undecided.numel() == 0:
            return
        # One row of Q logits per low-res voxel: a cell's corners for every query are 8 row gathers.
        # (a 2-D transpose: torch copies those blockwise, twice as fast as the 4-D permute)
        self.rows = self.logits.reshape(self.num_queries, -1).t().contiguous()  # [X*Y*Z, Q]
        step = max(1, self.chunk_bytes // (32 * self.num_queries))  # [n, 8, Q] corners per chunk
        for start in range(0, undecided.numel(), step):
            self._refine_cells(undecided[start : start + step])
        for k in list(self.voxel_queue):
            self._flush_voxel_queue(k)
        self._flush_cell_labels()
        self._flush_exact_voxels()

    # ---- stage 1: every cell, interval bounds from its 8 corners ------------------------------------

    def _coarse_cell_labels(self) -> torch.Tensor:
        """Per cell: the label if the interval bounds over the 8 corners decide it, else -1."""
        mx, my, mz = self.maps
        q = self.num_queries
        _, ys, zs = self.grid
        cell_labels = torch.empty(self.cells_shape, dtype=torch.long, device=self.device)
        rows = max(1, self.chunk_bytes // (4 * q * ys * zs))
        pt = self.p.t()  # [C, Q]
        for x0 in range(0, mx.num_cells, rows):
            r = min(rows, mx.num_cells - x0)
            # sigmoid first (monotone: the min of sigmoids is the sigmoid of the min), on r + 1 planes
            planes = self.logits.narrow(1, x0, min(r + 1, mx.in_size))
            slab = torch.sigmoid(
                planes, out=self.workspace.get("slab", tuple(planes.shape))
            )  # [Q, r(+1), Y, Z]
            lo, hi = _min_max_along(slab, slab, 1, mx.in_size, self.workspace, "x")  # [Q, r, Y, Z]
            lo, hi = _min_max_along(lo, hi, 2, my.in_size, self.workspace, "y")  # [Q, r, ncy, Z]
            lo, hi = _min_max_along(lo, hi, 3, mz.in_size, self.workspace, "z")  # [Q, r, ncy, ncz]
            score_lo = pt @ lo.reshape(q, -1)  # [C, n]
            score_hi = pt @ hi.reshape(q, -1)
            winners = _interval_winner(score_lo, score_hi, self.margin)  # [n]
            cell_labels[x0 : x0 + r] = winners.view(r, *self.cells_shape[1:])
        return cell_labels

    def _fill_from_cells(self, cell_labels: torch.Tensor) -> None:
        """Broadcast cell labels to their output voxels: one (y, z) gather per cell row, then one
        gather of whole output x-rows straight into the output."""
        mx, my, mz = self.maps
        plane = my.out_size * mz.out_size
        by_yz = (my.cell.view(-1, 1) * mz.num_cells + mz.cell.view(1, -1)).view(-1)  # [Y' * Z']
        out_rows = self.out.view(mx.out_size, plane)
        starts, counts = mx.start.tolist(), mx.count.tolist()
        step = max(1, self.chunk_bytes // (8 * plane))  # cell rows per gather
        for c0 in range(0, mx.num_cells, step):
            c1 = min(c0 + step, mx.num_cells)
            x0, x1 = starts[c0], starts[c1 - 1] + counts[c1 - 1]
            if x1 == x0:
                continue
            rows = cell_labels[c0:c1].reshape(c1 - c0, -1).index_select(1, by_yz)  # [cell rows, Y' * Z']
            torch.index_select(rows, 0, mx.cell[x0:x1] - c0, out=out_rows[x0:x1])

    # ---- stage 2: undecided cells, tighter bounds and pairwise comparison ---------------------------

    def _refine_cells(self, cells: torch.Tensor) -> None:
        """Tighter bounds for a chunk of undecided cells; per-voxel work only where still needed."""
        k, m = self.num_contenders, self.num_rivals
        corners = self._gather_corners(cells, "cell_corners")  # [n, 2, 2, 2, Q]
        s_lo, s_hi = self._sub_box_sigmoid_bounds(cells, corners)  # [n, Q] each
        score_lo = s_lo @ self.p  # [n, C]
        lead = score_lo.argmax(dim=1, keepdim=True)  # [n, 1]: the class with the best lower bound
        others_hi = (s_hi @ self.p).scatter_(1, lead, -math.inf)  # [n, C]
        top_hi, rivals = others_hi.topk(min(m + 1, self.num_classes - 1), dim=1)  # by upper bound
        rivals = rivals[:, :m]  # [n, m]
        if top_hi.shape[1] > m:  # the classes after the m rivals must lose on interval bounds alone
            beyond_ok = top_hi[:, m] < score_lo.gather(1, lead).squeeze(1) - self.margin
        else:
            beyond_ok = torch.ones_like(lead.squeeze(1), dtype=torch.bool)
        # Lower bound of score_lead - score_rival: sum_q w_q mid_q - |w_q| half_q, w = p_lead - p_rival.
        mid, half = (s_lo + s_hi) * 0.5, (s_hi - s_lo) * 0.5
        score_mid = mid @ self.p  # [n, C]
        centre = score_mid.gather(1, lead) - score_mid.gather(1, rivals)  # [n, m]
        pt = self.p.t()  # [C, Q]
        n = cells.numel()
        weight = torch.index_select(
            pt, 0, rivals.reshape(-1), out=self.workspace.get("rivals", (n * m, pt.shape[1]))
        )
        weight = (
            weight.view(n, m, -1).sub_(pt.index_select(0, lead.squeeze(1)).unsqueeze(1)).abs_()
        )  # [n, m, Q]
        spread = torch.bmm(weight, half.unsqueeze(2)).squeeze(2)
        alive = centre - spread <= self.margin  # [n, m]: rivals that might beat the lead somewhere
        num_alive = alive.sum(dim=1)
        certified = beyond_ok & (num_alive == 0)
        self._queue_cell_labels(cells[certified], lead[certified].squeeze(1))
        self.stats["cells_certified_refined"] += int(certified.sum())

        exact = ~beyond_ok | (num_alive >= k)  # more than k classes may win: evaluate the cell exactly
        if bool(exact.any()):
            self.stats["cells_exact"] += int(exact.sum())
            self._exact_cells(cells[exact])
        # The rest, grouped by how many classes contend: the lead, then the rivals alive.
        todo = ~certified & ~exact
        ranked = rivals.gather(1, torch.sort(alive.byte(), dim=1, descending=True, stable=True).indices)
        for count in torch.unique(num_alive[todo]).tolist():
            group = (todo & (num_alive == count)).nonzero().squeeze(1)
            contenders = torch.cat((lead[group], ranked[group, :count]), dim=1)  # [g, count + 1]
            self._refine_voxels(cells[group], corners[group], mid[group], half[group], contenders)

    def _sub_box_sigmoid_bounds(
        self, cells: torch.Tensor, corners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid bounds [n, Q] over the box spanned by each cell's output voxels.

        A trilinear function takes its extremes over a box at the box's corners; the box spanned by
        the output voxels is often much smaller than the cell (3/4 of it per axis for 128 -> 512).
        """
        n = cells.numel()
        ends = []
        for m, c in zip(self.maps, self._unravel_cells(cells)):
            lam = torch.stack((m.lam_lo[c], m.lam_hi[c]), dim=1)  # [n, 2]: the box's two ends
            ends.append(torch.stack((1 - lam, lam), dim=2))  # [n, 2 (box end), 2 (cell corner)]
        weights = torch.einsum("nai,nbj,nck->nabcijk", *ends).reshape(n, 8, 8)  # box corner <- cell corner
        values = torch.bmm(
            weights, corners.view(n, 8, -1), out=self.workspace.get("box", (n, 8, self.num_queries))
        )
        return torch.sigmoid(values.amin(dim=1)), torch.sigmoid(values.amax(dim=1))

    # ---- stage 3: per voxel, a few queries exactly and the rest bounded -----------------------------

    def _refine_voxels(
        self,
        cells: torch.Tensor,
        corners: torch.Tensor,
        mid: torch.Tensor,
        half: torch.Tensor,
        contenders: torch.Tensor,
    ) -> None:
        """Per voxel: the queries that separate the contenders exactly, the others bounded pairwise.

        Args:
            cells: [n] flat cell ids; corners: their corner logits [n, 2, 2, 2, Q].
            mid, half: centre and half-width of each query's sigmoid range in the cell, [n, Q].
            contenders: [n, k] the classes that may win in each cell (all others provably lose).

        Only a compact summary per cell is kept (the chosen queries' corners and weights, the bound on
        the rest); it is queued per k and evaluated in large batches.
        """
        k = contenders.shape[1]
        step = max(1, self.chunk_bytes // (4 * self.num_queries * k * k))  # [n, k, k, Q] pairwise terms
        for start in range(0, cells.numel(), step):
            part = slice(start, start + step)
            summary = self._summarise_cells(
                cells[part], corners[part], mid[part], half[part], contenders[part]
            )
            queue = self.voxel_queue.setdefault(k, [])
            queue.append(summary)
            self.voxels_queued[k] = self.voxels_queued.get(k, 0) + int(
                self._cell_voxel_counts(summary.cells).sum()
            )
            if self.voxels_queued[k] >= 4 * self.voxel_step(k):  # a few full blocks per shape group
                self._flush_voxel_queue(k)

    def voxel_step(self, k: int) -> int:
        """Voxels per block of the per-voxel stage with k contenders: [v, ks] logits, [v, k, k] bounds."""
        return max(1, self.chunk_bytes // max(4 * self.num_exact_queries, 4 * k * k, 8))

    def _summarise_cells(
        self,
        cells: torch.Tensor,
        corners: torch.Tensor,
        mid: torch.Tensor,
        half: torch.Tensor,
        contenders: torch.Tensor,
    ) -> _CellSummary:
        n, k, ks = cells.numel(), contenders.shape[1], self.num_exact_queries
        p_k = self.p.t()[contenders]  # [n, k, Q]
        # A query matters if its sigmoid varies in the cell and the contenders weigh it differently.
        importance = half * (p_k.amax(dim=1) - p_k.amin(dim=1))  # [n, Q]
        chosen = importance.topk(ks, dim=1).indices  # [n, ks]
        rest = torch.ones_like(mid).scatter_(1, chosen, 0.0)
        rest_bound = _pairwise_lower_bound(p_k, mid * rest, half * rest)  # [n, k, k]
        weights = p_k.gather(2, chosen.unsqueeze(1).expand(n, k, ks)).transpose(1, 2)  # [n, ks, k]
        if k == 2:  # the common case: one score difference per voxel
            weights = weights[:, :, :1] - weights[:, :, 1:]  # [n, ks, 1]
        chosen_corners = corners.gather(4, chosen.view(n, 1, 1, 1, ks).expand(n, 2, 2, 2, ks))
        return _CellSummary(cells, contenders, chosen_corners, weights.contiguous(), rest_bound)

    def _flush_voxel_queue(self, k: int) -> None:
        queue = self.voxel_queue.pop(k, [])
        self.voxels_queued[k] = 0
        if not queue:
            return
        summary = _CellSummary.concatenate(queue)
        for block in self._blocks(summary.cells, self.chunk_bytes // self.voxel_step(k)):
            pos = block.positions
            sig = torch.sigmoid_(block.interpolate(summary.chosen_corners[pos], self.workspace))  # [b, V, ks]
            scores = torch.bmm(
                sig, summary.weights[pos]
            )  # [b, V, k], or [b, V, 1] = score_0 - score_1 if k == 2
            bound = summary.rest_bound[pos]  # [b, k, k]
            contenders = summary.contenders[pos]  # [b, k]
            if k == 2:
                diff = scores.squeeze(2)  # [b, V]
                first = diff > (self.margin - bound[:, 0, 1]).unsqueeze(1)
                second = diff < (bound[:, 1, 0] - self.margin).unsqueeze(1)
                decided = first | second
                best = torch.where(first, contenders[:, :1], contenders[:, 1:])  # [b, V]
            else:
                diff = scores.unsqueeze(3) - scores.unsqueeze(2) + bound.unsqueeze(1)  # [b, V, k, k]
                winner_ok = diff.amin(dim=3) > self.margin  # [b, V, k]
                decided = winner_ok.any(dim=2)  # [b, V]
                best = contenders.gather(1, winner_ok.byte().argmax(dim=2))  # [b, V]
            # undecided voxels get a placeholder here and their exact label when that queue is flushed
            self.out_flat[block.flat(self.out_size)] = best
            self.stats["voxels_refined"] += decided.numel()
            undecided = ~decided
            if bool(undecided.any()):
                self._queue_exact_voxels(*block.coords(undecided))

    # ---- exact evaluation (all queries, all classes) ------------------------------------------------

    def _exact_cells(self, cells: torch.Tensor) -> None:
        for block in self._blocks(cells, 4 * self.num_queries):  # [b, V, Q] logits
            sig = torch.sigmoid_(
                block.interpolate(self._gather_corners(block.cells), self.workspace)
            )  # [b, V, Q]
            self.out_flat[block.flat(self.out_size)] = (sig @ self.p).argmax(dim=2)
            self.stats["voxels_exact"] += sig.shape[0] * sig.shape[1]

    def _queue_exact_voxels(self, ox: torch.Tensor, oy: torch.Tensor, oz: torch.Tensor) -> None:
        """Collect voxels for ``_exact_voxels``; evaluated in batches (few voxels come per block)."""
        self.exact_queue.append((ox, oy, oz))
        self.exact_queued += ox.numel()
        if self.exact_queued >= self.exact_step:
            self._flush_exact_voxels()

    def _flush_exact_voxels(self) -> None:
        if self.exact_queue:
            self._exact_voxels(*(torch.cat(parts) for parts in zip(*self.exact_queue)))
        self.exact_queue, self.exact_queued = [], 0

    def _exact_voxels(self, ox: torch.Tensor, oy: torch.Tensor, oz: torch.Tensor) -> None:
        """The direct formula at the output voxels (ox, oy, oz), from a gather of their 8 corner rows."""
        self.stats["voxels_exact"] += ox.numel()
        mx, my, mz = self.maps
        _, ys, zs = self.out_size
        _, ncy, ncz = self.cells_shape
        step = self.exact_step
        for start in range(0, ox.numel(), step):
            x, y, z = ox[start : start + step], oy[start : start + step], oz[start : start + step]
            cells = (mx.cell[x] * ncy + my.cell[y]) * ncz + mz.cell[z]
            corners = self._gather_corners(cells).view(-1, 8, self.num_queries)  # [v, 8, Q]
            weights = _corner_weights(mx.lam[x], my.lam[y], mz.lam[z])  # [v, 8]
            sig = torch.sigmoid_(torch.einsum("ve,veq->vq", weights, corners))  # [v, Q]
            self.out_flat[(x * ys + y) * zs + z] = (sig @ self.p).argmax(dim=1)

    # ---- index helpers --------------------------------------------------------------------------------

    def _unravel_cells(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, ny, nz = self.cells_shape
        return cells // (ny * nz), (cells // nz) % ny, cells % nz

    def _cell_voxel_counts(self, cells: torch.Tensor) -> torch.Tensor:
        return self.voxels_per_cell[cells]

    def _gather_corners(self, cells: torch.Tensor, buffer: str = "corners") -> torch.Tensor:
        """Corner logits [n, 2, 2, 2, Q] (x, y, z lower/upper) of the given cells."""
        cx, cy, cz = self._unravel_cells(cells)
        mx, my, mz = self.maps
        _, ys, zs = self.grid
        ix = torch.stack((mx.lower[cx], mx.upper[cx]), dim=1)  # [n, 2]
        iy = torch.stack((my.lower[cy], my.upper[cy]), dim=1)
        iz = torch.stack((mz.lower[cz], mz.upper[cz]), dim=1)
        rows = (ix[:, :, None, None] * ys + iy[:, None, :, None]) * zs + iz[:, None, None, :]  # [n, 2, 2, 2]
        shape = (cells.numel(), 2, 2, 2, self.num_queries)
        out = self.workspace.get(buffer, (rows.numel(), self.num_queries))
        return torch.index_select(self.rows, 0, rows.view(-1), out=out).view(shape)

    def _shape_key(self, cells: torch.Tensor) -> torch.Tensor:
        """A key [n], equal for cells with equal voxel counts per axis."""
        return self.shape_key_per_cell[cells]

    def _blocks(self, cells: torch.Tensor, bytes_per_voxel: int):
        """Yield ``_Block``s covering the voxels of the given cells, at most ``chunk_bytes /
        bytes_per_voxel`` voxels each (at least one output x-row of one cell).

        Cells are grouped by their voxel counts per axis (a few groups: floor / ceil of the scale
        factor), so each block is a dense [cells, nx, ny, nz] batch.
        """
        mx, my, mz = self.maps
        cx, cy, cz = self._unravel_cells(cells)
        nx, ny, nz = mx.count[cx], my.count[cy], mz.count[cz]
        key = self._shape_key(cells)
        max_voxels = max(1, self.chunk_bytes // bytes_per_voxel)
        arange = torch.arange(max(m.out_size for m in self.maps), device=self.device)
        for value in torch.unique(key).tolist():
            group = (key == value).nonzero().squeeze(1)
            sx, sy, sz = int(nx[group[0]]), int(ny[group[0]]), int(nz[group[0]])
            if sx * sy * sz == 0:
                continue
            step = max(1, max_voxels // (sx * sy * sz))
            rows = sx if sx * sy * sz <= max_voxels else max(1, max_voxels // (sy * sz))  # x-rows per block
            for start in range(0, group.numel(), step):
                pos = group[start : start + step]
                oy = my.start[cy[pos]].unsqueeze(1) + arange[:sy]  # [b, sy]
                oz = mz.start[cz[pos]].unsqueeze(1) + arange[:sz]
                ty, tz = my.lam[oy], mz.lam[oz]
                for x0 in range(0, sx, rows):
                    ox = mx.start[cx[pos]].unsqueeze(1) + arange[x0 : min(x0 + rows, sx)]  # [b, rows]
                    yield _Block(pos, cells[pos], ox, oy, oz, mx.lam[ox], ty, tz)

    def _queue_cell_labels(self, cells: torch.Tensor, values: torch.Tensor) -> None:
        """Label whole cells, batched: a few blocks per flush instead of a few per chunk."""
        self.cell_queue.append((cells, values))
        self.cells_queued += cells.numel()
        if self.cells_queued * 64 >= self.chunk_bytes:  # ~64 voxels per cell, int64 indices
            self._flush_cell_labels()

    def _flush_cell_labels(self) -> None:
        if self.cell_queue:
            self._write_cells(*(torch.cat(parts) for parts in zip(*self.cell_queue)))
        self.cell_queue, self.cells_queued = [], 0

    def _write_cells(self, cells: torch.Tensor, values: torch.Tensor) -> None:
        for block in self._blocks(cells, 8):  # [b, V] int64 output indices
            flat = block.flat(self.out_size)  # [b, V]
            self.out_flat[flat] = values[block.positions].unsqueeze(1).expand_as(flat)


def _min_max_along(
    lo: torch.Tensor, hi: torch.Tensor, dim: int, in_size: int, workspace: _Workspace, tag: str
):
    """Reduce (min, max) over each cell's two corner planes along ``dim``."""
    if in_size == 1:
        return lo, hi
    n = lo.shape[dim] - 1
    shape = list(lo.shape)
    shape[dim] = n
    return (
        torch.minimum(
            lo.narrow(dim, 0, n), lo.narrow(dim, 1, n), out=workspace.get(tag + "_lo", tuple(shape))
        ),
        torch.maximum(
            hi.narrow(dim, 0, n), hi.narrow(dim, 1, n), out=workspace.get(tag + "_hi", tuple(shape))
        ),
    )


def _interval_winner(score_lo: torch.Tensor, score_hi: torch.Tensor, margin: float) -> torch.Tensor:
    """[C, n] score bounds -> the class whose lower bound beats every other upper bound, else -1."""
    best = score_lo.argmax(dim=0, keepdim=True)  # [1, n]: the only class that can be certified
    others = score_hi.scatter(0, best, -math.inf).amax(dim=0)
    certified = score_lo.gather(0, best).squeeze(0) > others + margin
    return torch.where(certified, best.squeeze(0), -1)


def _pairwise_lower_bound(p_k: torch.Tensor, mid: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Lower bounds [n, k, k] of score_a - score_b over a cell, for contenders a, b (inf if a == b).

    With each sigmoid in [mid - half, mid + half], ``sum_q (p_qa - p_qb) s_q`` is at least
    ``sum_q (p_qa - p_qb) mid_q - |p_qa - p_qb| half_q``: queries weighing both classes alike cancel.
    """
    centre = torch.einsum("nkq,nq->nk", p_k, mid)  # [n, k]
    spread = torch.einsum("nabq,nq->nab", (p_k.unsqueeze(2) - p_k.unsqueeze(1)).abs_(), half)  # [n, k, k]
    bound = centre.unsqueeze(2) - centre.unsqueeze(1) - spread
    bound.diagonal(dim1=1, dim2=2).fill_(math.inf)  # a class need not beat itself
    return bound


def _corner_weights(tx: torch.Tensor, ty: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
    """Trilinear weights [v, 8] of the cell corners in [2, 2, 2] (x, y, z) order."""
    wx = torch.stack((1 - tx, tx), dim=1)  # [v, 2]
    wy = torch.stack((1 - ty, ty), dim=1)
    wz = torch.stack((1 - tz, tz), dim=1)
    return (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)
