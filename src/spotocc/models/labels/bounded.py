"""Per-sample bounds of ``occupancy_labels(method="bounded")``: labels certified per low-res cell.

See ``spotocc.models.labels`` for the idea. ``BoundedSolver`` decides one sample's cells from
bounds (stages 1 and 2) and hands the cells it cannot decide whole to the batch's ``VoxelWriter``
as compact summaries (stage 3 runs there, batched across samples).
"""

from __future__ import annotations

import math

import torch

from spotocc.models.labels.axis import AxisMap
from spotocc.models.labels.voxels import CellSummary, VoxelWriter, Workspace, corner_rows, unravel_cells


class BoundedSolver:
    """One sample's labels by interval bounds per cell; the per-voxel rest goes to ``writer``."""

    def __init__(
        self,
        *,
        p: torch.Tensor,
        logits: torch.Tensor,
        maps: tuple[AxisMap, ...],
        out: torch.Tensor,
        writer: VoxelWriter,
        sample: int,
        chunk_bytes: int,
        num_contenders: int,
        num_exact_queries: int,
        margin: float,
    ) -> None:
        self.p = p  # [Q, C]
        self.logits = logits  # [Q, X, Y, Z]
        self.maps = maps
        self.out = out  # [X', Y', Z'] int64: this sample's part of the writer's output
        self.writer = writer
        self.sample = sample
        self.cell_offset = sample * writer.cells_per_sample  # local -> global cell ids
        self.chunk_bytes = chunk_bytes
        self.num_exact_queries = num_exact_queries
        self.margin = margin
        self.num_queries, self.num_classes = p.shape
        self.grid = tuple(logits.shape[1:])
        self.cells_shape = tuple(m.num_cells for m in maps)
        self.device = p.device
        self.rows = torch.empty(0)  # [X*Y*Z, Q] logits per low-res voxel, built when first needed
        self.workspace = writer.workspace
        self.num_rivals = min(num_contenders - 1, self.num_classes - 1)  # compared pairwise with the lead
        self.stats = {
            "cells": 0,
            "cells_certified_coarse": 0,
            "cells_certified_refined": 0,
            "cells_many_contenders": 0,
        }

    def run(self) -> None:
        cell_labels = self._coarse_cell_labels()  # [ncx, ncy, ncz], -1 = undecided
        self._fill_from_cells(cell_labels)
        undecided = (cell_labels.view(-1) < 0).nonzero().squeeze(1)  # flat cell ids
        undecided = undecided[self.writer.voxel_counts(undecided) > 0]  # cells without outputs need nothing
        # cells with equal voxel counts per axis next to each other: fewer, larger blocks later
        undecided = undecided[torch.sort(self.writer.shape_key(undecided), stable=True).indices]
        self.stats["cells"] = cell_labels.numel()
        self.stats["cells_certified_coarse"] = cell_labels.numel() - int((cell_labels < 0).sum())
        if undecided.numel() == 0:
            return
        # One row of Q logits per low-res voxel: a cell's corners for every query are 8 row gathers.
        # (a 2-D transpose: torch copies those blockwise, twice as fast as the 4-D permute)
        self.rows = self.logits.reshape(self.num_queries, -1).t().contiguous()  # [X*Y*Z, Q]
        self.writer.add_sample(self.sample, self.p, self.rows)
        step = max(1, self.chunk_bytes // (32 * self.num_queries))  # [n, 8, Q] corners per chunk
        for start in range(0, undecided.numel(), step):
            self._refine_cells(undecided[start : start + step])
        self.writer.sample_done()

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
        """Tighter bounds for a chunk of undecided cells; per-voxel work only where still needed.

        Classes whose upper bound reaches the lead's lower bound stay in contention. Where at most
        ``num_rivals`` do, each is compared with the lead pairwise (tighter: queries weighing both
        alike cancel); where more do, all of them contend and are bounded per class.
        """
        m = self.num_rivals
        corners = self._gather_corners(cells)  # [n, 2, 2, 2, Q]
        s_lo, s_hi = self._sub_box_sigmoid_bounds(cells, corners)  # [n, Q] each
        score_lo = s_lo @ self.p  # [n, C]
        lead = score_lo.argmax(dim=1, keepdim=True)  # [n, 1]: the class with the best lower bound
        others_hi = (s_hi @ self.p).scatter_(1, lead, -math.inf)  # [n, C]
        in_reach = others_hi >= score_lo.gather(1, lead) - self.margin  # [n, C]: may beat the lead
        num_in_reach = in_reach.sum(dim=1)  # [n]
        mid, half = (s_lo + s_hi) * 0.5, (s_hi - s_lo) * 0.5
        pairwise = num_in_reach <= m  # [n]: compare pairwise, else bound per class
        few, many = pairwise.nonzero().squeeze(1), (~pairwise).nonzero().squeeze(1)
        # Per row, the classes that may win: the lead first, then the rivals that may beat it.
        contenders = lead.expand(-1, self.num_classes).clone()  # [n, C], padded with the lead
        num_alive = num_in_reach.clone()  # [n]
        if many.numel():  # every class in reach, by descending upper bound
            reach = others_hi[many].scatter_(1, lead[many], math.inf)
            contenders[many] = reach.argsort(dim=1, descending=True)
        if few.numel() and m > 0:
            rivals = others_hi[few].topk(m, dim=1).indices  # [f, m]: every class in reach is among them
            alive = self._pairwise_alive(mid[few], half[few], lead[few], rivals)  # [f, m]
            num_alive[few] = alive.sum(dim=1)
            order = torch.sort(alive.byte(), dim=1, descending=True, stable=True).indices
            contenders[few, 1 : m + 1] = rivals.gather(1, order)  # the rivals alive first
        certified = num_alive == 0
        self.writer.queue_cell_labels(cells[certified] + self.cell_offset, lead[certified].squeeze(1))
        self.stats["cells_certified_refined"] += int(certified.sum())
        self.stats["cells_many_contenders"] += many.numel()
        # The rest, in a few groups by regime and padded number of contenders (powers of two).
        count = num_alive + 1  # [n] contenders per row
        bucket = torch.where(certified, 0, _next_power_of_two(count).clamp(max=self.num_classes))
        columns = torch.arange(self.num_classes, device=self.device)
        for k in torch.unique(bucket[~certified]).tolist():
            for regime in (True, False):
                group = ((bucket == k) & (pairwise == regime)).nonzero().squeeze(1)
                if group.numel() == 0:
                    continue
                padded = torch.where(columns[:k] < count[group, None], contenders[group, :k], lead[group])
                self._refine_voxels(group, cells, corners, mid, half, padded, count[group], pairwise=regime)

    def _pairwise_alive(
        self, mid: torch.Tensor, half: torch.Tensor, lead: torch.Tensor, rivals: torch.Tensor
    ) -> torch.Tensor:
        """[f, m] whether each rival might beat the lead somewhere in the cell.

        Lower bound of score_lead - score_rival: sum_q w_q mid_q - |w_q| half_q, w = p_lead - p_rival.
        """
        f, m = rivals.shape
        score_mid = mid @ self.p  # [f, C]
        centre = score_mid.gather(1, lead) - score_mid.gather(1, rivals)  # [f, m]
        pt = self.p.t()  # [C, Q]
        weight = torch.index_select(
            pt, 0, rivals.reshape(-1), out=self.workspace.get("rivals", (f * m, pt.shape[1]))
        )
        lead_row = pt.index_select(0, lead.squeeze(1)).unsqueeze(1)  # [f, 1, Q]
        weight = weight.view(f, m, -1).sub_(lead_row).abs_()  # [f, m, Q]
        spread = torch.bmm(weight, half.unsqueeze(2)).squeeze(2)  # [f, m]
        return centre - spread <= self.margin

    def _sub_box_sigmoid_bounds(
        self, cells: torch.Tensor, corners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid bounds [n, Q] over the box spanned by each cell's output voxels.

        A trilinear function takes its extremes over a box at the box's corners; the box spanned by
        the output voxels is often much smaller than the cell (3/4 of it per axis for 128 -> 512).
        """
        n = cells.numel()
        ends = []
        for m, c in zip(self.maps, unravel_cells(cells, self.cells_shape)):
            lam = torch.stack((m.lam_lo[c], m.lam_hi[c]), dim=1)  # [n, 2]: the box's two ends
            ends.append(torch.stack((1 - lam, lam), dim=2))  # [n, 2 (box end), 2 (cell corner)]
        wx, wy, wz = ends
        wxy = (wx[:, :, None, :, None] * wy[:, None, :, None, :]).reshape(n, 4, 4)  # (x, y) ends <- corners
        weights = (wxy[:, :, None, :, None] * wz[:, None, :, None, :]).reshape(n, 8, 8)  # box <- cell corner
        values = torch.bmm(
            weights, corners.view(n, 8, -1), out=self.workspace.get("box", (n, 8, self.num_queries))
        )
        return torch.sigmoid(values.amin(dim=1)), torch.sigmoid(values.amax(dim=1))

    # ---- stage 3: per voxel, a few queries exactly and the rest bounded -----------------------------

    def _refine_voxels(
        self,
        group: torch.Tensor,
        cells: torch.Tensor,
        corners: torch.Tensor,
        mid: torch.Tensor,
        half: torch.Tensor,
        contenders: torch.Tensor,
        num_valid: torch.Tensor,
        *,
        pairwise: bool,
    ) -> None:
        """Per voxel: the queries that separate the contenders exactly, the others bounded.

        Args:
            group: [g] rows of the chunk's ``cells`` [n] to refine; ``contenders`` [g, k] are the classes
                that may win in each (all others provably lose), the first ``num_valid`` [g] of each row
                (the others repeat the first and are ignored).
            corners: the chunk's corner logits [n, 2, 2, 2, Q]; mid, half: centre and half-width of each
                query's sigmoid range in the cell, [n, Q].
            pairwise: bound the other queries' part of each score difference pairwise (tighter, k * k
                work per query) or per class (k).

        Only a compact summary per cell is kept (the chosen queries' corners and weights, the bound on
        the rest); it is queued per k and evaluated in large batches.
        """
        k = contenders.shape[1]
        step = max(1, self.chunk_bytes // (4 * self.num_queries * k * k))  # [g, k, k, Q] pairwise terms
        for start in range(0, group.numel(), step):
            rows = group[start : start + step]
            summary = self._summarise_cells(
                rows,
                cells,
                corners,
                mid,
                half,
                contenders[start : start + step],
                num_valid[start : start + step],
                pairwise,
            )
            self.writer.queue_summary(summary)

    def _summarise_cells(
        self,
        rows: torch.Tensor,
        cells: torch.Tensor,
        corners: torch.Tensor,
        mid: torch.Tensor,
        half: torch.Tensor,
        contenders: torch.Tensor,
        num_valid: torch.Tensor,
        pairwise: bool,
    ) -> CellSummary:
        n, k, ks = rows.numel(), contenders.shape[1], self.num_exact_queries
        mid, half = mid[rows], half[rows]  # [n, Q]
        p_k = self.p.t()[contenders]  # [n, k, Q]
        # A query matters if its sigmoid varies in the cell and the contenders weigh it differently.
        importance = half * (p_k.amax(dim=1) - p_k.amin(dim=1))  # [n, Q]
        chosen = importance.topk(ks, dim=1).indices  # [n, ks]
        rest = torch.ones_like(mid).scatter_(1, chosen, 0.0)
        rest_mid, rest_half = mid * rest, half * rest  # [n, Q]: zero at the chosen queries
        rest_centre = torch.bmm(p_k, rest_mid.unsqueeze(2)).squeeze(2)  # [n, k]
        if pairwise:
            rest_bound = _pairwise_lower_bound(p_k, rest_mid, rest_half)  # [n, k, k]
        else:
            rest_bound = _per_class_lower_bound(p_k, rest_centre, rest_half)
        padding = torch.arange(k, device=self.device) >= num_valid.unsqueeze(1)  # [n, k]
        if bool(padding.any()):  # padding never leads, and every contender beats it
            rest_centre = rest_centre.masked_fill(padding, -math.inf)
            rest_bound = rest_bound.masked_fill(padding.unsqueeze(1), math.inf)
        weights = p_k.gather(2, chosen.unsqueeze(1).expand(n, k, ks)).transpose(1, 2)  # [n, ks, k]
        if k == 2:  # the common case: one score difference per voxel
            weights = weights[:, :, :1] - weights[:, :, 1:]  # [n, ks, 1]
        corner = torch.arange(8, device=self.device).view(1, 8, 1)
        chosen_corners = corners.view(corners.shape[0], 8, -1)[
            rows.view(-1, 1, 1), corner, chosen.unsqueeze(1)
        ]
        return CellSummary(
            cells[rows] + self.cell_offset,
            contenders,
            chosen_corners.view(n, 2, 2, 2, ks),
            weights.contiguous(),
            rest_centre,
            rest_bound,
        )

    # ---- index helpers --------------------------------------------------------------------------------

    def _gather_corners(self, cells: torch.Tensor) -> torch.Tensor:
        """Corner logits [n, 2, 2, 2, Q] (x, y, z lower/upper) of the given cells."""
        rows = corner_rows(self.maps, self.grid, *unravel_cells(cells, self.cells_shape))  # [n, 2, 2, 2]
        shape = (cells.numel(), 2, 2, 2, self.num_queries)
        out = self.workspace.get("cell_corners", (rows.numel(), self.num_queries))
        return torch.index_select(self.rows, 0, rows.view(-1), out=out).view(shape)


def _min_max_along(
    lo: torch.Tensor, hi: torch.Tensor, dim: int, in_size: int, workspace: Workspace, tag: str
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
    if p_k.shape[1] == 2:  # the common case, without the [n, 2, 2, Q] weights
        weight = p_k[:, 0] - p_k[:, 1]  # [n, Q]
        centre, spread = (weight * mid).sum(dim=1), (weight.abs_() * half).sum(dim=1)  # [n]
        bound = torch.full((p_k.shape[0], 2, 2), math.inf, device=p_k.device)
        bound[:, 0, 1] = centre - spread
        bound[:, 1, 0] = -centre - spread
        return bound
    centre = torch.einsum("nkq,nq->nk", p_k, mid)  # [n, k]
    spread = torch.einsum("nabq,nq->nab", (p_k.unsqueeze(2) - p_k.unsqueeze(1)).abs_(), half)  # [n, k, k]
    bound = centre.unsqueeze(2) - centre.unsqueeze(1) - spread
    bound.diagonal(dim1=1, dim2=2).fill_(math.inf)  # a class need not beat itself
    return bound


def _per_class_lower_bound(p_k: torch.Tensor, centre: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Looser bounds [n, k, k] than ``_pairwise_lower_bound`` in k instead of k * k work per query.

    Each score lies in ``centre_a -+ sum_q p_qa half_q``, so score_a - score_b is at least the
    difference of the centres less both half-widths.
    """
    width = torch.bmm(p_k, half.unsqueeze(2)).squeeze(2)  # [n, k]
    bound = (centre - width).unsqueeze(2) - (centre + width).unsqueeze(1)
    bound.diagonal(dim1=1, dim2=2).fill_(math.inf)
    return bound


def _next_power_of_two(count: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each count (counts >= 1)."""
    return torch.pow(2, torch.ceil(torch.log2(count.double()))).long()
