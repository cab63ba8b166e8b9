"""``spotocc synth``: procedural street scenes in the SemanticKITTI, nuScenes-Occupancy or Occ3D layout.

    spotocc synth --preset synthetic_tiny --out data/synthetic_tiny --num-train 48 --num-val 12

With ``--preset`` the preset supplies the format, the GT grid and the source image size (see
:func:`spotocc.data.synthetic.source_image_size`); ``--format`` / ``--grid`` / ``--image-size``
override them. The command prints the ``data.*`` overrides that point the preset at the output.
"""

from __future__ import annotations

import argparse
import json
import sys

from spotocc.config import GridConfig, get_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("semantickitti", "nuscenes-occupancy", "occ3d-nuscenes"),
        default=None,
        help="dataset layout (default: the preset's, else semantickitti)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (SemanticKITTI: the folder holding dataset/)"
    )
    parser.add_argument("--num-train", type=int, required=True, help="number of training samples")
    parser.add_argument("--num-val", type=int, required=True, help="number of validation samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed: byte-identical files)")
    parser.add_argument(
        "--preset", default=None, help="a preset or saved config supplying grid and image size"
    )
    parser.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="GT grid size (occ_size) over the format's range")  # fmt: skip
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size of the written camera images")  # fmt: skip
    parser.add_argument(
        "--lidar-beams", type=int, default=None, help="LiDAR beams (default: 64 KITTI, 32 nuScenes)"
    )
    parser.add_argument("--lidar-azimuth-steps", type=int, default=None, help="LiDAR shots per beam and turn")
    parser.add_argument(
        "--workers", type=int, default=0, help="generate in this many processes (0: in this one)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset of the format in --out"
    )


def main(args: argparse.Namespace) -> int:
    from spotocc.data.synthetic import DEFAULT_GRIDS, generate, source_image_size

    for name in ("num_train", "num_val", "workers"):
        if getattr(args, name) < 0:
            print(f"spotocc synth: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    fmt = args.format
    grid = image_size = None
    if args.preset is not None:
        try:
            cfg = get_config(args.preset)
        except (ValueError, FileNotFoundError) as err:
            print(f"spotocc synth: --preset: {err}", file=sys.stderr)
            return 2
        fmt = fmt or cfg.data.format
        grid = cfg.grid
        image_size = source_image_size(cfg.data)
    fmt = fmt or "semantickitti"
    if args.grid is not None:
        base = grid or DEFAULT_GRIDS[fmt]
        grid = GridConfig(
            point_cloud_range=base.point_cloud_range,
            occ_size=tuple(args.grid),
            lss_downsample=base.lss_downsample,
        )
    if args.image_size is not None:
        image_size = tuple(args.image_size)
    try:
        summary = generate(
            args.out,
            fmt,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            grid=grid,
            image_size=image_size,
            lidar_beams=args.lidar_beams,
            lidar_azimuth_steps=args.lidar_azimuth_steps,
            num_workers=args.workers,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        print(f"spotocc synth: {err}", file=sys.stderr)
        return 2
    n = summary.num_train + summary.num_val
    print(
        f"wrote {n} {fmt} samples ({summary.num_train} train, {summary.num_val} val, "
        f"grid {'x'.join(map(str, summary.grid.occ_size))}, "
        f"images {summary.image_size[0]}x{summary.image_size[1]}) "
        f"to {summary.out_dir} in {summary.seconds:.1f} s"
    )
    print("config overrides: " + " ".join(summary.data_overrides))
    print("voxels per class: " + json.dumps(summary.class_voxels))
    return 0
