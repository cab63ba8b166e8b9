"""Per-sample loading time of the two readers at the real data sizes, stage by stage.

Writes one SemanticKITTI frame (1241x376 PNG, 256x256x32 labels, 120k LiDAR points) and one
nuScenes-Occupancy sample (6 x 1600x900 JPEG, 300k GT rows, 5k depth rows per camera) of random
content to a temporary folder, then times ``dataset[i]`` (train and test transforms) and the stages
inside it, after a warm-up. Run:

    python benchmarks/data_loading.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import pickle
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spotocc.config import AugmentationConfig
from spotocc.data import NuScenesOccupancy, SemanticKITTI
from spotocc.data.depth import lidar_depth_targets, pixel_depth_targets
from spotocc.data.files import read_image
from spotocc.data.nuscenes_occ import CAMERAS, load_occupancy
from spotocc.data.semantic_kitti import read_voxel_gt
from spotocc.data.transforms import (
    augment_image,
    augmentation_matrices,
    normalize_image,
    sample_image_augmentation,
)


def timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def write_kitti(root: Path, rng: np.random.Generator) -> None:
    seq = root / "dataset/sequences/08"
    for sub in ("voxels", "image_2", "velodyne"):
        (seq / sub).mkdir(parents=True)
    p2 = "7.07e2 0 6.01e2 4.5e1 0 7.07e2 1.83e2 -3.4e-1 0 0 1 2.3e-3"
    tr = "-1.8e-3 -9.99e-1 -8.1e-3 -5.4e-3 -6.4e-3 8.1e-3 -9.99e-1 -7.8e-2 9.99e-1 -1.8e-3 -6.4e-3 -2.7e-1"
    (seq / "calib.txt").write_text(f"P0: {p2}\nP1: {p2}\nP2: {p2}\nP3: {p2}\nTr: {tr}\n")
    labels = rng.choice(np.array([0, 0, 0, 0, 40, 48, 50, 70, 72, 10], dtype=np.uint16), size=256 * 256 * 32)
    labels.tofile(seq / "voxels/000000.label")
    np.packbits(rng.random(256 * 256 * 32) < 0.3).tofile(seq / "voxels/000000.invalid")
    np.packbits(labels > 0).tofile(seq / "voxels/000000.bin")
    image = rng.integers(0, 255, (376, 1241, 3), dtype=np.uint8)
    Image.fromarray(image).save(seq / "image_2/000000.png")
    points = np.c_[rng.uniform(-50, 50, (120_000, 2)), rng.uniform(-3, 2, 120_000), rng.random(120_000)]
    points.astype(np.float32).tofile(seq / "velodyne/000000.bin")


def write_nusc(root: Path, rng: np.random.Generator) -> None:
    cams = {}
    for i, camera in enumerate(CAMERAS):
        path = root / f"samples/{camera}/img{i}.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (900, 1600, 3), dtype=np.uint8)).save(path, quality=90)
        (root / "depth").mkdir(exist_ok=True)
        rows = np.c_[rng.uniform(0, 1600, 5000), rng.uniform(0, 900, 5000), rng.uniform(1, 60, 5000)]
        rows.astype(np.float32).tofile(root / f"depth/img{i}.jpg.bin")
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        cams[camera] = {
            "data_path": f"samples/{camera}/img{i}.jpg",
            "cam_intrinsic": np.array([[1260.0, 0, 800], [0, 1260, 450], [0, 0, 1]]),
            "sensor2lidar_rotation": rot,
            "sensor2lidar_translation": rng.normal(size=3),
        }
    info = {"token": "t", "timestamp": 0, "scene_token": "s", "lidar_token": "l", "cams": cams}
    with open(root / "infos.pkl", "wb") as f:
        pickle.dump({"infos": [info]}, f)
    occ = root / "occ/scene_s/occupancy"
    occ.mkdir(parents=True)
    cells = rng.choice(512 * 512 * 40, 300_000, replace=False)  # distinct voxels, as in the real files
    x, y, z = np.unravel_index(cells, (512, 512, 40))
    np.save(occ / "l.npy", np.c_[z, y, x, rng.integers(0, 17, 300_000)].astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's view
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_kitti(tmp / "kitti", rng)
        write_nusc(tmp / "nusc", rng)
        aug = AugmentationConfig(bda=True)
        kitti_train = SemanticKITTI(tmp / "kitti", "val", augmentation=aug, train=True)
        kitti_test = SemanticKITTI(tmp / "kitti", "val")
        nusc_args = (tmp / "nusc", tmp / "nusc/infos.pkl", tmp / "nusc/occ")
        nusc_train = NuScenesOccupancy(*nusc_args, depth_root=tmp / "nusc/depth", train=True)
        nusc_test = NuScenesOccupancy(*nusc_args)

        seq = tmp / "kitti/dataset/sequences/08"
        img = read_image(seq / "image_2/000000.png")
        params = sample_image_augmentation((376, 1241), (384, 1280), aug, train=True, rng=rng)
        augmented = augment_image(img, params)
        s = kitti_train[0]
        points = torch.from_numpy(np.fromfile(seq / "velodyne/000000.bin", dtype=np.float32).reshape(-1, 4))
        geometry = (s["rots"], s["trans"], s["intrins"], s["post_rots"], s["post_trans"])
        depth_rows = np.fromfile(tmp / "nusc/depth/img0.jpg.bin", dtype=np.float32).reshape(-1, 3)
        nusc_params = sample_image_augmentation((900, 1600), (256, 704), aug, train=True, rng=rng)
        nusc_img = read_image(tmp / "nusc/samples/CAM_FRONT/img1.jpg")

        rows = [
            ("KITTI   sample, train (aug + depth + flips)", lambda: kitti_train[0]),
            ("KITTI   sample, test", lambda: kitti_test[0]),
            ("  PNG decode 1241x376", lambda: read_image(seq / "image_2/000000.png")),
            ("  resize/crop/flip/rotate to 384x1280", lambda: augment_image(img, params)),
            ("  post_rot/post_tran", lambda: augmentation_matrices(params)),
            ("  normalise 384x1280", lambda: normalize_image(augmented, bgr_input=False)),
            ("  GT .label + .invalid 256x256x32", lambda: read_voxel_gt(
                seq / "voxels/000000.label", seq / "voxels/000000.invalid", (256, 256, 32))),
            ("  depth targets, 120k points", lambda: lidar_depth_targets(points, *geometry, (384, 1280))),
            ("nuScenes sample, train (6 cams + depth)", lambda: nusc_train[0]),
            ("nuScenes sample, test", lambda: nusc_test[0]),
            ("  JPEG decode 1600x900", lambda: read_image(tmp / "nusc/samples/CAM_FRONT/img1.jpg")),
            ("  resize/crop/flip/rotate to 256x704", lambda: augment_image(nusc_img, nusc_params)),
            ("  GT 300k rows -> 512x512x40", lambda: load_occupancy(tmp / "nusc/occ/scene_s/occupancy/l.npy",
                                                                   (512, 512, 40))),
            ("  depth targets, 5k rows, one camera", lambda: pixel_depth_targets(depth_rows, nusc_params,
                                                                                  (256, 704))),
        ]  # fmt: skip
        print(f"{'stage':48s} {'ms / call':>10s}   (1 thread, mean of {args.repeats} after warm-up)")
        for name, fn in rows:
            print(f"{name:48s} {timeit(fn, args.repeats):10.2f}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
