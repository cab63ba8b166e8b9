"""A model's parameter count per top-level module, in the released logs' terms, and a config summary.

Counts are exact and, beside them, rounded the way the released logs' parameter tables round them
(``8.2M``, ``19.2K``, ``0.1G``). The released models stored the view transformer's geometry (``dx``,
``bx``, ``nx``, ``frustum``) as parameters, spotocc as buffers: :func:`count_table` gives the view
transformer and the total both without and with them (the latter is the released count).
``spotocc info`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spotocc.config import Config
from spotocc.models.released import GEOMETRY_BUFFERS, RELEASED_MODULES

_RELEASED_NAMES = {ours: theirs for theirs, ours in RELEASED_MODULES.items()}


@dataclass
class ModuleCount:
    """Parameters of one top-level module, and geometry-buffer elements the released count included."""

    name: str
    released_name: str
    parameters: int
    geometry: int = 0  # dx/bx/nx/frustum elements (view transformer only)

    @property
    def released_count(self) -> int:
        return self.parameters + self.geometry


def format_count(n: int) -> str:
    """Rounded like the released logs' parameter tables: one decimal of K / M / G, plain below 100."""
    if n > 1e8:
        return f"{n / 1e9:.1f}G"
    if n > 1e5:
        return f"{n / 1e6:.1f}M"
    if n > 1e2:
        return f"{n / 1e3:.1f}K"
    return str(n)


def parameter_counts(model: nn.Module) -> list[ModuleCount]:
    """One :class:`ModuleCount` per top-level child of ``model`` (any device, ``meta`` included)."""
    counts = []
    for name, child in model.named_children():
        geometry = 0
        if name == "view_transformer":
            geometry = sum(getattr(child, b).numel() for b in GEOMETRY_BUFFERS if hasattr(child, b))
        counts.append(
            ModuleCount(
                name=name,
                released_name=_RELEASED_NAMES.get(name, "-"),
                parameters=sum(p.numel() for p in child.parameters()),
                geometry=geometry,
            )
        )
    return counts


def config_summary(cfg: Config) -> str:
    """A few lines: model kind, backbone, input, grids, classes, backend."""
    m, g = cfg.model, cfg.grid
    cameras = len(cfg.data.cameras)
    head = {"spot": "SPOT-Occ head", "sparseocc": "SparseOcc baseline head"}.get(m.head.type, m.head.type)
    lines = [
        f"{cfg.name}: {head} ({m.head.num_layers} layers, {m.head.num_queries} queries, "
        f"{m.head.num_classes} classes incl. empty)",
        f"  image backbone {m.image_backbone.name} (out indices {list(m.image_backbone.out_indices)}), "
        f"input {cfg.data.input_size[0]}x{cfg.data.input_size[1]}, "
        f"{cameras} camera{'s' if cameras != 1 else ''}",
        f"  grid {'x'.join(map(str, g.occ_size))} over {list(g.point_cloud_range)}, "
        f"LSS grid {'x'.join(map(str, g.lss_size))}, depth bins {list(m.view_transformer.depth_bound)}",
        f"  data {cfg.data.format} ({cfg.data.class_set} classes), sparse backend {m.sparse_backend}",
    ]
    if m.head.type == "spot":
        lines.append(f"  SPOT cross-attention: rho {m.head.pruning_ratio}, min_k {m.head.min_k}")
    return "\n".join(lines)


def count_table(counts: list[ModuleCount]) -> str:
    """The per-module table with exact and rounded counts, totals without and with geometry buffers."""
    rows = [("module", "released name", "parameters", "rounded")]
    for c in counts:
        rows.append((c.name, c.released_name, f"{c.parameters:,}", format_count(c.parameters)))
        if c.geometry:
            rows.append(
                (
                    f"  + {'/'.join(GEOMETRY_BUFFERS)}",
                    "(released: parameters)",
                    f"{c.released_count:,}",
                    format_count(c.released_count),
                )
            )
    total = sum(c.parameters for c in counts)
    released_total = sum(c.released_count for c in counts)
    rows.append(("total", "", f"{total:,}", format_count(total)))
    rows.append(("total as released", "(with geometry)", f"{released_total:,}", format_count(released_total)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows
    )


def build_meta_model(cfg: Config) -> nn.Module:
    """``cfg``'s model on the ``meta`` device (shapes only)."""
    from spotocc.models import build_model

    with torch.device("meta"):
        return build_model(cfg, load_pretrained=False)
