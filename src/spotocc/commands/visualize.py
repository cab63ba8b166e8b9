"""``spotocc visualize``: pictures of predictions, ground truth and cameras; animations; IoU charts.

    spotocc visualize scene --pred preds/08_000000.npz --out pic.png
    spotocc visualize scene --pred preds/ --preset spotocc_kitti --data data/SemanticKITTI \\
        --split val --sample-id 08_000000 --out pic.png          # cameras + GT + prediction
    spotocc visualize scene --preset spotocc_kitti --data data/SemanticKITTI --index 0 --out gt.png
    spotocc visualize sequence --pred preds/ --preset spotocc_kitti --out seq.gif [--fps 4 --every 5]
    spotocc visualize chart eval_spot.json [eval_sparseocc.json] --out chart.png

Everything is drawn off-screen (numpy, PIL, matplotlib's Agg canvas): no display is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Headless whatever the environment says: nothing here may open a window.
os.environ["MPLBACKEND"] = "Agg"

PAPER_GRIDS = {(256, 256, 32): "semantickitti", (512, 512, 40): "nuscenes"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Pictures of predictions, ground truth and cameras; animations; IoU charts."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines())
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    scene = modes.add_parser("scene", help="one sample: cameras, ground truth and/or prediction (PNG)")
    _common(scene)
    scene.add_argument("--sample-id", help="sample to draw (prediction file stem, dataset sample id)")
    scene.add_argument("--index", type=int, help="sample to draw by position (sorted predictions or dataset)")
    scene.add_argument("--out", required=True, help="output PNG")

    sequence = modes.add_parser(
        "sequence", aliases=["gif"], help="an animation over a directory of predictions (.gif or .mp4)"
    )
    _common(sequence)
    sequence.add_argument("--fps", type=float, default=4.0, help="frames per second (default 4)")
    sequence.add_argument("--every", type=int, default=1, help="use every n-th prediction (default 1)")
    sequence.add_argument("--limit", type=int, help="at most this many frames")
    sequence.add_argument("--out", required=True, help="output .gif or .mp4 (MP4 needs imageio-ffmpeg)")

    chart = modes.add_parser("chart", help="per-class IoU bars of one eval JSON, or a comparison of several")
    chart.add_argument("eval_json", nargs="+", help="eval JSON file(s) from `spotocc eval --json`")
    chart.add_argument("--labels", nargs="+", help="run names (default: the file names)")
    chart.add_argument(
        "--class-set", choices=("semantickitti", "nuscenes", "occ3d"), help="if the files do not say"
    )
    chart.add_argument("--title", help="chart title")
    chart.add_argument("--out", required=True, help="output PNG")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", help="a prediction .npz (key 'labels') or a directory of <sample_id>.npz")
    parser.add_argument("--preset", help="preset or saved config (.json): class set, range, data settings")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--data",
        help="dataset root: also draw camera images and ground truth (needs --preset; nuScenes GT and "
        "info paths via --set data.occ_root=... data.val_info=...)",
    )
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument(
        "--class-set",
        choices=("semantickitti", "nuscenes"),
        help="without --preset (else from the grid size)",
    )
    parser.add_argument("--show-ignore", action="store_true", help="draw voxels labelled 255 in grey")
    parser.add_argument("--title", help="title above the picture (default: the preset name)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(800, 520), metavar=("W", "H"), help="3D view size in pixels"
    )
    parser.add_argument(
        "--supersample", type=int, default=2, help="3D samples per pixel and direction (1: fastest)"
    )
    parser.add_argument(
        "--zoom",
        type=float,
        default=1.0,
        help="3D view of the area within 1/ZOOM of the range around the ego",
    )


# --------------------------------------------------------------------------------------------------
# What to draw


class _Context:
    """Config, class set, range and (optionally) the dataset resolved from the arguments."""

    def __init__(self, args: argparse.Namespace, grid_shape: tuple[int, ...] | None) -> None:
        from spotocc.config import get_config

        self.cfg = get_config(args.preset, args.overrides) if args.preset else None
        if args.data and self.cfg is None:
            raise SystemExit("visualize: --data needs --preset (the dataset format, grid and cameras)")
        if self.cfg is not None:
            self.class_set = args.class_set or self.cfg.data.class_set
            self.point_cloud_range = tuple(self.cfg.grid.point_cloud_range)
            self.bgr_input: bool | None = self.cfg.data.bgr_input
        else:
            self.class_set = args.class_set or PAPER_GRIDS.get(tuple(grid_shape or ()))
            if self.class_set is None:
                raise SystemExit(
                    f"visualize: cannot tell the class set of a {grid_shape} grid; "
                    "give --class-set or --preset"
                )
            self.point_cloud_range = None
            self.bgr_input = None
        self.title = args.title if args.title is not None else (self.cfg.name if self.cfg else None)
        self.dataset = None
        self.sample_ids: list[str] = []
        if args.data:
            from spotocc.data import build_dataset

            self.cfg.data.root = args.data
            self.dataset = build_dataset(self.cfg, args.split, train=False)
            self.sample_ids = dataset_sample_ids(self.dataset)

    def sample(self, sample_id: str) -> Mapping[str, Any] | None:
        if self.dataset is None:
            return None
        try:
            index = self.sample_ids.index(sample_id)
        except ValueError:
            raise SystemExit(f"visualize: sample {sample_id!r} is not in the dataset split") from None
        return self.dataset[index]


def dataset_sample_ids(dataset: Any) -> list[str]:
    """Sample ids in dataset order, without loading samples where the reader lists its frames."""
    if hasattr(dataset, "frames"):  # SemanticKITTI: (sequence, frame) pairs
        return [f"{sequence}_{frame}" for sequence, frame in dataset.frames]
    if hasattr(dataset, "infos"):  # nuScenes-Occupancy: sample tokens
        return [str(info["token"]) for info in dataset.infos]
    return [str(dataset[i]["meta"]["sample_id"]) for i in range(len(dataset))]


def _grid_shape(pred_file: Path | None) -> tuple[int, ...] | None:
    if pred_file is None:
        return None
    from spotocc.visualization.predictions import load_prediction

    return tuple(load_prediction(pred_file).shape)


def _pick_prediction(args: argparse.Namespace) -> Path | None:
    from spotocc.visualization.predictions import list_predictions

    if not args.pred:
        return None
    pred = Path(args.pred)
    if pred.is_file():
        return pred
    if not pred.exists():
        raise SystemExit(f"visualize: --pred {pred} does not exist")
    files = list_predictions(pred)
    if args.sample_id:
        matches = [f for f in files if f.stem == args.sample_id]
        if not matches:
            raise SystemExit(
                f"visualize: no prediction for sample {args.sample_id!r} in {pred} ({len(files)} files, "
                f"e.g. {', '.join(f.stem for f in files[:3])})"
            )
        return matches[0]
    index = args.index if args.index is not None else 0
    if not -len(files) <= index < len(files):
        raise SystemExit(f"visualize: --index {index} is out of range for {len(files)} predictions in {pred}")
    if args.index is None:
        print(f"visualize: {pred} holds {len(files)} predictions; drawing {files[0].name} (use --sample-id)")
    return files[index]


# --------------------------------------------------------------------------------------------------
# Modes


def _scene(args: argparse.Namespace) -> int:
    from spotocc.visualization.panel import save_prediction_panel
    from spotocc.visualization.predictions import load_prediction

    pred_file = _pick_prediction(args)
    if pred_file is None and not args.data:
        raise SystemExit("visualize scene: give --pred and/or --preset with --data")
    ctx = _Context(args, _grid_shape(pred_file))
    pred = load_prediction(pred_file) if pred_file is not None else None
    sample_id = pred_file.stem if pred_file is not None else args.sample_id
    sample = None
    if ctx.dataset is not None:
        if sample_id is None:
            index = args.index if args.index is not None else 0
            if not -len(ctx.sample_ids) <= index < len(ctx.sample_ids):
                raise SystemExit(
                    f"visualize: --index {index} is out of range ({len(ctx.sample_ids)} samples)"
                )
            sample_id = ctx.sample_ids[index]
        sample = ctx.sample(sample_id)
    path = save_prediction_panel(
        args.out,
        sample,
        None,
        pred,
        ctx.class_set,
        ctx.point_cloud_range,
        ctx.title,
        sample_id=sample_id,
        show_ignore=args.show_ignore,
        bgr_input=ctx.bgr_input,
        view_size=tuple(args.size),
        zoom=args.zoom,
        supersample=args.supersample,
    )
    print(f"wrote {path}")
    return 0


def _sequence(args: argparse.Namespace) -> int:
    from spotocc.visualization.animation import save_prediction_animation
    from spotocc.visualization.predictions import list_predictions

    if not args.pred or not Path(args.pred).is_dir():
        raise SystemExit("visualize sequence: --pred must be a directory of prediction files")
    if args.every < 1:
        raise SystemExit("visualize sequence: --every must be at least 1")
    files = list_predictions(args.pred)
    ctx = _Context(args, _grid_shape(files[0]))
    if ctx.dataset is not None:  # dataset order (nuScenes tokens do not sort by time)
        by_id = {f.stem: f for f in files}
        ordered = [by_id[i] for i in ctx.sample_ids if i in by_id]
        missing = len(files) - len(ordered)
        if missing:
            print(f"visualize: {missing} predictions are not in the {args.split} split and are left out")
        files = ordered
    files = files[:: args.every][: args.limit]
    if not files:
        raise SystemExit("visualize sequence: no predictions left to animate")
    path, count = save_prediction_animation(
        args.out,
        files,
        ctx.class_set,
        fps=args.fps,
        samples=ctx.sample if ctx.dataset is not None else None,
        title=ctx.title,
        point_cloud_range=ctx.point_cloud_range,
        show_ignore=args.show_ignore,
        bgr_input=ctx.bgr_input,
        view_size=tuple(args.size),
        zoom=args.zoom,
        supersample=args.supersample,
    )
    print(f"wrote {path} ({count} frames)")
    return 0


def _chart(args: argparse.Namespace) -> int:
    from spotocc.visualization.charts import (
        class_iou_chart,
        comparison_chart,
        default_labels,
        load_eval_json,
        save_figure,
    )

    results = [load_eval_json(p, args.class_set) for p in args.eval_json]
    labels = args.labels or default_labels(args.eval_json)
    if len(labels) != len(results):
        raise SystemExit(f"visualize chart: {len(results)} eval files but {len(labels)} --labels")
    if len(results) == 1:
        fig = class_iou_chart(results[0], title=args.title or labels[0])
    else:
        fig = comparison_chart(results, labels, title=args.title)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


def main(args: argparse.Namespace) -> int:
    modes = {"scene": _scene, "sequence": _sequence, "gif": _sequence, "chart": _chart}
    try:
        return modes[args.mode](args)
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as err:
        print(f"visualize: {err}", file=sys.stderr)
        return 1
