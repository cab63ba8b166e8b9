"""``spotocc predict CHECKPOINT --input DATA --out DIR``: one ``<sample_id>.npz`` of labels per sample.

``--input`` is a dataset root (read with the checkpoint's dataset format; ``--split`` picks the
split, default the config's validation split) or the name of a split of the checkpoint's own
dataset paths (``val``, ``test``, ...). Each file holds ``labels``: uint8 ``[X, Y, Z]`` (class ids,
0 = empty), written atomically. ``spotocc eval CHECKPOINT --predictions DIR`` scores them.

Examples::

    spotocc predict runs/kitti/checkpoints/best --input /data/SemanticKITTI --split val --out preds/
    spotocc predict runs/kitti/checkpoints/best --input test --out preds_test/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spotocc.commands.convert_checkpoint import add_pickle_arguments
from spotocc.engine.evaluator import DatasetFactory, ModelFactory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint dir, .safetensors, work dir, or released .pth (with --config)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (data paths, ...)"
    )
    parser.add_argument(
        "--input", required=True, metavar="DATA_ROOT_OR_SPLIT", help="dataset root or split name"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for <sample_id>.npz files")
    parser.add_argument("--split", help="split under a dataset root (default: the config's data.val_split)")
    parser.add_argument("--config", help="preset / config for a weights file without an embedded config")
    add_pickle_arguments(parser)  # for a released .pth given with --config
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--batch-size", type=int, help="samples per process (eval.batch_size)")
    parser.add_argument("--num-workers", type=int, help="data-loader workers (data.num_workers)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar")


def main(
    args: argparse.Namespace,
    *,
    model_factory: ModelFactory | None = None,
    dataset_factory: DatasetFactory | None = None,
) -> int:
    from spotocc.commands.eval import apply_data_arguments
    from spotocc.engine import distributed as dist_utils
    from spotocc.engine.evaluator import default_dataset_factory, evaluate, load_model_from_checkpoint

    owns_group = not dist_utils.is_distributed()
    info = dist_utils.init_distributed(args.device)
    try:
        model, cfg = load_model_from_checkpoint(
            args.checkpoint,
            overrides=args.overrides,
            config=args.config,
            device=info.device,
            model_factory=model_factory,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        )
        if Path(args.input).is_dir():
            args.data = args.input
            split = args.split or cfg.data.val_split
        else:
            if args.split is not None:
                raise ValueError(
                    f"--split {args.split!r} given, but --input {args.input!r} is not a directory"
                )
            args.data = None
            split = args.input
        apply_data_arguments(cfg, args)
        dataset = (dataset_factory or default_dataset_factory)(cfg, split, train=False)
        result = evaluate(
            model,
            dataset,
            cfg,
            device=info.device,
            amp=args.amp,
            predictions_dir=args.out,
            show_progress=args.progress,
            ray_iou=False,  # nothing is reported here: skip the slow Occ3D ray metric
        )
        if info.is_main:
            print(f"wrote {result.num_predicted} predictions to {args.out}")
        return 0
    finally:
        if owns_group:
            dist_utils.teardown_distributed()
