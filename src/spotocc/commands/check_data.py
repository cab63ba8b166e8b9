"""``spotocc check-data``: report every missing, truncated, wrong-size or unreadable dataset file.

Checks every file of a SemanticKITTI, nuScenes-Occupancy or Occ3D tree the way the readers will read it
(:mod:`spotocc.data.check`), so the messages are the ones training would stop with, but all of them
at once::

    spotocc check-data --preset spotocc_kitti --set data.root=data/SemanticKITTI
    spotocc check-data --format semantickitti --root data/synthetic_tiny --occ-size 64 64 16
    spotocc check-data --preset spotocc_nusc_256 --split val --quick
    spotocc check-data --preset spotocc_occ3d --set data.val_info=data/occ3d/annotations.json --split val

The exit code is 1 if any problem was found, 0 otherwise.
"""

from __future__ import annotations

import argparse

from spotocc.config import Config, apply_overrides, get_config
from spotocc.data.check import run_checks

DEFAULT_PRESETS = {
    "semantickitti": "spotocc_kitti",
    "nuscenes-occupancy": "spotocc_nusc_256",
    "occ3d-nuscenes": "spotocc_occ3d",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", help="take format, paths, grid and cameras from this preset (or a .json config)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. data.root=/data/kitti (repeatable)",
    )
    parser.add_argument(
        "--format", choices=sorted(DEFAULT_PRESETS), help="dataset format (default: the preset's)"
    )
    parser.add_argument(
        "--root", help="dataset root (SemanticKITTI: holds dataset/sequences; nuScenes: data root)"
    )
    parser.add_argument("--occ-root", help="nuScenes-Occupancy GT root (Occ3D: the gts folder)")
    parser.add_argument("--depth-root", help="nuScenes depth_gt folder")
    parser.add_argument("--train-info", help="nuScenes train info .pkl (Occ3D: or annotations.json)")
    parser.add_argument("--val-info", help="nuScenes val info .pkl (Occ3D: or annotations.json)")
    parser.add_argument("--occ-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="grid size")
    parser.add_argument("--cameras", nargs="+", help="camera folders (KITTI) or names (nuScenes)")
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        help="split to check (repeatable; default: the config's train and val splits)",
    )
    parser.add_argument("--every-5th-scan", action="store_true", help="SemanticKITTI: only every 5th frame")
    parser.add_argument(
        "--quick", action="store_true", help="check image and .npy headers only, do not decode or read values"
    )
    parser.add_argument("--workers", type=int, default=4, help="threads checking files in parallel")
    parser.add_argument("--max-report", type=int, default=200, help="print at most this many problems")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config ``check-data`` checks against: a preset (default: the format's paper preset) + flags."""
    preset = args.preset or DEFAULT_PRESETS.get(args.format or "", None)
    if preset is None:
        raise SystemExit("check-data: give --preset or --format")
    cfg = get_config(preset, args.overrides)
    if args.format:
        cfg.data.format = args.format
    updates = {
        "root": args.root,
        "occ_root": args.occ_root,
        "depth_root": args.depth_root,
        "train_info": args.train_info,
        "val_info": args.val_info,
    }
    apply_overrides(cfg, [f"data.{k}={v!r}" for k, v in updates.items() if v is not None])
    if args.occ_size:
        cfg.grid.occ_size = tuple(args.occ_size)
    if args.cameras:
        cfg.data.cameras = tuple(args.cameras)
    if args.every_5th_scan:
        cfg.data.every_5th_scan = True
    return cfg


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    grid = "x".join(str(v) for v in cfg.grid.occ_size)
    print(
        f"checking {cfg.data.format} at {cfg.data.root} (grid {grid}, cameras {', '.join(cfg.data.cameras)})"
    )
    try:
        report = run_checks(cfg, args.splits, quick=args.quick, workers=args.workers)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    for note in report.notes:
        print(f"note    {note}")
    for problem in report.problems[: args.max_report]:
        print(problem)
    if len(report.problems) > args.max_report:
        print(f"... and {len(report.problems) - args.max_report} more problems")
    print(("OK: " if report.ok else "FAILED: ") + report.summary())
    return 0 if report.ok else 1
