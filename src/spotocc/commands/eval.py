"""``spotocc eval CHECKPOINT``: SSC or Occ3D metrics of a checkpoint, or of saved predictions.

Examples::

    spotocc eval runs/kitti/checkpoints/best --data /data/SemanticKITTI --json kitti_val.json
    torchrun --standalone --nproc_per_node=4 -m spotocc.cli eval runs/nusc --json nusc_val.json
    spotocc eval runs/kitti/checkpoints/best --predictions preds/   # score saved .npz files only
    spotocc eval spotocc_kitti --predictions preds/ --data /data/SemanticKITTI  # a preset instead

The per-class table is printed; ``--json`` writes the metrics with the released key names
(``semkitti_SSC_mIoU``, ``nuScenes_SC_IoU``, ...). An Occ3D-nuScenes config is scored with the
Occ3D metrics instead, under the keys the field prints: ``mIoU``, ``IoU`` and ``<class>_IoU``
(camera mask), ``unmasked_*``, ``RayIoU`` and ``RayIoU@1`` / ``@2`` / ``@4``. NaN (a class in
neither GT nor prediction) is written as null, so the file is strict JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from spotocc.commands.convert_checkpoint import add_pickle_arguments
from spotocc.config import Config, apply_overrides, get_config
from spotocc.engine.atomic import write_text_atomic
from spotocc.engine.evaluator import DatasetFactory, ModelFactory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint dir, .safetensors, work dir or released .pth (with --config); with --predictions "
        "also a preset or config .json",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (data paths, ...)"
    )
    parser.add_argument("--data", metavar="ROOT", help="dataset root (data.root)")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.val_split)")
    parser.add_argument("--json", metavar="OUT", help="write the metrics (released key names) to this file")
    parser.add_argument(
        "--predictions", metavar="DIR", help="score <sample_id>.npz files instead of the model"
    )
    parser.add_argument("--save-predictions", metavar="DIR", help="also write the model's predictions here")
    parser.add_argument("--config", help="preset / config for a weights file without an embedded config")
    add_pickle_arguments(parser)  # for a released .pth given with --config
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--batch-size", type=int, help="samples per process (eval.batch_size)")
    parser.add_argument("--num-workers", type=int, help="data-loader workers (data.num_workers)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar")
    parser.add_argument(
        "--ray-iou",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Occ3D configs: also compute RayIoU (the slow part; default on)",
    )


def main(
    args: argparse.Namespace,
    *,
    model_factory: ModelFactory | None = None,
    dataset_factory: DatasetFactory | None = None,
) -> int:
    from spotocc.data.classes import class_set
    from spotocc.engine import distributed as dist_utils
    from spotocc.engine.evaluator import (
        default_dataset_factory,
        evaluate,
        evaluate_predictions,
        load_model_from_checkpoint,
    )
    from spotocc.engine.scoring import uses_occ3d
    from spotocc.evaluation import format_ssc_table, metric_prefix, with_prefix
    from spotocc.evaluation.occ3d_eval import format_occ3d_table

    owns_group = not dist_utils.is_distributed()
    info = dist_utils.init_distributed(args.device)
    try:
        dataset_factory = dataset_factory or default_dataset_factory
        if args.predictions is not None and not Path(args.checkpoint).exists():
            cfg = get_config(args.config or args.checkpoint, args.overrides)
            model = None
        else:
            model, cfg = load_model_from_checkpoint(
                args.checkpoint,
                overrides=args.overrides,
                config=args.config,
                device=info.device,
                model_factory=model_factory,
                allow_unsafe_pickle=args.allow_unsafe_pickle,
            )
        apply_data_arguments(cfg, args)
        split = args.split or cfg.data.val_split
        dataset = dataset_factory(cfg, split, train=False)
        if args.predictions is not None:
            result = evaluate_predictions(
                args.predictions, dataset, cfg, show_progress=args.progress, ray_iou=args.ray_iou
            )
        else:
            assert model is not None
            result = evaluate(
                model,
                dataset,
                cfg,
                device=info.device,
                amp=args.amp,
                predictions_dir=args.save_predictions,
                show_progress=args.progress,
                ray_iou=args.ray_iou,
            )
        if info.is_main:
            source = args.predictions if args.predictions is not None else args.checkpoint
            print(f"{cfg.name}: split {split!r}, {result.num_samples} samples scored, from {source}")
            if uses_occ3d(cfg):
                print(format_occ3d_table(result.metrics))
                metrics, extra = result.metrics, {"benchmark": "occ3d-nuscenes", "class_set": "occ3d"}
            else:
                print(format_ssc_table({"IoU (%)": result.metrics}, class_set(cfg.data.class_set)[0]))
                quirk = "released (ignored voxels count as hits)" if cfg.eval.class0_quirk else "plain"
                print(
                    f"class-0 IoU: {quirk} (eval.class0_quirk={cfg.eval.class0_quirk}); "
                    "mIoU leaves class 0 out"
                )
                metrics = with_prefix(result.metrics, metric_prefix(cfg.data.class_set))
                extra = {"class0_quirk": cfg.eval.class0_quirk}
            if args.json:
                out = {
                    "metrics": {key: _finite_or_none(value) for key, value in metrics.items()},
                    "num_samples": result.num_samples,
                    "split": split,
                    "source": str(source),
                    "config": cfg.name,
                    **extra,
                }
                write_text_atomic(args.json, json.dumps(out, indent=2, allow_nan=False) + "\n")
        return 0
    finally:
        if owns_group:
            dist_utils.teardown_distributed()


def _finite_or_none(value: float) -> float | None:
    """NaN / infinity -> None (JSON null): strict JSON has no NaN."""
    return value if math.isfinite(value) else None


def apply_data_arguments(cfg: Config, args: argparse.Namespace) -> None:
    """``--data``, ``--batch-size`` and ``--num-workers`` into the config."""
    overrides = []
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    if getattr(args, "batch_size", None) is not None:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if getattr(args, "num_workers", None) is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    apply_overrides(cfg, overrides)
