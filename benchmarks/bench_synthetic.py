"""Synthetic scene generation: time per scene (per stage and end to end) and the image-blind baseline.

    python benchmarks/bench_synthetic.py                     # synthetic_tiny sizes, both formats
    python benchmarks/bench_synthetic.py --train 48 --val 16 --workers 2 --baseline

Prints, per format: the mean time of each stage of one sample (layout, ray-caster setup, cameras,
LiDAR, observability), the end-to-end ``generate`` time per scene (serial and with ``--workers``),
the peak resident memory, and with ``--baseline`` the SC IoU / SSC mIoU on the val scenes of the
best image-blind prediction (per-voxel most frequent training label).
"""

from __future__ import annotations

import argparse
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spotocc.config import get_config
from spotocc.data.synthetic import (
    DEFAULT_GRIDS,
    DEFAULT_IMAGE_SIZES,
    generate,
    most_frequent_labels,
    source_image_size,
    ssc_scores,
)
from spotocc.data.synthetic.geometry import kitti_calibration, kitti_camera, make_world, nuscenes_cameras
from spotocc.data.synthetic.layout import build_scene
from spotocc.data.synthetic.render import observable, render_camera, scan_lidar, scene_raycaster
from spotocc.data.synthetic.sample import SETUPS, sample_rng


def stage_times(fmt: str, grid, image_size, n: int) -> dict[str, float]:
    """Mean seconds per stage of one sample, over ``n`` samples."""
    setup = SETUPS[fmt]
    totals = dict.fromkeys(("layout", "raycaster", "cameras", "lidar", "observable"), 0.0)
    for i in range(n):
        rng = sample_rng(1000, "train", i)
        t = time.perf_counter()
        world = make_world(grid, setup.pad)
        scene = build_scene(
            world,
            rng,
            forward=setup.forward,
            lidar_height=setup.lidar_height,
            gt_range=grid.point_cloud_range,
        )
        t1 = time.perf_counter()
        caster = scene_raycaster(scene)
        t2 = time.perf_counter()
        if fmt == "semantickitti":
            cams = [kitti_camera(kitti_calibration(*image_size), *image_size)]
        else:
            cams = [c for c, *_ in nuscenes_cameras(*image_size)]
        for cam in cams:
            render_camera(scene, caster, cam, rng)
        t3 = time.perf_counter()
        elev = np.linspace(*setup.lidar_elevations, setup.lidar_beams)
        scan_lidar(scene, caster, elev, setup.lidar_azimuth_steps, rng)
        t4 = time.perf_counter()
        observable(scene)
        t5 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            totals[key] += dt
    return {k: v / n for k, v in totals.items()}


def read_gt(fmt: str, out: Path, split: str, grid) -> list[np.ndarray]:
    """The written GT of a split, read back from the files (KITTI: labels/*.npy; nuScenes: densified)."""
    if fmt == "semantickitti":
        seqs = ["08"] if split == "val" else ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]
        return [np.load(p).astype(np.uint8) for s in seqs for p in sorted((out / "labels" / s).glob("*.npy"))]
    with open(out / "nuscenes" / f"nuscenes_occ_infos_{split}.pkl", "rb") as f:
        infos = pickle.load(f)["infos"]
    vols = []
    for info in infos:
        rows = np.load(out / "nuScenes-Occupancy" / f"scene_{info['scene_token']}" / "occupancy"
                       / f"{info['lidar_token']}.npy")  # fmt: skip
        vol = np.zeros(grid.occ_size, dtype=np.uint8)
        labels = np.where(rows[:, 3] == 0, 255, rows[:, 3])
        vol[rows[:, 2], rows[:, 1], rows[:, 0]] = labels
        vols.append(vol)
    return vols


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stage-samples", type=int, default=4)
    parser.add_argument("--formats", nargs="+", default=["semantickitti", "nuscenes-occupancy"])
    parser.add_argument("--baseline", action="store_true", help="score the image-blind baseline on val")
    args = parser.parse_args()
    tiny = get_config("synthetic_tiny")
    for fmt in args.formats:
        # SemanticKITTI at the synthetic_tiny preset's sizes; nuScenes at the generator's defaults.
        grid = tiny.grid if fmt == "semantickitti" else DEFAULT_GRIDS[fmt]
        image_size = source_image_size(tiny.data) if fmt == "semantickitti" else DEFAULT_IMAGE_SIZES[fmt]
        n = args.train + args.val
        print(f"== {fmt}: grid {grid.occ_size}, images {image_size}, {n} scenes")
        stages = stage_times(fmt, grid, image_size, args.stage_samples)
        print("  per sample: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
              + f" (sum {sum(stages.values()) * 1000:.0f} ms)")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            runs = [("serial", 0)] + ([(f"{args.workers} workers", args.workers)] if args.workers else [])
            for name, workers in runs:
                out = Path(tmp) / name.replace(" ", "_")
                t = time.perf_counter()
                generate(
                    out, fmt, num_train=args.train, num_val=args.val, seed=0, grid=grid,
                    image_size=image_size, num_workers=workers,
                )  # fmt: skip
                dt = time.perf_counter() - t
                print(f"  generate ({name}): {dt:.1f} s, {dt / n * 1000:.0f} ms per scene")
            if args.baseline:
                num_classes = 20 if fmt == "semantickitti" else 17
                train = read_gt(fmt, out, "train", grid)
                val = read_gt(fmt, out, "val", grid)
                prior = most_frequent_labels(train, num_classes)
                blind = ssc_scores(((prior, gt) for gt in val), num_classes)
                perfect = ssc_scores(((np.where(gt == 255, 0, gt), gt) for gt in val), num_classes)
                present = [c for c in range(1, num_classes) if any((gt == c).any() for gt in val)]
                blind_present = float(np.mean([blind["class_iou"][c] for c in present]))
                print(f"  image-blind baseline on {len(val)} val scenes (prior: {len(train)} train scenes):"
                      f" SC IoU {100 * blind['sc_iou']:.2f}, SSC mIoU {100 * blind['ssc_miou']:.2f}"
                      f" (over the {len(present)} classes present in val: {100 * blind_present:.2f});"
                      f" perfect prediction: SC IoU {100 * perfect['sc_iou']:.2f},"
                      f" SSC mIoU {100 * perfect['ssc_miou']:.2f}")  # fmt: skip
                print("  baseline class IoU: " + " ".join(f"{100 * v:.1f}" for v in blind["class_iou"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
