"""How well a trained depth net places each class: per-class depth accuracy of the LSS lift.

The lift puts a feature cell's context where its depth distribution has mass, so a class whose depth
the net cannot find is smeared along its rays and is not learned downstream, however good the image
features are. Per feature cell (one frustum ray), the reference depth is the nearest LiDAR depth of its
patch when it has a LiDAR point, otherwise the depth of the first labelled voxel along the ray (cells
above the LiDAR's top beam, e.g. facades and tree crowns); cells with neither are left out. Each cell
counts for the class of the first labelled voxel its ray meets (:func:`first_labelled_hit`); the
reference depth is binned to the nearest bin (``fix_bin_offset=True``), whatever the training targets
were, since that is where the feature belongs.

Per class: the cells, how many of them have a LiDAR point, the share whose most likely bin lies within
``tolerance`` bins of the reference, the mean probability within those bins, the mean distance in
metres between the most likely bin and the reference bin, and its mean signed value (the bias:
negative when the net places the class too near). The same accuracy and bias per band of reference
depth (10 m wide) show whether the error grows with distance, as it does for a depth net that has
learned the near, frequent depths and pulls the rare far ones towards them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spotocc.config import Config
from spotocc.data.batch import collate
from spotocc.data.classes import class_set
from spotocc.diagnostics.coverage import labelled_samples, text_table
from spotocc.engine.evaluator import move_to_device
from spotocc.models.occupancy import CAMERA_KEYS, OccupancyModel
from spotocc.models.view_transform import (
    NO_DEPTH,
    depth_to_bins,
    first_labelled_hit,
    nearest_patch_depth,
)

__all__ = ["DepthAccuracy", "cell_depth_references", "format_depth_accuracy", "measure_depth_accuracy"]


@dataclass
class DepthAccuracy:
    """Sums over feature cells, per class (index = class id): see the module docstring."""

    class_names: tuple[str, ...]
    tolerance: int  # bins either side of the reference that count as right
    bin_size: float  # metres per depth bin
    num_samples: int = 0
    cells: list[int] = field(default_factory=list)
    lidar_cells: list[int] = field(default_factory=list)
    argmax_within: list[int] = field(default_factory=list)
    prob_within: list[float] = field(default_factory=list)  # summed probability within tolerance
    argmax_error_m: list[float] = field(default_factory=list)  # summed |argmax bin - reference| in m
    argmax_signed_m: list[float] = field(default_factory=list)  # summed (argmax bin - reference) in m
    min_depth: float = 0.0  # metres at bin 0 (the first bin's depth), for the distance bands
    band_width: float = 10.0  # metres per distance band
    # per band of reference depth b = floor((depth - min_depth) / band_width), all classes together
    band_cells: list[int] = field(default_factory=list)
    band_within: list[int] = field(default_factory=list)
    band_signed_m: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = len(self.class_names)
        for name in _CLASS_SUMS:
            setattr(self, name, list(getattr(self, name)) or [0] * c)

    def add(
        self, probs: torch.Tensor, bins: torch.Tensor, labels: torch.Tensor, from_lidar: torch.Tensor
    ) -> None:
        """Count cells: probs [M, D] depth probabilities, bins [M] reference bins, labels [M] classes
        (0 = none: skipped), from_lidar [M] bool."""
        num_bins = probs.shape[1]
        argmax = probs.argmax(dim=1)  # [M]
        offsets = torch.arange(-self.tolerance, self.tolerance + 1, device=bins.device)
        window = bins[:, None] + offsets  # [M, 2t+1]
        inside = (window >= 0) & (window < num_bins)
        near = probs.gather(1, window.clamp(0, num_bins - 1)) * inside  # [M, 2t+1]
        stats = {
            "cells": torch.ones_like(bins, dtype=torch.float64),
            "lidar_cells": from_lidar.double(),
            "argmax_within": ((argmax - bins).abs() <= self.tolerance).double(),
            "prob_within": near.sum(dim=1).double(),
            "argmax_error_m": (argmax - bins).abs().double() * self.bin_size,
            "argmax_signed_m": (argmax - bins).double() * self.bin_size,
        }
        keep = labels > 0
        for name, values in stats.items():
            _add_by_index(getattr(self, name), labels[keep], values[keep], integer=name in _COUNTS)
        band = (bins[keep] * self.bin_size / self.band_width).floor().long()  # [K] band of each cell
        num_bands = int(band.max()) + 1 if band.numel() else 0
        for name, source in _BAND_SUMS.items():
            total = getattr(self, name)
            total.extend([0] * (num_bands - len(total)))
            _add_by_index(total, band, stats[source][keep], integer=name in _COUNTS)

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        """(class name, shares in percent / mean error in m) for every class with cells, then 'all'."""
        out = []
        classes = [c for c in range(1, len(self.class_names)) if self.cells[c] > 0]
        for name, members in [(self.class_names[c], [c]) for c in classes] + [("all", classes)]:
            n = sum(self.cells[c] for c in members)
            if n == 0:
                continue
            out.append(
                (
                    name,
                    {
                        "cells": n,
                        "lidar_pct": 100.0 * sum(self.lidar_cells[c] for c in members) / n,
                        "argmax_within_pct": 100.0 * sum(self.argmax_within[c] for c in members) / n,
                        "prob_within_pct": 100.0 * sum(self.prob_within[c] for c in members) / n,
                        "argmax_error_m": sum(self.argmax_error_m[c] for c in members) / n,
                        "bias_m": sum(self.argmax_signed_m[c] for c in members) / n,
                    },
                )
            )
        return out

    def band_rows(self) -> list[tuple[str, dict[str, float]]]:
        """(depth band "lo..hi m", cells / share within tolerance in percent / mean signed error in m)
        for every band of reference depth with cells, all classes together."""
        out = []
        for b, n in enumerate(self.band_cells):
            if n == 0:
                continue
            lo = self.min_depth + b * self.band_width
            out.append(
                (
                    f"{lo:g}..{lo + self.band_width:g} m",
                    {
                        "cells": n,
                        "argmax_within_pct": 100.0 * self.band_within[b] / n,
                        "bias_m": self.band_signed_m[b] / n,
                    },
                )
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "tolerance_bins": self.tolerance,
            "bin_size_m": self.bin_size,
            "classes": {name: values for name, values in self.rows()},
            "depth_bands": {name: values for name, values in self.band_rows()},
        }


_CLASS_SUMS = ("cells", "lidar_cells", "argmax_within", "prob_within", "argmax_error_m", "argmax_signed_m")
_BAND_SUMS = {"band_cells": "cells", "band_within": "argmax_within", "band_signed_m": "argmax_signed_m"}
_COUNTS = ("cells", "lidar_cells", "argmax_within", "band_cells", "band_within")  # kept as int


def _add_by_index(total: list, index: torch.Tensor, values: torch.Tensor, *, integer: bool) -> None:
    """total[i] += the sum of ``values`` [K] where ``index`` [K] == i, for every i < len(total)."""
    sums = torch.zeros(len(total), dtype=torch.float64, device=values.device).index_add_(0, index, values)
    for i, v in enumerate(sums.tolist()):
        total[i] += int(round(v)) if integer else v


def cell_depth_references(
    model: OccupancyModel, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per feature cell of a batch: (reference bin [M], valid [M], class of the first labelled voxel
    [M], has a LiDAR point [M]), M = B*N*fH*fW in (camera, row, column) order; ``gt_depth`` optional."""
    vt = model.view_transformer
    points = vt.geometry(*(batch[key] for key in CAMERA_KEYS))  # [B, N, D, fH, fW, 3]
    first, labels = first_labelled_hit(points, batch["gt_occ"], vt.point_cloud_range)  # [B, N, fH, fW]
    bin_depths = vt.frustum[:, 0, 0, 2]  # [D]
    occupancy = torch.where(labels != 0, bin_depths[first], torch.full_like(bin_depths[first], NO_DEPTH))
    occupancy = occupancy.reshape(-1)  # [M]
    if "gt_depth" in batch:
        lidar = nearest_patch_depth(batch["gt_depth"], vt.downsample)  # [M]
    else:
        lidar = torch.full_like(occupancy, NO_DEPTH)
    from_lidar = lidar < NO_DEPTH
    depth = torch.where(from_lidar, lidar, occupancy)
    bins, valid = depth_to_bins(depth, vt.depth_bound, fix_bin_offset=True)
    return bins, valid, labels.reshape(-1), from_lidar


@torch.no_grad()
def measure_depth_accuracy(
    model: OccupancyModel,
    cfg: Config,
    dataset: Sequence[dict[str, Any]],
    num_samples: int,
    *,
    tolerance: int = 1,
    device: str | torch.device = "cpu",
    on_sample: Callable[[int, int], None] | None = None,
) -> DepthAccuracy:
    """Per-class depth accuracy of ``model`` (eval mode) over the first ``num_samples`` of ``dataset``
    (samples with ``gt_occ``; ``gt_depth`` used where present), one sample at a time."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 bins, got {tolerance}")
    vt = model.view_transformer
    first_depth, _, bin_size = (float(v) for v in vt.depth_bound)
    total = DepthAccuracy(class_set(cfg.data.class_set)[0], tolerance, bin_size, min_depth=first_depth)
    model.eval()
    for sample in labelled_samples(dataset, num_samples, "depth accuracy", on_sample):
        batch = move_to_device(collate([sample]), torch.device(device))
        _, depth_prob = model.lift(model.encode_images(batch["img"]), batch)  # [N, D, fH, fW]
        probs = depth_prob.float().permute(0, 2, 3, 1).reshape(-1, depth_prob.shape[1])  # [M, D]
        bins, valid, labels, from_lidar = cell_depth_references(model, batch)
        total.add(probs[valid], bins[valid], labels[valid], from_lidar[valid])
        total.num_samples += 1
    return total


def format_depth_accuracy(acc: DepthAccuracy) -> str:
    """Two text tables: one row per class with cells, then 'all'; then one row per band of reference
    depth. Bias: the mean signed argmax error (negative = placed too near)."""
    t = acc.tolerance
    header = ["class", "cells", "LiDAR %", f"argmax +-{t} %", f"prob +-{t} %", "argmax err m", "bias m"]
    rows = [
        [
            name,
            str(v["cells"]),
            f"{v['lidar_pct']:.1f}",
            f"{v['argmax_within_pct']:.1f}",
            f"{v['prob_within_pct']:.1f}",
            f"{v['argmax_error_m']:.2f}",
            f"{v['bias_m']:+.2f}",
        ]
        for name, v in acc.rows()
    ]
    bands = [
        [name, str(v["cells"]), f"{v['argmax_within_pct']:.1f}", f"{v['bias_m']:+.2f}"]
        for name, v in acc.band_rows()
    ]
    band_header = ["reference depth", "cells", f"argmax +-{t} %", "bias m"]
    return text_table(header, rows) + "\n\n" + text_table(band_header, bands)
