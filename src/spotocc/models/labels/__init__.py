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
   Classes the lead provably beats drop out; if none is left the cell is labelled whole. Where many
   classes are within reach of the lead, they all stay in contention, bounded per class (the
   pairwise comparison costs k * k per query and rarely removes one of many).
3. Still undecided: per voxel, only the few queries whose sigmoid varies in the cell and that
   separate the remaining classes are evaluated exactly; the others stay bounded. Only the best
   class at mid-range can be certified, so it is checked against each other contender. Voxels this
   cannot decide (within the bounds' width of a tie) get the formula with every query, from a
   gather of their 8 corner rows.

Stages 1 and 2 run per sample (``bounded``); stage 3 is queued across the batch (``voxels``), so
many small samples still make large batches. Voxels are evaluated in dense batches of cells with
equal voxel counts per axis (no per-voxel Python and no per-cell loops), and every chunked
intermediate stays under ``chunk_bytes``.

The package: this module holds the entry point (``occupancy_labels``) and its checks; ``bounded``
decides a sample's cells from score bounds, ``voxels`` (``VoxelWriter``, shared by the batch) does
the per-voxel rest and writes the labels, ``axis`` maps output voxels to cells, and ``direct`` is
the chunked reference formula (``method="direct"``). Both heads form their labels here.
"""

from __future__ import annotations

import math

import torch

from spotocc.models.labels.axis import axis_map
from spotocc.models.labels.bounded import BoundedSolver
from spotocc.models.labels.direct import direct_labels
from spotocc.models.labels.voxels import VoxelWriter, Workspace

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
        num_contenders: at most this many classes (the lead and its rivals) are compared pairwise per
            ambiguous cell ("bounded" only); where more can still win, all of them are bounded per
            class instead (looser, cheaper).
        num_exact_queries: queries evaluated per voxel in ambiguous cells ("bounded" only); the others
            stay bounded, and voxels where that is not enough are evaluated with all queries.
        margin: certify a label only if its score provably beats the others' by more than this; by
            default a bound on the float32 rounding error of the scores.
        stats: if given, cleared and filled ("bounded" only) with counts summed over the batch:
            ``cells``, ``cells_certified_coarse`` (stage 1), ``cells_certified_refined`` (stage 2),
            ``cells_many_contenders`` (more than ``num_contenders`` classes in reach), ``voxels``,
            ``voxels_refined`` (stage 3) and ``voxels_exact`` (evaluated with every query).

    Returns:
        int64 labels [B, X', Y', Z']; ties go to the lowest class index, as ``torch.argmax``. Inputs
        of any float dtype are computed in float32.
    """
    if chunk_bytes is None:
        chunk_bytes = 16 * 2**20 if mask_logits.device.type == "cpu" else 256 * 2**20
    probs, logits, out_size, largest_logit = _checked_inputs(
        class_probs, mask_logits, out_size, method, chunk_bytes
    )
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
    maps = tuple(axis_map(n, m, probs.device) for n, m in zip(logits.shape[2:], out_size))
    if stats is not None:
        stats.clear()
    if method == "direct":
        for b in range(batch):
            direct_labels(probs[b].float(), logits[b].float(), maps, labels[b], chunk_bytes)
        return labels
    margin = _rounding_margin(probs.float(), largest_logit) if margin is None else float(margin)
    # The per-voxel stage is shared by the batch: small samples still make large batches of voxels.
    writer = VoxelWriter(
        maps=maps,
        out=labels,
        chunk_bytes=chunk_bytes,
        num_exact_queries=min(num_exact_queries, num_queries),
        margin=margin,
        workspace=Workspace(probs.device),
    )
    cell_stats: dict[str, int] = {}
    for b in range(batch):
        solver = BoundedSolver(
            p=probs[b].float(),  # [Q, C]
            logits=logits[b].float(),  # [Q, X, Y, Z]
            maps=maps,
            out=labels[b],
            writer=writer,
            sample=b,
            chunk_bytes=chunk_bytes,
            num_contenders=min(num_contenders, num_classes),
            num_exact_queries=min(num_exact_queries, num_queries),
            margin=margin,
        )
        solver.run()
        for key, value in solver.stats.items():
            cell_stats[key] = cell_stats.get(key, 0) + value
    writer.flush()
    if stats is not None:
        stats.update(cell_stats, voxels=labels.numel(), **writer.stats)
    return labels


def _checked_inputs(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size: tuple[int, int, int],
    method: str,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], float]:
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
    largest_logit = _largest_magnitude(mask_logits) if mask_logits.numel() else 0.0
    if not math.isfinite(largest_logit):
        raise ValueError("mask_logits must be finite (found inf or NaN)")
    if class_probs.numel() and not 0.0 <= float(class_probs.min()) <= float(class_probs.max()) < math.inf:
        raise ValueError("class_probs must be finite non-negative probabilities")
    return class_probs, mask_logits, out, largest_logit  # type: ignore[return-value]


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |x| in one pass without a temporary (NaN or inf if the tensor holds any)."""
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def _rounding_margin(p: torch.Tensor, largest_logit: float) -> float:
    """Bound on the float32 error of a score difference (interpolation, sigmoid, sums over queries).

    Interpolated logits carry an error of a few ulps of the largest corner magnitude, sigmoid damps it
    by at most 1/4, and summing Q terms weighted by p adds up to Q ulps of the largest class total.
    A safety factor of 2 over that estimate keeps certification conservative. For p [B, Q, C] it is
    the largest sample's bound, one margin for the batch.
    """
    num_queries = p.shape[-2]
    largest_total = max(1.0, float(p.sum(dim=-2).max()))
    return 4.0 * _FLOAT32_EPS * largest_total * (2.0 * largest_logit + num_queries + 2.0)
