"""The per-voxel end of ``occupancy_labels(method="bounded")``, shared by every sample of a batch.

``BoundedSolver`` (one per sample) decides what it can per low-resolution cell and hands the rest
here: whole cells to label, and compact per-cell summaries for the per-voxel stage. ``VoxelWriter``
queues them across samples, so small samples still make large batches, and writes the labels:

- whole cells: their label broadcast to their output voxels;
- summarised cells: per voxel, a few queries exactly and the rest bounded; voxels that this cannot
  decide get the direct formula with every query (from the sample's logits, gathered per voxel).

Cells are named by global ids ``sample * cells_per_sample + flat cell index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from spotocc.models.labels.axis import AxisMap


class Workspace:
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
class CellSummary:
    """What the per-voxel stage needs of a cell: a few queries' corners and weights, a bound on the rest."""

    cells: torch.Tensor  # [n] global cell ids
    contenders: torch.Tensor  # [n, k] classes that may win
    chosen_corners: torch.Tensor  # [n, 2, 2, 2, ks] corner logits of the queries evaluated exactly
    weights: torch.Tensor  # [n, ks, k] their class probabilities ([n, ks, 1]: p_0 - p_1 when k == 2)
    rest_centre: torch.Tensor  # [n, k] the other queries' part of each contender's score at mid-range
    rest_bound: torch.Tensor  # [n, k, k] lower bound of the other queries' part of score_a - score_b

    @staticmethod
    def concatenate(parts: list[CellSummary]) -> CellSummary:
        names = [f.name for f in fields(CellSummary)]
        return CellSummary(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names})


@dataclass(frozen=True)
class _Block:
    """Cells whose output voxels form equally shaped [nx, ny, nz] blocks, evaluated as one batch."""

    positions: torch.Tensor  # [n] int64: index of each cell in the caller's list of cells
    sample: torch.Tensor  # [n] int64 sample of each cell
    ox: torch.Tensor  # [n, nx] int64 output x index of each cell's voxels
    oy: torch.Tensor  # [n, ny]
    oz: torch.Tensor  # [n, nz]
    tx: torch.Tensor  # [n, nx] float32 weight of the upper corner
    ty: torch.Tensor  # [n, ny]
    tz: torch.Tensor  # [n, nz]

    def flat(self, out_size: tuple[int, int, int]) -> torch.Tensor:
        """Flat indices [n, V] (V = nx * ny * nz, x-major) into the batch's [B, X', Y', Z'] output."""
        xs, ys, zs = out_size
        ox = self.ox + (self.sample * xs).unsqueeze(1)  # x in the [B * X', Y', Z'] output
        flat = (ox[:, :, None, None] * ys + self.oy[:, None, :, None]) * zs + self.oz[:, None, None, :]
        return flat.view(self.sample.numel(), -1)

    def coords(self, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(sample, x, y, z) output indices of the voxels where ``mask`` [n, V] is true."""
        ny, nz = self.oy.shape[1], self.oz.shape[1]
        cell, voxel = mask.nonzero().unbind(1)
        return (
            self.sample[cell],
            self.ox[cell, voxel // (ny * nz)],
            self.oy[cell, (voxel // nz) % ny],
            self.oz[cell, voxel % nz],
        )

    def interpolate(self, corners: torch.Tensor, workspace: Workspace) -> torch.Tensor:
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


class VoxelWriter:
    """Writes the labels of whole cells and of summarised cells into a batch's output, in large batches.

    Each sample is announced with ``add_sample`` before it hands over cells and closed with
    ``sample_done``; ``flush()`` must be called once every sample is done.
    """

    def __init__(
        self,
        *,
        maps: tuple[AxisMap, ...],
        out: torch.Tensor,
        chunk_bytes: int,
        num_exact_queries: int,
        margin: float,
        workspace: Workspace,
    ) -> None:
        self.maps = maps
        self.out_flat = out.view(-1)  # of the [B, X', Y', Z'] int64 output, written in place
        self.out_size = tuple(out.shape[1:])
        self.chunk_bytes = chunk_bytes
        self.num_exact_queries = num_exact_queries
        self.margin = margin
        self.workspace = workspace
        self.device = out.device
        self.grid = tuple(m.in_size for m in maps)
        self.cells_shape = tuple(m.num_cells for m in maps)
        self.cells_per_sample = math.prod(self.cells_shape)
        mx, my, mz = maps
        counts = (mx.count.view(-1, 1, 1), my.count.view(1, -1, 1), mz.count.view(1, 1, -1))
        self.voxels_per_cell = (counts[0] * counts[1] * counts[2]).view(-1)  # [cells]
        self.shape_key_per_cell = (
            (counts[0] * (my.out_size + 1) + counts[1]) * (mz.out_size + 1) + counts[2]
        ).view(-1)  # [cells]: equal for equal voxel counts per axis
        # Samples with work still queued: their [Q, C] probabilities and [X*Y*Z, Q] logit rows (for
        # the all-query evaluation), kept up to ``retain_bytes`` of rows (at least one sample's).
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retain_bytes = 4 * chunk_bytes
        self.num_queries = 0
        self.exact_step = 1
        self.exact_queue: list[tuple[torch.Tensor, ...]] = []
        self.exact_queued = 0
        self.voxel_queue: dict[int, list[CellSummary]] = {}  # per number of contenders
        self.voxels_queued: dict[int, int] = {}
        self.cell_queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cells_queued = 0
        self.stats = {"voxels_refined": 0, "voxels_exact": 0}

    # ---- what the solvers hand over -----------------------------------------------------------------

    def add_sample(self, b: int, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Sample b's float32 class probabilities [Q, C] and logit rows [X*Y*Z, Q] (not copied)."""
        self.samples[b] = (p, rows)
        self.num_queries = p.shape[0]
        self.exact_step = max(1, self.chunk_bytes // (32 * self.num_queries))  # [v, 8, Q] corners

    def sample_done(self) -> None:
        """A sample has handed over all its cells: flush if the retained rows grow too large."""
        if sum(rows.numel() * rows.element_size() for _, rows in self.samples.values()) > self.retain_bytes:
            self.flush()

    def voxel_counts(self, cells: torch.Tensor) -> torch.Tensor:
        """Output voxels [n] of the given (global or per-sample) cells."""
        return self.voxels_per_cell[cells % self.cells_per_sample]

    def shape_key(self, cells: torch.Tensor) -> torch.Tensor:
        """A key [n], equal for cells with equal voxel counts per axis."""
        return self.shape_key_per_cell[cells % self.cells_per_sample]

    def queue_cell_labels(self, cells: torch.Tensor, values: torch.Tensor) -> None:
        """Label whole cells, batched: a few blocks per flush instead of a few per chunk."""
        self.cell_queue.append((cells, values))
        self.cells_queued += cells.numel()
        if self.cells_queued * 64 >= self.chunk_bytes:  # ~64 voxels per cell, int64 indices
            self._flush_cell_labels()

    def queue_summary(self, summary: CellSummary) -> None:
        """Cells for the per-voxel stage, queued by their number of contenders k."""
        k = summary.contenders.shape[1]
        self.voxel_queue.setdefault(k, []).append(summary)
        self.voxels_queued[k] = self.voxels_queued.get(k, 0) + int(self.voxel_counts(summary.cells).sum())
        if self.voxels_queued[k] >= 4 * self.voxel_step(k):  # a few full blocks per shape group
            self._flush_voxel_queue(k)

    def voxel_step(self, k: int) -> int:
        """Voxels per block of the per-voxel stage with k contenders: [v, ks] logits, [v, k, k] bounds."""
        return max(1, self.chunk_bytes // max(4 * self.num_exact_queries, 4 * k * k, 8))

    def flush(self) -> None:
        """Evaluate and write everything still queued."""
        for k in list(self.voxel_queue):
            self._flush_voxel_queue(k)
        self._flush_cell_labels()
        self._flush_exact_voxels()
        self.samples.clear()

    # ---- whole cells --------------------------------------------------------------------------------

    def _flush_cell_labels(self) -> None:
        if self.cell_queue:
            cells, values = (torch.cat(parts) for parts in zip(*self.cell_queue))
            for block in self._blocks(cells, 8):  # [b, V] int64 output indices
                flat = block.flat(self.out_size)  # [b, V]
                self.out_flat[flat] = values[block.positions].unsqueeze(1).expand_as(flat)
        self.cell_queue, self.cells_queued = [], 0

    # ---- per voxel: a few queries exactly, the rest bounded -----------------------------------------

    def _flush_voxel_queue(self, k: int) -> None:
        queue = self.voxel_queue.pop(k, [])
        self.voxels_queued[k] = 0
        if not queue:
            return
        summary = CellSummary.concatenate(queue)
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
                # Only the best contender at mid-range can be certified (each bound is at most the
                # mid-range difference); check it against every other contender.
                lead = (scores + summary.rest_centre[pos].unsqueeze(1)).argmax(dim=2)  # [b, V]
                lead_bound = bound.gather(1, lead.unsqueeze(2).expand_as(scores))  # [b, V, k]: row lead
                lead_score = scores.gather(2, lead.unsqueeze(2))  # [b, V, 1]
                decided = (lead_score - scores + lead_bound).amin(dim=2) > self.margin  # [b, V]
                best = contenders.gather(1, lead)  # [b, V]
            # undecided voxels get a placeholder here and their exact label when that queue is flushed
            self.out_flat[block.flat(self.out_size)] = best
            self.stats["voxels_refined"] += decided.numel()
            undecided = ~decided
            if bool(undecided.any()):
                self._queue_exact_voxels(block.coords(undecided))

    # ---- exact evaluation (all queries, all classes) ------------------------------------------------

    def _queue_exact_voxels(self, coords: tuple[torch.Tensor, ...]) -> None:
        """Collect (sample, x, y, z) voxels for ``_exact_voxels``; few come per block."""
        self.exact_queue.append(coords)
        self.exact_queued += coords[0].numel()
        if self.exact_queued >= self.exact_step:
            self._flush_exact_voxels()

    def _flush_exact_voxels(self) -> None:
        if self.exact_queue:
            sample, ox, oy, oz = (torch.cat(parts) for parts in zip(*self.exact_queue))
            for b in torch.unique(sample).tolist():
                at = (sample == b).nonzero().squeeze(1)
                self._exact_voxels(b, ox[at], oy[at], oz[at])
        self.exact_queue, self.exact_queued = [], 0

    def _exact_voxels(self, b: int, ox: torch.Tensor, oy: torch.Tensor, oz: torch.Tensor) -> None:
        """The direct formula at sample b's output voxels (ox, oy, oz), from their 8 corner logits."""
        self.stats["voxels_exact"] += ox.numel()
        mx, my, mz = self.maps
        xs, ys, zs = self.out_size
        p, rows = self.samples[b]  # [Q, C], [X*Y*Z, Q]
        step = self.exact_step
        for start in range(0, ox.numel(), step):
            x, y, z = ox[start : start + step], oy[start : start + step], oz[start : start + step]
            index = corner_rows(self.maps, self.grid, mx.cell[x], my.cell[y], mz.cell[z])  # [v, 2, 2, 2]
            corners = rows.index_select(0, index.view(-1)).view(-1, 8, self.num_queries)  # [v, 8, Q]
            weights = _corner_weights(mx.lam[x], my.lam[y], mz.lam[z])  # [v, 8]
            sig = torch.sigmoid_(torch.einsum("ve,veq->vq", weights, corners))  # [v, Q]
            self.out_flat[((b * xs + x) * ys + y) * zs + z] = (sig @ p).argmax(dim=1)

    # ---- blocks of equally shaped cells -------------------------------------------------------------

    def _blocks(self, cells: torch.Tensor, bytes_per_voxel: int):
        """Yield ``_Block``s covering the voxels of the given global cells, each with at most
        ``chunk_bytes`` of per-voxel tensors (``bytes_per_voxel`` per voxel, counting the
        interpolation's partial results [2, 2, nz] and [2, ny, nz] per cell) unless one cell's two
        output x-rows exceed that.

        Cells are grouped by their voxel counts per axis (a few groups: floor / ceil of the scale
        factor), so each block is a dense [cells, nx, ny, nz] batch.
        """
        mx, my, mz = self.maps
        sample, cell = cells // self.cells_per_sample, cells % self.cells_per_sample
        cx, cy, cz = unravel_cells(cell, self.cells_shape)
        key = self.shape_key_per_cell[cell]
        arange = torch.arange(max(m.out_size for m in self.maps), device=self.device)
        for value in torch.unique(key).tolist():
            group = (key == value).nonzero().squeeze(1)
            first = int(cell[group[0]])
            sx, sy, sz = (int(m.count[c]) for m, c in zip(self.maps, unravel_cells(first, self.cells_shape)))
            if sx * sy * sz == 0:
                continue
            per_cell = bytes_per_voxel * max(sx * sy * sz, 2 * sy * sz, 4 * sz)
            step = max(1, self.chunk_bytes // per_cell)  # cells per block
            rows = (
                sx
                if per_cell <= self.chunk_bytes
                else max(1, self.chunk_bytes // (bytes_per_voxel * sy * sz))
            )
            for start in range(0, group.numel(), step):
                pos = group[start : start + step]
                oy = my.start[cy[pos]].unsqueeze(1) + arange[:sy]  # [b, sy]
                oz = mz.start[cz[pos]].unsqueeze(1) + arange[:sz]
                ty, tz = my.lam[oy], mz.lam[oz]
                for x0 in range(0, sx, rows):
                    ox = mx.start[cx[pos]].unsqueeze(1) + arange[x0 : min(x0 + rows, sx)]  # [b, rows]
                    yield _Block(pos, sample[pos], ox, oy, oz, mx.lam[ox], ty, tz)


def corner_rows(
    maps: tuple[AxisMap, ...], grid: tuple[int, ...], cx: torch.Tensor, cy: torch.Tensor, cz: torch.Tensor
) -> torch.Tensor:
    """Flat low-resolution indices [n, 2, 2, 2] (x, y, z lower/upper) of the corners of cells (cx, cy, cz)."""
    mx, my, mz = maps
    _, ys, zs = grid
    ix = torch.stack((mx.lower[cx], mx.upper[cx]), dim=1)  # [n, 2]
    iy = torch.stack((my.lower[cy], my.upper[cy]), dim=1)
    iz = torch.stack((mz.lower[cz], mz.upper[cz]), dim=1)
    return (ix[:, :, None, None] * ys + iy[:, None, :, None]) * zs + iz[:, None, None, :]


def unravel_cells(cells, cells_shape: tuple[int, ...]):
    """(cx, cy, cz) of flat per-sample cell indices (a tensor or an int)."""
    _, ny, nz = cells_shape
    return cells // (ny * nz), (cells // nz) % ny, cells % nz


def _corner_weights(tx: torch.Tensor, ty: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
    """Trilinear weights [v, 8] of the cell corners in [2, 2, 2] (x, y, z) order."""
    wx = torch.stack((1 - tx, tx), dim=1)  # [v, 2]
    wy = torch.stack((1 - ty, ty), dim=1)
    wz = torch.stack((1 - tz, tz), dim=1)
    return (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)
