"""Where a camera rig and grid leave the LSS lift blind: GT-voxel coverage per class and per height.

Geometry only, no weights. Every labelled GT voxel (label != 255) of a sample is counted as

- **in view**: its centre lies in front of some camera, at a depth d with ``min <= d < max`` of
  ``view_transformer.depth_bound``, and projects inside the network input image (0 <= u < W,
  0 <= v < H), through the camera matrices the model uses (rots, trans, intrins, post_rots,
  post_trans, bda);
- **lifted**: its LSS cell (GT index // ``grid.lss_downsample``) receives at least one frustum point,
  placed by :meth:`ViewTransformer.geometry` and :func:`voxel_indices` exactly as in the model (so
  truncation toward zero and the dropped points are the model's);
- **active**: its LSS cell is in the active set of the sparse encoder's finest skip output when the
  encoder is fed the lifted cells.

The encoder's active set depends only on its input's active set, not on weights or channel counts, so
the probe builds it with one input channel and the reference backend: cheap on a CPU for any preset.
Active includes lifted (the encoder only grows the active set). Lifted and in view do not imply each
other: an LSS cell is larger than a GT voxel, and the frustum samples the image at a stride.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spotocc.config import Config, GridConfig
from spotocc.data.batch import collate
from spotocc.data.classes import IGNORE_INDEX, class_set
from spotocc.evaluation.field_of_view import points_in_view, project_points, voxel_centres
from spotocc.models.occupancy import CAMERA_KEYS
from spotocc.models.sparse.encoder import SparseLatentDiffuser
from spotocc.models.view_transform import ViewTransformer, voxel_indices

__all__ = ["CoverageCounts", "CoverageProbe", "format_coverage", "measure_coverage", "project_points"]


@dataclass
class CoverageCounts:
    """Counts summed over samples: per class (index = class id) and per LSS height level z."""

    class_names: tuple[str, ...]
    lss_size: tuple[int, int, int]
    num_samples: int = 0
    gt_voxels: list[int] = field(default_factory=list)  # labelled GT voxels per class
    in_view: list[int] = field(default_factory=list)  # ... whose centre some camera sees
    lifted: list[int] = field(default_factory=list)  # ... whose LSS cell gets a frustum point
    active: list[int] = field(default_factory=list)  # ... whose LSS cell the encoder keeps active
    level_cells: list[int] = field(default_factory=list)  # LSS cells per z level
    level_lifted: list[int] = field(default_factory=list)  # ... that get a frustum point
    level_active: list[int] = field(default_factory=list)  # ... active after the encoder

    def __post_init__(self) -> None:
        c, z = len(self.class_names), self.lss_size[2]
        for name, size in (("gt_voxels", c), ("in_view", c), ("lifted", c), ("active", c)):
            setattr(self, name, list(getattr(self, name)) or [0] * size)
        for name in ("level_cells", "level_lifted", "level_active"):
            setattr(self, name, list(getattr(self, name)) or [0] * z)

    def add(self, other: CoverageCounts) -> None:
        """Add another sample's (or batch's) counts in place."""
        if other.class_names != self.class_names or tuple(other.lss_size) != tuple(self.lss_size):
            raise ValueError("CoverageCounts.add: different class sets or LSS grids")
        self.num_samples += other.num_samples
        for name in (
            "gt_voxels",
            "in_view",
            "lifted",
            "active",
            "level_cells",
            "level_lifted",
            "level_active",
        ):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])

    def present_classes(self) -> list[int]:
        """Class ids with at least one labelled GT voxel."""
        return [c for c, n in enumerate(self.gt_voxels) if n > 0]

    def to_dict(self) -> dict[str, Any]:
        """Counts and percentages, JSON-ready (classes present only)."""
        classes = [
            {
                "id": c,
                "name": self.class_names[c],
                "gt_voxels": self.gt_voxels[c],
                "in_view": self.in_view[c],
                "lifted": self.lifted[c],
                "active": self.active[c],
                "in_view_pct": _pct(self.in_view[c], self.gt_voxels[c]),
                "lifted_pct": _pct(self.lifted[c], self.gt_voxels[c]),
                "active_pct": _pct(self.active[c], self.gt_voxels[c]),
            }
            for c in self.present_classes()
        ]
        levels = [
            {
                "z": z,
                "cells": self.level_cells[z],
                "lifted": self.level_lifted[z],
                "active": self.level_active[z],
                "lifted_pct": _pct(self.level_lifted[z], self.level_cells[z]),
                "active_pct": _pct(self.level_active[z], self.level_cells[z]),
            }
            for z in range(len(self.level_cells))
        ]
        return {
            "num_samples": self.num_samples,
            "lss_size": list(self.lss_size),
            "classes": classes,
            "levels": levels,
        }


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


class CoverageProbe:
    """The model's lift geometry and encoder active-set growth, applied to batches (no weights needed)."""

    def __init__(
        self,
        view_transformer: ViewTransformer,
        encoder: SparseLatentDiffuser,
        grid: GridConfig,
        class_names: Sequence[str],
    ) -> None:
        if tuple(view_transformer.grid_size) != tuple(grid.lss_size):
            raise ValueError(
                f"CoverageProbe: view transformer grid {view_transformer.grid_size} is not the LSS grid "
                f"{grid.lss_size}"
            )
        self.view_transformer = view_transformer.eval()
        self.encoder = encoder.eval()
        self.grid = grid
        self.class_names = tuple(class_names)

    @classmethod
    def from_config(cls, cfg: Config) -> CoverageProbe:
        """The model's view transformer, and its encoder with one input channel on the reference backend."""
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.voxel_encoder.in_channels = 1  # the active set does not depend on channels
        model_cfg.sparse_backend = "reference"
        view_transformer = ViewTransformer.from_config(
            cfg.model.view_transformer, cfg.grid, cfg.data.input_size
        )
        encoder = SparseLatentDiffuser.from_config(model_cfg)
        return cls(view_transformer, encoder, cfg.grid, class_set(cfg.data.class_set)[0])

    # ----------------------------------------------------------------------------------------------
    # The three masks

    def in_view(self, voxels: torch.Tensor, cams: Sequence[torch.Tensor]) -> torch.Tensor:
        """GT voxel indices [P, 3] of one sample -> [P] bool: centre seen by some camera.

        ``cams``: the sample's (rots, trans, intrins, post_rots, post_trans, bda), without batch axis.
        """
        vt = self.view_transformer
        centres = voxel_centres(voxels, self.grid)  # [P, 3]
        return points_in_view(centres, cams, vt.input_size, depth_range=tuple(vt.depth_bound[:2]))

    def lifted_cells(self, cams: Sequence[torch.Tensor]) -> torch.Tensor:
        """Batched camera tensors -> [B, X, Y, Z] bool: LSS cells that receive a frustum point."""
        vt = self.view_transformer
        b = cams[0].shape[0]
        points = vt.geometry(*cams)  # [B, N, D, fH, fW, 3]
        index, inside = voxel_indices(points, vt.bx - vt.dx / 2.0, vt.dx, vt.grid_size)  # [B, N, D, fH, fW]
        hit = torch.zeros(b * vt.grid_size[0] * vt.grid_size[1] * vt.grid_size[2], dtype=torch.bool)
        hit[index[inside]] = True
        return hit.view(b, *vt.grid_size)  # [B, X, Y, Z]

    def active_cells(self, lifted: torch.Tensor) -> torch.Tensor:
        """Lifted cells [B, X, Y, Z] bool -> [B, X, Y, Z] bool: active in the encoder's first skip output."""
        active = torch.zeros_like(lifted)
        if not lifted.any():
            return active  # nothing to encode
        c = self.encoder.in_channels
        volume = lifted[:, None].float().expand(-1, c, -1, -1, -1).contiguous()  # [B, C, X, Y, Z]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the sparse kernels are exact single-threaded (see ARCHITECTURE.md)
        try:
            with torch.no_grad():
                skip1 = self.encoder(volume)[0]
        finally:
            torch.set_num_threads(threads)
        idx = skip1.indices.long()  # [N, 4] (b, x, y, z)
        active[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = True
        return active

    # ----------------------------------------------------------------------------------------------
    # Counting

    def measure(self, batch: dict[str, Any]) -> CoverageCounts:
        """Coverage counts of a batch (dict of :mod:`spotocc.data.batch` with ``gt_occ`` [B, X, Y, Z])."""
        if "gt_occ" not in batch:
            raise ValueError("coverage needs ground truth (gt_occ), and this batch has none")
        cams = [batch[key].cpu() for key in CAMERA_KEYS]
        gt = batch["gt_occ"].cpu().long()  # [B, X, Y, Z]
        if tuple(gt.shape[1:]) != tuple(self.grid.occ_size):
            raise ValueError(f"gt_occ grid {tuple(gt.shape[1:])} is not grid.occ_size {self.grid.occ_size}")
        lifted = self.lifted_cells(cams)  # [B, X', Y', Z'] (LSS grid)
        active = self.active_cells(lifted)  # [B, X', Y', Z']
        counts = CoverageCounts(self.class_names, tuple(self.grid.lss_size), num_samples=gt.shape[0])
        num_classes, s = len(self.class_names), self.grid.lss_downsample
        lss = torch.tensor(self.grid.lss_size)
        for b in range(gt.shape[0]):
            voxels = (gt[b] != IGNORE_INDEX).nonzero()  # [P, 3]
            labels = gt[b][voxels.unbind(-1)]  # [P]
            known = labels < num_classes
            voxels, labels = voxels[known], labels[known]
            seen = self.in_view(voxels, [t[b] for t in cams])  # [P]
            cell = voxels // s  # [P, 3] LSS cell
            valid = (cell < lss).all(dim=-1)  # GT voxels past the last whole LSS cell have none
            cell = torch.where(valid[:, None], cell, torch.zeros_like(cell))
            hit = lifted[b][cell.unbind(-1)] & valid  # [P]
            kept = active[b][cell.unbind(-1)] & valid  # [P]
            for name, mask in (("gt_voxels", None), ("in_view", seen), ("lifted", hit), ("active", kept)):
                chosen = labels if mask is None else labels[mask]
                per_class = torch.bincount(chosen, minlength=num_classes).tolist()
                setattr(counts, name, [a + n for a, n in zip(getattr(counts, name), per_class)])
        x, y = self.grid.lss_size[:2]
        counts.level_cells = [gt.shape[0] * x * y] * self.grid.lss_size[2]
        counts.level_lifted = lifted.sum(dim=(0, 1, 2)).tolist()  # [Z']
        counts.level_active = active.sum(dim=(0, 1, 2)).tolist()  # [Z']
        return counts


def measure_coverage(
    cfg: Config,
    dataset: Sequence[dict[str, Any]],
    num_samples: int,
    *,
    probe: CoverageProbe | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> CoverageCounts:
    """Coverage counts over the first ``num_samples`` samples of ``dataset`` (one sample at a time)."""
    probe = probe or CoverageProbe.from_config(cfg)
    total = CoverageCounts(probe.class_names, tuple(cfg.grid.lss_size))
    for sample in labelled_samples(dataset, num_samples, "coverage", on_sample):
        total.add(probe.measure(collate([sample])))
    return total


def labelled_samples(
    dataset: Sequence[dict[str, Any]],
    num_samples: int,
    purpose: str,
    on_sample: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The first ``num_samples`` samples of ``dataset``, one at a time; a sample without ``gt_occ`` is a
    ValueError naming it and ``purpose``. ``on_sample(done, total)`` after each one is used."""
    n = min(num_samples, len(dataset))
    for i in range(n):
        sample = dataset[i]
        if "gt_occ" not in sample:
            sample_id = sample.get("meta", {}).get("sample_id", i)
            raise ValueError(f"sample {sample_id} has no ground truth (gt_occ); {purpose} needs labels")
        yield sample
        if on_sample is not None:
            on_sample(i + 1, n)


# --------------------------------------------------------------------------------------------------
# Text


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces between."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_coverage(counts: CoverageCounts, grid: GridConfig) -> str:
    """Per-class and per-height tables of ``counts`` as aligned plain text."""
    rows = []
    for c in counts.present_classes():
        n = counts.gt_voxels[c]
        rows.append(
            [
                f"{c:>3} {counts.class_names[c]}",
                str(n),
                f"{_pct(counts.in_view[c], n):.1f}",
                f"{_pct(counts.lifted[c], n):.1f}",
                f"{_pct(counts.active[c], n):.1f}",
            ]
        )
    occupied = [c for c in counts.present_classes() if c != 0]
    if occupied:
        total = {
            k: sum(getattr(counts, k)[c] for c in occupied)
            for k in ("gt_voxels", "in_view", "lifted", "active")
        }
        rows.append(
            [
                "    occupied (all but 0)",
                str(total["gt_voxels"]),
                *(f"{_pct(total[k], total['gt_voxels']):.1f}" for k in ("in_view", "lifted", "active")),
            ]
        )
    classes = text_table(["class", "GT voxels", "in view %", "lifted %", "encoder %"], rows)
    z0, dz = grid.point_cloud_range[2], grid.lss_voxel_size[2]
    levels = text_table(
        ["LSS z", "height (m)", "lifted %", "encoder %"],
        [
            [
                str(z),
                f"{z0 + z * dz:.2f}..{z0 + (z + 1) * dz:.2f}",
                f"{_pct(counts.level_lifted[z], counts.level_cells[z]):.1f}",
                f"{_pct(counts.level_active[z], counts.level_cells[z]):.1f}",
            ]
            for z in range(len(counts.level_cells))
        ],
    )
    return classes + "\n\n" + levels
