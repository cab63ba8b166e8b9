"""One picture of a sample: camera images, then ground truth and prediction (3D view and BEV), a legend.

Layout (top to bottom): title with the sample id; the camera images (nuScenes: two rows of three, in
the dataset's camera order); one row per grid ("ground truth", "prediction") holding its 3D view and
its bird's-eye view; the legend of the classes shown. Everything is drawn with numpy and PIL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spotocc.data.classes import IGNORE_INDEX
from spotocc.visualization.canvas import (
    LegendEntry,
    draw_label,
    draw_legend,
    draw_text,
    legend_layout,
    paste,
    resize_nearest,
    resize_smooth,
    text_size,
)
from spotocc.visualization.colors import (
    BACKGROUND,
    EGO_COLOR,
    IGNORE_COLOR,
    class_colors,
    class_names,
    classes_present,
)
from spotocc.visualization.render import (
    Camera,
    SceneFrame,
    bev_image,
    default_camera,
    draw_bev_ego,
    render_3d,
    scene_frame,
)

MARGIN = 16
GAP = 12
TITLE_SIZE = 22
HEADER_SIZE = 16
TEXT_SIZE = 13


@dataclass
class Panel:
    """The picture (uint8 ``[H, W, 3]``) and where each part lies: name -> (top, left, height, width).

    Region names: ``camera0..``, ``gt_3d``, ``gt_bev``, ``pred_3d``, ``pred_bev``, ``legend``.
    """

    image: np.ndarray
    regions: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def camera_images(sample: Mapping[str, Any], *, bgr_input: bool | None = None) -> list[np.ndarray]:
    """The sample's network-input images as uint8 ``[H, W, 3]`` RGB (normalisation and BGR undone).

    ``bgr_input`` defaults to True for nuScenes-Occupancy samples (the released channel swap) and
    False otherwise; pass the config's ``data.bgr_input`` when it is known.
    """
    import torch

    from spotocc.data.transforms import denormalize_image

    if "img" not in sample:
        raise KeyError("sample has no 'img' entry (expected normalised images [N, 3, H, W])")
    img = torch.as_tensor(sample["img"])
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"sample['img'] must be [N, 3, H, W], got shape {tuple(img.shape)}")
    if bgr_input is None:
        bgr_input = str(sample.get("meta", {}).get("dataset", "")).startswith("nuscenes")
    return [denormalize_image(im, bgr_input=bgr_input) for im in img]


def camera_names(sample: Mapping[str, Any], count: int) -> list[str]:
    """Camera names from the image paths (``.../CAM_FRONT/x.jpg`` -> ``CAM_FRONT``), else ``camera i``."""
    paths = sample.get("meta", {}).get("image_paths") or []
    if len(paths) == count:
        return [Path(p).parent.name for p in paths]
    return [f"camera {i}" for i in range(count)]


def _as_grid(value: Any, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a label grid [X, Y, Z], got shape {array.shape}")
    return array


def render_prediction_panel(
    pred: np.ndarray | None,
    *,
    class_set: str,
    sample: Mapping[str, Any] | None = None,
    gt: np.ndarray | None = None,
    point_cloud_range: Sequence[float] | None = None,
    title: str | None = None,
    sample_id: str | None = None,
    show_ignore: bool = False,
    bgr_input: bool | None = None,
    view_size: tuple[int, int] = (800, 520),
    zoom: float = 1.0,
    supersample: int = 2,
    legend: str = "present",
    frame: SceneFrame | None = None,
    camera: Camera | None = None,
) -> Panel:
    """Draw the panel of one sample; any of camera images (``sample``), ``gt`` and ``pred`` may be absent.

    ``gt`` defaults to ``sample["gt_occ"]`` when the sample has it. ``view_size`` is the (width,
    height) of each 3D view; each BEV is a square of that height. ``zoom > 1`` brings the 3D camera
    closer to the ego (see :func:`default_camera`); the BEV always shows the whole grid.
    ``supersample``: samples per pixel and direction of the 3D views (2: smooth edges).
    ``legend="present"`` lists the classes present in the grids shown, ``"all"`` every class (a fixed
    layout, for animations).
    """
    if legend not in ("present", "all"):
        raise ValueError(f"legend must be 'present' or 'all', got {legend!r}")
    if gt is None and sample is not None and "gt_occ" in sample:
        gt = sample["gt_occ"]
    grids: list[tuple[str, str, np.ndarray]] = []
    if gt is not None:
        grids.append(("gt", "ground truth", _as_grid(gt, "gt")))
    if pred is not None:
        grids.append(("pred", "prediction", _as_grid(pred, "pred")))
    if not grids:
        raise ValueError("nothing to draw: give a prediction and/or ground truth (or a sample with gt_occ)")
    if len(grids) == 2 and grids[0][2].shape != grids[1][2].shape:
        raise ValueError(f"gt shape {grids[0][2].shape} differs from prediction shape {grids[1][2].shape}")
    frame = frame or scene_frame(class_set, point_cloud_range)
    view_w, view_h = view_size
    camera = camera or default_camera(frame, width=view_w, height=view_h, zoom=zoom)
    if sample_id is None and sample is not None:
        sample_id = sample.get("meta", {}).get("sample_id")

    images = camera_images(sample, bgr_input=bgr_input) if sample is not None and "img" in sample else []
    names = camera_names(sample, len(images)) if images else []
    content_w = view_w + GAP + view_h
    cam_layout = _camera_layout(images, content_w)
    entries = _legend_entries([g for _, _, g in grids], class_set, show_ignore, legend)
    _, _, legend_h = legend_layout(entries, content_w, TEXT_SIZE)

    title_text = (
        " — ".join(t for t in (title, f"sample {sample_id}" if sample_id else None) if t) or "occupancy"
    )
    title_h = text_size(title_text, TITLE_SIZE, bold=True)[1] + GAP
    header_h = text_size("ground truth", HEADER_SIZE, bold=True)[1] + 6
    height = MARGIN + title_h
    height += cam_layout[1] + (GAP if images else 0)
    height += len(grids) * (header_h + view_h + GAP)
    height += header_h + legend_h + MARGIN
    width = content_w + 2 * MARGIN

    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in BACKGROUND))
    regions: dict[str, tuple[int, int, int, int]] = {}
    draw_text(canvas, (MARGIN, MARGIN), title_text, size=TITLE_SIZE, bold=True)
    top = MARGIN + title_h

    if images:
        for i, (image, (dy, dx, h, w)) in enumerate(zip(images, cam_layout[0])):
            regions[f"camera{i}"] = paste(canvas, resize_smooth(image, h, w), top + dy, MARGIN + dx)
            draw_label(canvas, (MARGIN + dx + 4, top + dy + 4), names[i], size=TEXT_SIZE - 1)
        top += cam_layout[1] + GAP

    for key, heading, grid in grids:
        draw_text(canvas, (MARGIN, top), heading, size=HEADER_SIZE, bold=True)
        top += header_h
        view = render_3d(
            grid, class_set, camera=camera, frame=frame, show_ignore=show_ignore, supersample=supersample
        )
        regions[f"{key}_3d"] = paste(canvas, view, top, MARGIN)
        draw_label(canvas, (MARGIN + 4, top + 4), "3D view", size=TEXT_SIZE - 1)
        bev = _bev_view(grid, class_set, frame, show_ignore, view_h)
        regions[f"{key}_bev"] = paste(canvas, bev, top, MARGIN + view_w + GAP)
        draw_label(canvas, (MARGIN + view_w + GAP + 4, top + 4), "bird's-eye view", size=TEXT_SIZE - 1)
        top += view_h + GAP

    draw_text(canvas, (MARGIN, top), "classes", size=HEADER_SIZE, bold=True)
    top += header_h
    draw_legend(canvas, entries, top, MARGIN, content_w, TEXT_SIZE)
    regions["legend"] = (top, MARGIN, legend_h, content_w)
    return Panel(np.asarray(canvas), regions)


def save_prediction_panel(
    path: str | Path,
    sample: Mapping[str, Any] | None,
    gt: np.ndarray | None,
    pred: np.ndarray | None,
    class_set: str,
    point_cloud_range: Sequence[float] | None = None,
    title: str | None = None,
    **options: Any,
) -> Path:
    """Draw :func:`render_prediction_panel` and write it as a PNG; return the path.

    ``sample``: a dataset item (camera images and ``meta["sample_id"]``; its ``gt_occ`` is used when
    ``gt`` is None) or None. ``gt`` / ``pred``: label grids ``[X, Y, Z]`` (numpy or torch).
    ``options``: the other keywords of :func:`render_prediction_panel`.
    """
    panel = render_prediction_panel(
        pred,
        class_set=class_set,
        sample=sample,
        gt=gt,
        point_cloud_range=point_cloud_range,
        title=title,
        **options,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel.image).save(path)
    return path


def _camera_layout(images: list[np.ndarray], width: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Cells ``(top, left, height, width)`` of up to three images per row, and the total height."""
    if not images:
        return [], 0
    columns = min(3, len(images))
    cell_w = (width - (columns - 1) * GAP // 2) // columns
    cells, top = [], 0
    for row_start in range(0, len(images), columns):
        row = images[row_start : row_start + columns]
        row_h = max(round(cell_w * im.shape[0] / im.shape[1]) for im in row)
        for i, im in enumerate(row):
            h = round(cell_w * im.shape[0] / im.shape[1])
            cells.append((top, i * (cell_w + GAP // 2), h, cell_w))
        top += row_h + GAP // 2
    return cells, top - GAP // 2


def _bev_view(
    grid: np.ndarray, class_set: str, frame: SceneFrame, show_ignore: bool, side: int
) -> np.ndarray:
    """The BEV of ``grid`` with the ego marker, scaled (nearest) to fit a ``side`` x ``side`` square."""
    rows, cols = (grid.shape[0], grid.shape[1]) if frame.forward == "+x" else (grid.shape[1], grid.shape[0])
    scale = max(1, side // max(rows, cols))
    bev = bev_image(grid, class_set, forward=frame.forward, show_ignore=show_ignore, scale=scale)
    bev = draw_bev_ego(bev, frame, grid.shape, scale)
    if max(bev.shape[:2]) > side:
        factor = side / max(bev.shape[:2])
        bev = resize_nearest(bev, max(1, round(bev.shape[0] * factor)), max(1, round(bev.shape[1] * factor)))
    return bev


def _legend_entries(
    grids: list[np.ndarray], class_set: str, show_ignore: bool, mode: str
) -> list[LegendEntry]:
    names, colors = class_names(class_set), class_colors(class_set)
    if mode == "all":
        ids = list(range(1, len(names)))
    else:
        ids = sorted(set().union(*(classes_present(g, class_set) for g in grids)))
    entries = [LegendEntry(names[c], tuple(int(v) for v in colors[c])) for c in ids]
    if show_ignore and (mode == "all" or any((g == IGNORE_INDEX).any() for g in grids)):
        entries.append(LegendEntry("ignore (255)", tuple(int(v) for v in IGNORE_COLOR)))
    entries.append(LegendEntry("ego vehicle", tuple(int(v) for v in EGO_COLOR)))
    return entries
