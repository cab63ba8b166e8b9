"""Per-class IoU bar charts from eval JSON files (``spotocc eval --json``), one run or a comparison.

The JSON is read leniently: plain keys (``SSC_mIoU``, ``SC_IoU``, ``SSC_<class>_IoU``) or the
released prefixed copies (``semkitti_SSC_mIoU``, ``nuScenes_SSC_car_IoU``), optionally nested under
``"metrics"``. Class names come from the file's ``"class_names"``, else its ``config.data.class_set``,
else the ``class_set`` argument, else the class set whose names match the most keys. Class 0
(empty) is never charted: the mIoU is over classes 1..C-1. Values are percentages.

An Occ3D-nuScenes file (its ``"class_set"`` is ``occ3d``, or it has the plain keys ``mIoU`` /
``RayIoU`` and no SSC keys) is charted from its camera-mask keys: ``<class>_IoU`` of the 17 non-free
classes, ``mIoU``, ``IoU`` (occupied vs free) and ``RayIoU`` in the title. Null values count as missing.

Charts are drawn with matplotlib's Agg canvas directly (no pyplot, no display).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spotocc.data.classes import CLASS_SETS
from spotocc.visualization.colors import class_colors, class_names

_CLASS_KEY = re.compile(r"(?:(?P<prefix>.+?)_)?SSC_(?P<name>.+)_IoU")
_MIOU_KEY = re.compile(r"(?:(?P<prefix>.+?)_)?SSC_mIoU")
_SC_IOU_KEY = re.compile(r"(?:(?P<prefix>.+?)_)?SC_IoU")
RUN_COLORS = ("#1f5fa8", "#e8872a", "#4a9c4a", "#b03a48")  # bars of run 1, 2, ... in a comparison


@dataclass(frozen=True)
class EvalResult:
    """Per-class IoU (percent; NaN where the file lacks a class) of one evaluation."""

    class_names: tuple[str, ...]  # classes 1..C-1, in class-id order
    class_iou: tuple[float, ...]
    miou: float  # the file's SSC_mIoU, else the mean of class_iou
    sc_iou: float | None
    class_set: str | None
    source: str
    ray_iou: float | None = None  # Occ3D: the file's RayIoU (mean over 1, 2, 4 m)

    @property
    def miou_from_file(self) -> bool:
        return not math.isnan(self.miou)


def load_eval_json(path: str | Path, class_set: str | None = None) -> EvalResult:
    """Read an eval JSON file (see the module doc for the accepted layouts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"eval file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"eval file {path} holds a {type(data).__name__}, expected a JSON object")
    return read_eval_metrics(data, class_set, source=str(path))


def _flat_numbers(data: Mapping[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    nested = data.get("metrics")
    for mapping in (nested if isinstance(nested, Mapping) else {}, data):
        for key, value in mapping.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[str(key)] = float(value)
    return values


def _lookup(
    values: Mapping[str, float], pattern: re.Pattern[str], source: str, what: str, **groups: str
) -> float | None:
    """The value of the plain key, else of the one prefixed key (several that disagree: an error)."""
    found: dict[str | None, float] = {}
    for key, value in values.items():
        m = pattern.fullmatch(key)
        if m and all(m.group(k) == v for k, v in groups.items()):
            found[m.group("prefix")] = value
    if None in found:
        return found[None]
    distinct = set(found.values())
    if len(distinct) > 1:
        raise ValueError(f"{source}: several {what} values under different prefixes: {sorted(found.items())}")
    return distinct.pop() if distinct else None


def _resolve_names(data: Mapping[str, Any], values: Mapping[str, float], class_set: str | None, source: str):
    names = data.get("class_names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        known = next((k for k, (v, _) in CLASS_SETS.items() if tuple(names) == v), None)
        return tuple(names), known
    config = data.get("config")
    if isinstance(config, Mapping):
        config_set = (
            (config.get("data") or {}).get("class_set") if isinstance(config.get("data"), Mapping) else None
        )
        if config_set in CLASS_SETS:
            return class_names(config_set), config_set
    if class_set is not None:
        return class_names(class_set), class_set
    present = {m.group("name") for k in values if (m := _CLASS_KEY.fullmatch(k))}
    scores = {k: len(present & set(v[1:])) for k, (v, _) in CLASS_SETS.items()}
    best = max(scores.values())
    winners = [k for k, s in scores.items() if s == best]
    if best == 0 or len(winners) > 1:
        raise ValueError(
            f"{source}: cannot tell the class set from the keys (no 'class_names' entry); "
            f"give the class set (--class-set semantickitti|nuscenes)"
        )
    return class_names(winners[0]), winners[0]


def read_eval_metrics(
    data: Mapping[str, Any], class_set: str | None = None, *, source: str = "eval JSON"
) -> EvalResult:
    """:class:`EvalResult` from an already loaded eval dictionary."""
    values = _flat_numbers(data)
    if _is_occ3d(data, values, class_set):
        return _read_occ3d(values, source)
    names, resolved_set = _resolve_names(data, values, class_set, source)
    charted = names[1:]  # class 0 (empty) is not in the mIoU
    ious = [_lookup(values, _CLASS_KEY, source, f"SSC_{n}_IoU", name=n) for n in charted]
    if all(v is None for v in ious):
        raise ValueError(
            f"{source}: no per-class IoU keys (SSC_<class>_IoU) for the classes {', '.join(charted[:4])}, ..."
        )
    class_iou = tuple(float("nan") if v is None else v for v in ious)
    miou = _lookup(values, _MIOU_KEY, source, "SSC_mIoU")
    if miou is None:
        miou = float(np.nanmean(class_iou))
    sc_iou = _lookup(values, _SC_IOU_KEY, source, "SC_IoU")
    return EvalResult(tuple(charted), class_iou, float(miou), sc_iou, resolved_set, source)


def _is_occ3d(data: Mapping[str, Any], values: Mapping[str, float], class_set: str | None) -> bool:
    if "occ3d" in (class_set, data.get("class_set")) or data.get("benchmark") == "occ3d-nuscenes":
        return True
    ssc = any(_CLASS_KEY.fullmatch(k) or _MIOU_KEY.fullmatch(k) for k in values)
    return not ssc and ("mIoU" in values or "RayIoU" in values)


def _read_occ3d(values: Mapping[str, float], source: str) -> EvalResult:
    charted = class_names("occ3d")[1:]  # the 17 non-free classes, Occ3D ids 0..16
    ious = [values.get(f"{name}_IoU") for name in charted]
    if all(v is None for v in ious):
        raise ValueError(
            f"{source}: no per-class Occ3D IoU keys (<class>_IoU) for {', '.join(charted[:4])}, ..."
        )
    class_iou = tuple(float("nan") if v is None else v for v in ious)
    miou = values.get("mIoU")
    if miou is None:
        miou = float(np.nanmean(class_iou))
    return EvalResult(
        charted, class_iou, float(miou), values.get("IoU"), "occ3d", source, values.get("RayIoU")
    )


def _headline(result: EvalResult) -> str:
    if result.class_set == "occ3d":
        parts = [f"mIoU {result.miou:.2f}"]
        parts += [] if result.sc_iou is None else [f"IoU {result.sc_iou:.2f}"]
        parts += [] if result.ray_iou is None else [f"RayIoU {result.ray_iou:.2f}"]
        return " · ".join(parts)
    return f"mIoU {result.miou:.2f}" + ("" if result.sc_iou is None else f" · SC IoU {result.sc_iou:.2f}")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def class_iou_chart(result: EvalResult, *, title: str | None = None) -> Figure:
    """Bar chart of one run's per-class IoU, bars in the class colours, mIoU (and SC IoU) in the title."""
    fig = _figure(max(8.0, 0.55 * len(result.class_names) + 2), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(result.class_names))
    colors = _bar_colors(result)
    values = np.nan_to_num(np.asarray(result.class_iou), nan=0.0)
    bars = ax.bar(x, values, color=colors, edgecolor="#333333", linewidth=0.6)
    for bar, value in zip(bars, result.class_iou):
        text = "n/a" if math.isnan(value) else f"{value:.1f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    _class_axis(ax, result.class_names)
    ax.axhline(result.miou, color="#444444", linestyle="--", linewidth=1, label=f"mIoU {result.miou:.2f}")
    ax.legend(loc="upper right", fontsize=9)
    _headroom(ax, values)
    headline = _headline(result)
    ax.set_title(f"{title} — {headline}" if title else headline)
    fig.tight_layout()
    return fig


def comparison_chart(
    results: Sequence[EvalResult], labels: Sequence[str], *, title: str | None = None
) -> Figure:
    """Grouped bars of several runs' per-class IoU (e.g. SPOT-Occ vs SparseOcc), mIoUs in the title."""
    if len(results) < 2:
        raise ValueError("a comparison needs at least two eval results")
    if len(labels) != len(results):
        raise ValueError(f"{len(results)} eval results but {len(labels)} labels")
    names = results[0].class_names
    for result in results[1:]:
        if result.class_names != names:
            raise ValueError(f"{result.source} has other classes than {results[0].source}; cannot compare")
    fig = _figure(max(9.0, 0.32 * len(names) * len(results) + 3), 5.0)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    width = 0.8 / len(results)
    for k, (result, label) in enumerate(zip(results, labels)):
        offset = (k - (len(results) - 1) / 2) * width
        values = np.nan_to_num(np.asarray(result.class_iou), nan=0.0)
        ax.bar(
            x + offset,
            values,
            width,
            label=f"{label} ({result.miou:.2f})",
            color=RUN_COLORS[k % len(RUN_COLORS)],
        )
    _class_axis(ax, names)
    ax.legend(loc="upper right", fontsize=9, title="run (mIoU)")
    _headroom(ax, np.concatenate([np.nan_to_num(np.asarray(r.class_iou), nan=0.0) for r in results]))
    head = " vs ".join(f"{label} {r.miou:.2f}" for r, label in zip(results, labels))
    if len(results) == 2:
        head += f" mIoU ({results[0].miou - results[1].miou:+.2f})"
    else:
        head += " mIoU"
    ax.set_title(f"{title} — {head}" if title else head)
    fig.tight_layout()
    return fig


def _class_axis(ax: Any, names: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=9)
    ax.set_ylabel("IoU (%)")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _headroom(ax: Any, values: np.ndarray) -> None:
    """Room above the tallest bar for the value labels and the legend."""
    ax.set_ylim(0, max(1.0, float(np.max(values, initial=0.0))) * 1.22)


def _bar_colors(result: EvalResult) -> list[Any]:
    if result.class_set is not None and len(class_names(result.class_set)) == len(result.class_names) + 1:
        return [tuple(c / 255 for c in rgb) for rgb in class_colors(result.class_set)[1:]]
    return [RUN_COLORS[0]] * len(result.class_names)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a chart as PNG (or any format matplotlib knows from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def default_labels(paths: Sequence[str | Path]) -> list[str]:
    """Run names for eval files: their stems, or their folders' names when the stems repeat."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    parents = [p.parent.name or p.stem for p in paths]
    return parents if len(set(parents)) == len(parents) else [f"run {i + 1}" for i in range(len(paths))]
