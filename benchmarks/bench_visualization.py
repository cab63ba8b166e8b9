"""Seconds per frame of the headless pictures at the benchmarks' grid sizes, on the CPU.

Scenes: the procedural street (:func:`spotocc.visualization.street_scene`: ground, road, buildings,
cars, trees, poles) at 256x256x32 (SemanticKITTI range) and 512x512x40 (nuScenes range), plain and
with clutter (3% of the air above the ground filled with random small objects and 10% of the ground
surface voxels removed, so the surface has many more faces, as a noisy prediction does). Timed after
a warm-up (median of the repeats): the 3D render at 800x520 with 1 and 2x2 samples per pixel, the
BEV map, and a whole panel (GT + prediction, each 3D at 2x2 samples + BEV, legend). Peak memory is
numpy's allocations during one 3D render at 1 sample per pixel (tracemalloc). Run:

    python benchmarks/bench_visualization.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from spotocc.visualization import bev_image, render_prediction_panel, scene_frame, street_scene
from spotocc.visualization.render import _voxel_faces, default_camera, label_lut, rasterize_voxels, render_3d


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cluttered(labels: np.ndarray, class_set: str, seed: int = 0) -> np.ndarray:
    """The scene with random clutter in the air and holes in the ground (many more surface faces)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    ground_top = np.argmax(np.cumsum(labels > 0, axis=2) == (labels > 0).sum(axis=2, keepdims=True), axis=2)
    z = np.arange(labels.shape[2])[None, None, :]
    air = (labels == 0) & (z > ground_top[:, :, None]) & (z < ground_top[:, :, None] + 10)
    clutter_class = 15 if class_set == "semantickitti" else 16  # vegetation
    out[air & (rng.random(labels.shape) < 0.03)] = clutter_class
    surface = (labels > 0) & (z == ground_top[:, :, None])
    out[surface & (rng.random(labels.shape) < 0.10)] = 0
    return out


def face_count(labels: np.ndarray, class_set: str) -> int:
    frame = scene_frame(class_set)
    camera = default_camera(frame)
    _, drawn = label_lut(class_set)
    return sum(len(g) for g in _voxel_faces(labels, drawn, frame.point_cloud_range, camera.eye))


def bench_scene(label: str, labels: np.ndarray, pred: np.ndarray, class_set: str, repeats: int) -> str:
    """One table row: faces, 3D render (1 and 2x2 samples), BEV, panel, peak memory of one render."""
    frame = scene_frame(class_set)
    small = default_camera(frame, width=800, height=520)
    t_small = seconds(lambda: rasterize_voxels(labels, class_set, camera=small), repeats)
    t_large = seconds(lambda: render_3d(labels, class_set, camera=small, supersample=2), repeats)
    t_bev = seconds(lambda: bev_image(labels, class_set, forward=frame.forward), repeats)
    t_panel = seconds(
        lambda: render_prediction_panel(pred, gt=labels, class_set=class_set, sample_id="x"), repeats
    )
    tracemalloc.start()
    rasterize_voxels(labels, class_set, camera=small)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return (
        f"{label:<28} {face_count(labels, class_set):>8} {t_small:>10.2f}s {t_large:>14.2f}s "
        f"{t_bev:>6.3f}s {t_panel:>6.2f}s {peak:>8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    widths = (-28, 8, 11, 15, 7, 7, 8)
    header = ("scene", "faces", "3D 800x520", "3D 2x2 samples", "BEV", "panel", "peak MB")
    print(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths)))
    for class_set, size in (("semantickitti", (256, 256, 32)), ("nuscenes", (512, 512, 40))):
        street = street_scene(size, class_set)
        pred = cluttered(street, class_set, seed=1)
        grid = "x".join(map(str, size))
        print(bench_scene(f"{grid} street", street, pred, class_set, args.repeats))
        print(
            bench_scene(
                f"{grid} street + clutter", cluttered(street, class_set), pred, class_set, args.repeats
            )
        )


if __name__ == "__main__":
    main()
