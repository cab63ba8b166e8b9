"""Check a dataset tree file by file: every missing, truncated, wrong-size or unreadable file at once.

Walks a SemanticKITTI, nuScenes-Occupancy or Occ3D-nuScenes tree the way the readers will read it and
checks every file with the readers' own loading functions (:mod:`spotocc.data.files` and the reader
modules), so the messages are the ones training would stop with. ``spotocc check-data`` is its command.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from spotocc.config import Config
from spotocc.data import nuscenes_occ as nusc
from spotocc.data import semantic_kitti as kitti
from spotocc.data.camera_views import depth_path, read_depth_points
from spotocc.data.files import DataFileError, MissingFileError, probe_image, read_image, require_file
from spotocc.data.occ3d_nuscenes import GT_KEYS, read_labels
from spotocc.data.occ3d_samples import Occ3DRecord, load_sample_list

FORMATS = ("nuscenes-occupancy", "occ3d-nuscenes", "semantickitti")


@dataclass
class Problem:
    path: str
    problem: str
    missing: bool = False

    def __str__(self) -> str:
        return f"{'MISSING' if self.missing else 'BAD':8s}{self.path}: {self.problem}"


@dataclass
class Report:
    """Problems found, files checked and informational notes."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    _seen: set[str] = field(default_factory=set)

    def check(self, key: str | Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one file check once per ``key``; record its error, return its result (None on error)."""
        key = str(key)
        if key in self._seen:
            return None
        self._seen.add(key)
        self.files_checked += 1
        try:
            return fn(*args, **kwargs)
        except DataFileError as err:
            self.problems.append(Problem(err.path, err.problem, isinstance(err, MissingFileError)))
            return None

    def merge(self, other: Report) -> None:
        """Add another report's findings, counting a file or a problem seen by both only once."""
        self.files_checked += len(other._seen - self._seen)
        self._seen |= other._seen
        known = {(p.path, p.problem) for p in self.problems}
        self.problems.extend(p for p in other.problems if (p.path, p.problem) not in known)
        self.notes.extend(other.notes)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        missing = sum(p.missing for p in self.problems)
        return (
            f"{self.files_checked} files checked, {len(self.problems)} problems "
            f"({missing} missing, {len(self.problems) - missing} bad)"
        )


def _image_checker(quick: bool) -> Callable[[Path], Any]:
    return probe_image if quick else read_image


def _call(task: Callable[[], Report]) -> Report:
    return task()


def _run_parallel(tasks: Iterable[Callable[[], Report]], workers: int) -> list[Report]:
    tasks = list(tasks)
    if workers <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # file I/O and PIL decoding release the GIL
        return list(pool.map(_call, tasks))


# --------------------------------------------------------------------------------------------------
# SemanticKITTI


def _check_kitti_frame(
    root: Path,
    sequence: str,
    frame: str,
    *,
    occ_size: Sequence[int],
    cameras: Sequence[str],
    with_gt: bool,
    with_lidar: bool,
    quick: bool,
) -> Report:
    report = Report()
    seq = kitti.sequence_dir(root, sequence)
    for camera in cameras:
        path = seq / camera / f"{frame}.png"
        report.check(path, _image_checker(quick), path)
    voxels = seq / "voxels"
    if with_gt:
        npy = kitti.label_npy_path(root, sequence, frame)
        if npy.is_file():
            report.check(npy, kitti.read_preprocessed_gt, npy, occ_size, header_only=quick)
        else:
            # Raw voxel files: any content of the right size is valid, so their sizes are checked
            # without reading them (a full SemanticKITTI holds ~90 GB of .label files).
            label = voxels / f"{frame}.label"
            report.check(label, kitti.read_raw_labels, label, occ_size, size_only=True)
            invalid = voxels / f"{frame}.invalid"
            report.check(
                invalid, kitti.read_bitpacked_voxels, invalid, occ_size, "invalid-voxel file", size_only=True
            )
    occupancy = voxels / f"{frame}.bin"
    if occupancy.exists():  # not used by the camera model, but a wrong size means a wrong grid
        report.check(
            occupancy,
            kitti.read_bitpacked_voxels,
            occupancy,
            occ_size,
            "voxel occupancy file",
            size_only=True,
        )
    if with_lidar:
        velodyne = seq / "velodyne" / f"{frame}.bin"
        report.check(velodyne, kitti.read_velodyne, velodyne, size_only=True)
    return report


def check_semantic_kitti(
    root: str | Path,
    *,
    splits: Sequence[str],
    train_splits: Sequence[str] = ("train",),
    occ_size: Sequence[int] = (256, 256, 32),
    cameras: Sequence[str] = ("image_2",),
    every_5th_scan: bool = False,
    quick: bool = False,
    workers: int = 4,
) -> Report:
    """Check the files of ``splits`` of a SemanticKITTI tree (velodyne scans only for ``train_splits``)."""
    root = Path(root)
    report = Report()
    unknown = [c for c in cameras if c not in kitti.CAMERA_MATRICES]
    if unknown:
        raise ValueError(
            f"SemanticKITTI cameras must be among {sorted(kitti.CAMERA_MATRICES)}, got {unknown}"
        )
    if not (root / "dataset" / "sequences").is_dir():
        report.problems.append(
            Problem(str(root / "dataset" / "sequences"), "sequences folder is missing", True)
        )
        return report
    tasks: list[Callable[[], Report]] = []
    queued: set[tuple[str, str, bool, bool]] = set()
    for split in splits:
        sequences = kitti.split_sequences(split)
        with_gt = split not in kitti.SPLITS_WITHOUT_GT
        with_lidar = split in train_splits
        n_frames = 0
        absent = [s for s in sequences if not kitti.sequence_dir(root, s).is_dir()]
        if absent:
            report.notes.append(f"split {split}: sequences {', '.join(absent)} are not present")
        for sequence in sequences:
            seq = kitti.sequence_dir(root, sequence)
            if sequence in absent:
                continue
            frames = kitti.list_frames(root, sequence)
            if every_5th_scan:
                frames = [f for f in frames if kitti.is_every_5th(f)]
            if not frames:
                report.notes.append(f"split {split}: sequence {sequence} has no frames")
                continue
            n_frames += len(frames)
            calib_path = seq / "calib.txt"
            calib = report.check(calib_path, kitti.read_calib, calib_path)
            for camera in cameras if calib is not None else ():
                if kitti.CAMERA_MATRICES[camera] not in calib:
                    problem = (
                        f"calibration has no {kitti.CAMERA_MATRICES[camera]} matrix (needed by {camera})"
                    )
                    report.problems.append(Problem(str(calib_path), problem))
            for frame in frames:
                key = (sequence, frame, with_gt, with_lidar)  # val and test share sequence 08
                if key in queued:
                    continue
                queued.add(key)
                tasks.append(
                    partial(
                        _check_kitti_frame,
                        root,
                        sequence,
                        frame,
                        occ_size=occ_size,
                        cameras=cameras,
                        with_gt=with_gt,
                        with_lidar=with_lidar,
                        quick=quick,
                    )
                )
        if n_frames == 0:
            report.problems.append(
                Problem(str(root), f"split {split}: no frames in sequences {', '.join(sequences)}")
            )
    for sub in _run_parallel(tasks, workers):
        report.merge(sub)
    return report


# --------------------------------------------------------------------------------------------------
# nuScenes-Occupancy


def _check_nusc_sample(
    info: dict[str, Any],
    *,
    data_root: Path,
    occ_root: Path,
    depth_root: Path | None,
    cameras: Sequence[str],
    occ_size: Sequence[int],
    num_classes: int,
    quick: bool,
) -> Report:
    report = Report()
    for camera in cameras:
        data_path = str(info["cams"][camera]["data_path"])
        image = nusc.resolve_data_path(data_path, data_root)
        report.check(image, _image_checker(quick), image)
        if depth_root is not None:
            depth = nusc.depth_path(depth_root, data_path)
            report.check(depth, nusc.read_depth_points, depth)
    occ = nusc.occupancy_path(occ_root, info)
    report.check(occ, nusc.read_sparse_occupancy, occ, occ_size, num_classes)
    return report


def check_nuscenes_occupancy(
    data_root: str | Path,
    occ_root: str | Path,
    info_files: dict[str, str | Path],
    *,
    depth_root: str | Path | None = None,
    train_splits: Sequence[str] = ("train",),
    cameras: Sequence[str] = nusc.CAMERAS,
    occ_size: Sequence[int] = (512, 512, 40),
    num_classes: int = 17,
    quick: bool = False,
    workers: int = 4,
) -> Report:
    """Check info files (``split -> path``) and every image, GT and (train) depth file they name."""
    report = Report()
    tasks: list[Callable[[], Report]] = []
    for split, info_file in info_files.items():
        info_file = Path(info_file)
        infos = report.check(info_file, nusc.read_info_list, info_file)
        if infos is None:
            continue
        split_depth = Path(depth_root) if (depth_root is not None and split in train_splits) else None
        if split in train_splits and depth_root is None:
            report.problems.append(
                Problem(str(info_file), f"split {split}: no depth root given for the depth targets")
            )
        for index, info in enumerate(infos):
            try:
                nusc.check_info(info, index, info_file, cameras)
            except DataFileError as err:
                report.problems.append(Problem(err.path, err.problem))
                continue
            tasks.append(
                partial(
                    _check_nusc_sample,
                    info,
                    data_root=Path(data_root),
                    occ_root=Path(occ_root),
                    depth_root=split_depth,
                    cameras=cameras,
                    occ_size=occ_size,
                    num_classes=num_classes,
                    quick=quick,
                )
            )
        report.notes.append(f"split {split}: {len(infos)} samples in {info_file}")
    for sub in _run_parallel(tasks, workers):
        report.merge(sub)
    return report


# --------------------------------------------------------------------------------------------------
# Occ3D-nuScenes


def probe_labels(path: str | Path) -> list[str]:
    """The arrays of a ``labels.npz`` (the zip directory only), or DataFileError if one is missing."""
    path = require_file(path, "Occ3D labels file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataFileError(path, f"labels file is not a readable .npz: {err!r}") from err
    missing = [k for k in GT_KEYS if k not in names]
    if missing:
        raise DataFileError(path, f"labels file lacks {missing} (has {sorted(names)})")
    return names


def _check_occ3d_sample(
    record: Occ3DRecord,
    *,
    depth_root: Path | None,
    cameras: Sequence[str],
    occ_size: Sequence[int],
    quick: bool,
) -> Report:
    report = Report()
    for camera in cameras:
        cam = record.cameras[camera]
        report.check(cam.image_path, _image_checker(quick), cam.image_path)
        if depth_root is not None:
            depth = depth_path(depth_root, cam.data_path)
            report.check(depth, read_depth_points, depth)
    if quick:
        report.check(record.gt_path, probe_labels, record.gt_path)
    else:
        report.check(record.gt_path, read_labels, record.gt_path, occ_size)
    return report


def check_occ3d_nuscenes(
    data_root: str | Path,
    sample_lists: dict[str, str | Path],
    *,
    gts_root: str | Path | None = None,
    depth_root: str | Path | None = None,
    train_splits: Sequence[str] = ("train",),
    cameras: Sequence[str] = nusc.CAMERAS,
    occ_size: Sequence[int] = (200, 200, 16),
    quick: bool = False,
    workers: int = 4,
) -> Report:
    """Check sample lists (``split -> annotations.json or info .pkl``) and every image, labels.npz and
    (train) depth file they name. An annotations.json is read for the split's ``<split>_split``."""
    report = Report()
    tasks: list[Callable[[], Report]] = []
    for split, sample_list in sample_lists.items():
        sample_list = Path(sample_list)
        records = report.check(
            f"{sample_list}#{split}", load_sample_list, sample_list, split,
            data_root=data_root, gts_root=gts_root, cameras=cameras,
        )  # fmt: skip
        if records is None:
            continue
        split_depth = Path(depth_root) if (depth_root is not None and split in train_splits) else None
        if split in train_splits and depth_root is None:
            report.problems.append(
                Problem(str(sample_list), f"split {split}: no depth root given for the depth targets")
            )
        for record in records:
            tasks.append(
                partial(
                    _check_occ3d_sample,
                    record,
                    depth_root=split_depth,
                    cameras=cameras,
                    occ_size=occ_size,
                    quick=quick,
                )  # fmt: skip
            )
        report.notes.append(f"split {split}: {len(records)} samples in {sample_list}")
    for sub in _run_parallel(tasks, workers):
        report.merge(sub)
    return report


def run_checks(
    cfg: Config, splits: Sequence[str] | None = None, *, quick: bool = False, workers: int = 4
) -> Report:
    """Check the dataset ``cfg.data`` describes, for ``splits`` (default: train and val splits)."""
    data = cfg.data
    splits = list(splits or dict.fromkeys([data.train_split, data.val_split]))
    if data.format == "semantickitti":
        return check_semantic_kitti(
            data.root, splits=splits, train_splits=(data.train_split,), occ_size=cfg.grid.occ_size,
            cameras=data.cameras, every_5th_scan=data.every_5th_scan, quick=quick, workers=workers,
        )  # fmt: skip
    if data.format == "nuscenes-occupancy":
        known = {"train": data.train_info, "val": data.val_info}
        unknown = [s for s in splits if s not in known]
        if unknown:
            raise ValueError(f"unknown nuScenes-Occupancy split(s) {unknown}; expected 'train' and/or 'val'")
        return check_nuscenes_occupancy(
            data.root, data.occ_root, {s: known[s] for s in splits}, depth_root=data.depth_root,
            train_splits=(data.train_split,), cameras=data.cameras, occ_size=cfg.grid.occ_size,
            num_classes=cfg.model.head.num_classes, quick=quick, workers=workers,
        )  # fmt: skip
    if data.format == "occ3d-nuscenes":
        known = {"train": data.train_info, "val": data.val_info}
        unknown = [s for s in splits if s not in known]
        if unknown:
            raise ValueError(f"unknown Occ3D split(s) {unknown}; expected 'train' and/or 'val'")
        return check_occ3d_nuscenes(
            data.root, {s: known[s] for s in splits}, gts_root=data.occ_root or None,
            depth_root=data.depth_root, train_splits=(data.train_split,), cameras=data.cameras,
            occ_size=cfg.grid.occ_size, quick=quick, workers=workers,
        )  # fmt: skip
    raise ValueError(f"unknown data.format {data.format!r}; expected one of {list(FORMATS)}")
