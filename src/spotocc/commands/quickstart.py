"""``spotocc quickstart``: synthesise scenes, train ``synthetic_tiny``, evaluate, compare with a baseline.

The steps and what they write are in :mod:`spotocc.engine.quickstart`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spotocc.config import Config, get_config
from spotocc.engine.quickstart import run_quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of the synthetic_tiny preset"
    )
    parser.add_argument(
        "--work-dir", default="work_dirs/quickstart", help="scenes, checkpoints and logs go here"
    )
    parser.add_argument("--num-train", type=int, default=64, help="synthetic training scenes")
    parser.add_argument("--num-val", type=int, default=16, help="synthetic held-out scenes")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bars")
    parser.add_argument(
        "--picture", action=argparse.BooleanOptionalAction, default=True, help="write quickstart.png"
    )


# The quickstart scores the last checkpoint on the held-out scenes itself, so validating after every
# epoch would only spend its 10-minute budget (3-4 s per epoch on 2 CPU cores) on numbers it does
# not use. ``train.eval_interval=1`` on the command line brings it back.
QUICKSTART_OVERRIDES = ("train.eval_interval=0",)


def quickstart_config(overrides: list[str], epochs: int | None, seed: int) -> Config:
    """``synthetic_tiny`` with the quickstart's defaults, then the user's overrides, epochs and seed."""
    cfg = get_config("synthetic_tiny", [*QUICKSTART_OVERRIDES, *overrides])
    if epochs is not None:
        cfg.train.epochs = epochs
    cfg.train.seed = seed
    return cfg


def main(args: argparse.Namespace) -> int:
    cfg = quickstart_config(list(args.overrides), args.epochs, args.seed)
    run_quickstart(
        cfg,
        work_dir=Path(args.work_dir),
        num_train=args.num_train,
        num_val=args.num_val,
        device=args.device,
        show_progress=args.progress,
        picture=args.picture,
    )
    return 0
