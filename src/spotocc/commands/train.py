"""``spotocc train PRESET_OR_CONFIG [key=value ...]``: train a preset or a saved config.

Examples::

    spotocc train synthetic_tiny --work-dir runs/tiny
    spotocc train spotocc_kitti data.root=/data/SemanticKITTI --amp bf16
    torchrun --standalone --nproc_per_node=8 -m spotocc.cli train spotocc_nusc_256 --work-dir runs/nusc
    spotocc train spotocc_nusc_256 --work-dir runs/nusc --resume          # newest usable checkpoint
    spotocc train spotocc_nusc_256 --work-dir runs/nusc --resume runs/nusc/checkpoints/best
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spotocc.config import get_config
from spotocc.engine.evaluator import DatasetFactory, ModelFactory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="PRESET_OR_CONFIG", help="preset name or a saved config .json")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2"
    )
    parser.add_argument("--work-dir", help="run directory (default: work_dirs/<config name>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="resume from CKPT, or (no value) from the newest usable checkpoint in the work dir",
    )
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision (train.amp)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--max-iters", type=int, help="stop after this many iterations (train.max_iters)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation during training")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bars")


def main(
    args: argparse.Namespace,
    *,
    model_factory: ModelFactory | None = None,
    dataset_factory: DatasetFactory | None = None,
) -> int:
    from spotocc.engine.scoring import uses_occ3d
    from spotocc.engine.trainer import train

    overrides = list(args.overrides)
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # "--resume key=value": argparse took an override for CKPT
        args.resume = "auto"
    cfg = get_config(args.config, overrides)
    if args.amp is not None:
        cfg.train.amp = args.amp
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.max_iters is not None:
        cfg.train.max_iters = args.max_iters
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.no_eval:
        cfg.train.eval_interval = 0
    work_dir = Path(args.work_dir or Path("work_dirs") / cfg.name)
    resume = True if args.resume == "auto" else args.resume
    result = train(
        cfg,
        work_dir=work_dir,
        resume=resume,
        device=args.device,
        model_factory=model_factory,
        dataset_factory=dataset_factory,
        show_progress=args.progress,
    )
    best = "n/a" if result.best_miou is None else f"{result.best_miou:.2f}"
    metric = "camera-mask mIoU" if uses_occ3d(cfg) else "SSC mIoU"
    print(f"done: {result.global_step} iterations, {result.epochs_completed} epochs, best {metric} {best}")
    return 0
