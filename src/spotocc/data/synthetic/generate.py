"""``generate``: write a synthetic dataset in the SemanticKITTI, nuScenes-Occupancy or Occ3D layout."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spotocc.config import DataConfig, GridConfig
from spotocc.data.synthetic import kitti_format, nuscenes_format, occ3d_format
from spotocc.data.synthetic.geometry import kitti_calibration
from spotocc.data.synthetic.sample import (
    DEFAULT_GRIDS,
    DEFAULT_IMAGE_SIZES,
    SPLITS,
    check_format,
    make_sample,
)

# Top-level folders a format writes (removed first when overwriting).
OUTPUT_FOLDERS = {
    "semantickitti": ("dataset", "labels"),
    "nuscenes-occupancy": ("nuscenes", "nuScenes-Occupancy", "depth_gt"),
    "occ3d-nuscenes": (occ3d_format.ROOT, occ3d_format.DEPTH),
}


@dataclass
class SyntheticSummary:
    """What :func:`generate` wrote, and how to point a config at it."""

    out_dir: str
    format: str
    seed: int
    grid: GridConfig
    image_size: tuple[int, int]
    num_train: int
    num_val: int
    files: list[str]  # written files, relative to out_dir, sorted
    class_voxels: dict[str, list[int]]  # split -> voxel count per training class (0 = empty)
    ignored_voxels: dict[str, int]  # split -> voxels labelled 255 (invalid, noise, ignored classes)
    data_overrides: list[str]  # ``data.*=...`` overrides (for get_config) that select this dataset
    seconds: float
    layouts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> scene parameters


def generate(
    out_dir: str | Path,
    format: str = "semantickitti",  # noqa: A002 - the name the CLI and the configs use
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    grid: GridConfig | None = None,
    image_size: tuple[int, int] | None = None,
    lidar_beams: int | None = None,
    lidar_azimuth_steps: int | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    write_npy_labels: bool = True,
) -> SyntheticSummary:
    """Generate ``num_train`` + ``num_val`` procedural street scenes and write them in a real layout.

    ``format``: ``"semantickitti"`` (``out_dir`` = the folder holding ``dataset/sequences``),
    ``"nuscenes-occupancy"`` (``out_dir`` plays the role of ``data/``) or ``"occ3d-nuscenes"`` (see
    :mod:`.occ3d_format`; both sample lists). ``grid``: the GT grid (range
    and ``occ_size``; default :data:`DEFAULT_GRIDS`); ``image_size``: (H, W) of the written images
    (default :data:`DEFAULT_IMAGE_SIZES`). Same arguments give byte-identical files. ``num_workers``
    > 0 renders in that many processes. Existing output of the format in ``out_dir`` is an error
    unless ``overwrite`` (which first removes that format's folders in ``out_dir``).
    """
    t0 = time.perf_counter()
    check_format(format)
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"generate: {name} must be an integer >= 0, got {value!r}")
    grid = grid or DEFAULT_GRIDS[format]
    _check_grid(grid, format)
    size = tuple(image_size or DEFAULT_IMAGE_SIZES[format])
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in size):
        raise ValueError(f"generate: image_size must be (H, W) with integers >= 8, got {image_size!r}")
    out = Path(out_dir)
    existing = [out / d for d in OUTPUT_FOLDERS[format] if (out / d).exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"generate: {', '.join(map(str, existing))} already exist; pass overwrite=True (--overwrite) "
                "to replace them"
            )
        for path in existing:
            shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(split, i) for split, n in (("train", num_train), ("val", num_val)) for i in range(n)]
    options = {
        "format": format,
        "out": str(out),
        "seed": seed,
        "grid": grid,
        "image_size": size,
        "lidar_beams": lidar_beams,
        "lidar_azimuth_steps": lidar_azimuth_steps,
        "write_npy_labels": write_npy_labels,
    }
    if num_workers > 0 and len(jobs) > 1:
        # fork (as torch's DataLoader workers) avoids re-importing the package in every worker; the
        # workers use numpy only.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
            results = list(pool.map(_write_one, [(options, split, i) for split, i in jobs]))
    else:
        results = [_write_one((options, split, i)) for split, i in jobs]

    files: list[Path] = []
    counts = {split: np.zeros(256, dtype=np.int64) for split in SPLITS}
    layouts: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    infos: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for (split, _), res in zip(jobs, results):
        files += res["files"]
        counts[split] += res["counts"]
        layouts[split].append(res["layout"])
        if res["info"] is not None:
            infos[split].append(res["info"])
    if format == "semantickitti":
        calib = kitti_calibration(*size)
        last: dict[str, int] = {s: -1 for s in (*kitti_format.TRAIN_SEQUENCES, kitti_format.VAL_SEQUENCE)}
        for split, i in jobs:
            seq, frame = kitti_format.sequence_and_frame(split, i)
            last[seq] = max(last[seq], frame)
        for seq, frame in last.items():
            files += kitti_format.write_sequence_files(out, seq, frame, calib)
            for sub in ("image_2", "velodyne", "voxels"):
                (out / "dataset" / "sequences" / seq / sub).mkdir(parents=True, exist_ok=True)
    elif format == "occ3d-nuscenes":
        files += occ3d_format.write_lists(out, infos)
    else:
        files += [nuscenes_format.write_infos(out, split, infos[split]) for split in SPLITS]
    num_classes = {"semantickitti": 20, "nuscenes-occupancy": 17, "occ3d-nuscenes": 18}[format]
    return SyntheticSummary(
        out_dir=str(out),
        format=format,
        seed=seed,
        grid=grid,
        image_size=size,  # type: ignore[arg-type]
        num_train=num_train,
        num_val=num_val,
        files=sorted(str(p.relative_to(out)) for p in files),
        class_voxels={s: [int(v) for v in c[:num_classes]] for s, c in counts.items()},
        ignored_voxels={s: int(c[255]) for s, c in counts.items()},
        data_overrides=data_overrides(format, out),
        seconds=time.perf_counter() - t0,
        layouts=layouts,
    )


def _write_one(job: tuple[dict[str, Any], str, int]) -> dict[str, Any]:
    options, split, index = job
    fmt, out = options["format"], Path(options["out"])
    sample = make_sample(
        fmt,
        split,
        index,
        seed=options["seed"],
        grid=options["grid"],
        image_size=options["image_size"],
        lidar_beams=options["lidar_beams"],
        lidar_azimuth_steps=options["lidar_azimuth_steps"],
    )
    info = None
    if fmt == "semantickitti":
        files = kitti_format.write_sample(out, sample, write_npy_labels=options["write_npy_labels"])
    elif fmt == "occ3d-nuscenes":
        info, files = occ3d_format.write_sample(out, sample, seed=options["seed"])
    else:
        info, files = nuscenes_format.write_sample(out, sample, seed=options["seed"])
    return {
        "files": files,
        "info": info,
        "counts": np.bincount(sample.gt.reshape(-1), minlength=256),
        "layout": sample.scene.layout,
    }


def _check_grid(grid: GridConfig, fmt: str) -> None:
    size = tuple(grid.occ_size)
    if len(size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"generate: grid.occ_size must be three positive integers, got {grid.occ_size!r}")
    r = grid.point_cloud_range
    if any(r[a + 3] <= r[a] for a in range(3)):
        raise ValueError(f"generate: grid.point_cloud_range must have max > min per axis, got {r!r}")
    if fmt == "semantickitti" and int(np.prod(size)) % 8:
        raise ValueError(f"generate: SemanticKITTI bit-packed files need X*Y*Z divisible by 8, got {size}")


def data_overrides(fmt: str, out: Path) -> list[str]:
    """``data.*`` overrides that point a preset of the format at a generated dataset in ``out``."""
    if fmt == "semantickitti":
        return [f"data.root={out}"]
    if fmt == "occ3d-nuscenes":
        root = out / occ3d_format.ROOT
        return [
            f"data.root={root}",
            f"data.occ_root={root / 'gts'}",
            f"data.depth_root={out / occ3d_format.DEPTH}",
            f"data.train_info={root / occ3d_format.INFO_FILES['train']}",
            f"data.val_info={root / occ3d_format.INFO_FILES['val']}",
        ]
    return [
        f"data.root={out / 'nuscenes'}",
        f"data.occ_root={out / 'nuScenes-Occupancy'}",
        f"data.depth_root={out / 'depth_gt'}",
        f"data.train_info={out / 'nuscenes' / nuscenes_format.INFO_FILES['train']}",
        f"data.val_info={out / 'nuscenes' / nuscenes_format.INFO_FILES['val']}",
    ]


def source_image_size(data: DataConfig) -> tuple[int, int]:
    """(H, W) of the source images to write for a preset: SemanticKITTI-layout presets get their
    network input size (the readers then resize by 1); nuScenes-layout presets get the 16:9 image
    that the released 0.44 resize turns into their input width (704 -> 1600 x 900)."""
    h, w = data.input_size
    if data.format == "semantickitti":
        return int(h), int(w)
    width = int(round(w / 0.44))
    return int(round(width * 9 / 16)), width
