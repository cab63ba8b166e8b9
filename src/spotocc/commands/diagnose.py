"""``spotocc diagnose DIAGNOSIS``: what a configuration, a dataset or a trained checkpoint does.

    spotocc diagnose coverage spotocc_kitti --data /data/SemanticKITTI --samples 20
    spotocc diagnose coverage runs/kitti/config.json --data /data/SemanticKITTI --split train --json cov.json
    spotocc diagnose coverage synthetic_tiny --data data/synthetic_tiny grid.lss_downsample=4
    spotocc diagnose memorise synthetic_tiny --data data/synthetic_tiny --variant gt-features --steps 100
    spotocc diagnose memorise synthetic_tiny --data data/synthetic_tiny --variant gt-depth --json mem.json
    spotocc diagnose depth runs/tiny/checkpoints/last --split train --samples 8

``coverage``: per class present, the share of GT voxels that some camera sees, whose LSS cell receives a
frustum point, and whose LSS cell the sparse encoder's finest level keeps active; per LSS height level,
the share of cells that receive a frustum point and that are active. See
:mod:`spotocc.diagnostics.coverage` for the exact rules.

``memorise``: an oracle ablation that trains on the first few scenes of the training split (no
augmentation) and scores per-class IoU on those same scenes: the whole pipeline, the pipeline with LiDAR
ground-truth depth in the lift, the head alone on features made from the GT, or the image -> voxel
stages with a per-voxel classifier instead of the head. See :mod:`spotocc.diagnostics.memorise`.

``depth``: per class, how well a trained checkpoint's depth net finds the depth of the surface each
feature cell sees (LiDAR where the cell has a point, else the first labelled voxel on its ray): the
share of cells whose most likely bin is within a bin of it, the probability there, the error and its
signed mean (bias) in metres; then the same by band of reference depth. A class the lift smears along
its rays, or places too near, is not learned downstream. See :mod:`spotocc.diagnostics.depth`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "spotocc diagnose"
# spotocc.diagnostics.memorise.VARIANTS, spelled out so that building the parser imports no torch
MEMORISE_VARIANTS = ("pipeline", "gt-depth", "gt-features", "voxel-ce")


class _IntermixedParser(argparse.ArgumentParser):
    """A diagnosis parser that takes ``key=value`` overrides after options, as the other commands do.

    ``spotocc``'s dispatcher cannot intermix a command with sub-commands, so each diagnosis does it.
    """

    _plain = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._plain:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._plain = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Checks of a configuration, a dataset or a trained checkpoint."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines())
    diagnoses = parser.add_subparsers(
        dest="diagnosis", metavar="DIAGNOSIS", required=True, parser_class=_IntermixedParser
    )

    coverage = diagnoses.add_parser(
        "coverage",
        help="per class and height: GT voxels in view, reached by the LSS lift, kept by the encoder",
    )
    coverage.add_argument("config", metavar="PRESET_OR_CONFIG", help="preset name or a saved config .json")
    coverage.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. grid.lss_downsample=4"
    )
    coverage.add_argument("--data", metavar="ROOT", required=True, help="dataset root (data.root)")
    coverage.add_argument("--split", help="split to read (default: the config's data.val_split)")
    coverage.add_argument(
        "--samples", type=int, default=10, metavar="N", help="use the first N samples (default 10)"
    )
    coverage.add_argument("--json", metavar="OUT", help="also write the counts and shares to this file")
    coverage.set_defaults(run=_coverage)

    memorise = diagnoses.add_parser(
        "memorise",
        help="oracle ablations: train on a few training scenes, per-class IoU on those same scenes",
    )
    memorise.add_argument("config", metavar="PRESET_OR_CONFIG", help="preset name or a saved config .json")
    memorise.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. head.type=sparseocc"
    )
    memorise.add_argument("--data", metavar="ROOT", required=True, help="dataset root (data.root)")
    memorise.add_argument(
        "--variant",
        required=True,
        metavar="{" + ",".join(MEMORISE_VARIANTS) + "}",
        help="pipeline: the whole model; gt-depth: LiDAR depth bins in the lift; gt-features: the head "
        "alone on features made from the GT; voxel-ce: a per-voxel classifier instead of the head",
    )
    memorise.add_argument(
        "--samples", type=int, default=8, metavar="N", help="the first N training scenes (default 8)"
    )
    memorise.add_argument("--steps", type=int, default=240, metavar="N", help="optimiser steps (default 240)")
    memorise.add_argument("--batch", type=int, default=2, metavar="B", help="scenes per step (default 2)")
    memorise.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: train.lr)")
    memorise.add_argument("--seed", type=int, default=0, help="model init and batch draws (default 0)")
    memorise.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    memorise.add_argument("--json", metavar="OUT", help="also write the metrics to this file")
    memorise.set_defaults(run=_memorise)

    depth = diagnoses.add_parser(
        "depth", help="per class: how well a trained checkpoint's depth net finds the depth of what it sees"
    )
    depth.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir, .safetensors or work dir")
    depth.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data paths, ...)")
    depth.add_argument("--data", metavar="ROOT", help="dataset root (default: the checkpoint config's)")
    depth.add_argument("--split", help="split to read (default: the config's data.val_split)")
    depth.add_argument(
        "--samples", type=int, default=10, metavar="N", help="the first N samples (default 10)"
    )
    depth.add_argument(
        "--tolerance", type=int, default=1, metavar="BINS", help="bins either side that count (default 1)"
    )
    depth.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    depth.add_argument("--json", metavar="OUT", help="also write the per-class numbers to this file")
    depth.set_defaults(run=_depth)


def main(args: argparse.Namespace) -> int:
    return int(args.run(args) or 0)


def _error(message: str) -> int:
    """A user error: one line on stderr, exit status 2 (as argparse reports bad arguments)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _coverage(args: argparse.Namespace) -> int:
    from spotocc.commands.eval import apply_data_arguments
    from spotocc.config import get_config
    from spotocc.data.files import DataFileError
    from spotocc.diagnostics.coverage import format_coverage, measure_coverage
    from spotocc.engine.atomic import write_text_atomic
    from spotocc.engine.evaluator import default_dataset_factory

    if args.samples < 1:
        return _error(f"--samples must be >= 1, got {args.samples}")
    try:
        cfg = get_config(args.config, args.overrides)
        apply_data_arguments(cfg, args)  # --data -> data.root
    except (ValueError, FileNotFoundError) as err:
        return _error(str(err))
    if not Path(cfg.data.root).exists():
        return _error(f"data root {cfg.data.root} does not exist")
    split = args.split or cfg.data.val_split
    try:
        dataset = default_dataset_factory(cfg, split, train=False)  # test-time transform: no augmentation
        if len(dataset) == 0:
            return _error(f"split {split!r} of {cfg.data.root} has no samples")
        counts = measure_coverage(cfg, dataset, args.samples)
    except (DataFileError, ValueError, OSError) as err:
        return _error(str(err))

    vt, grid = cfg.model.view_transformer, cfg.grid
    (h, w), (dmin, dmax) = cfg.data.input_size, vt.depth_bound[:2]
    occ, lss = ("x".join(map(str, s)) for s in (grid.occ_size, grid.lss_size))
    samples = f"{counts.num_samples} sample{'s' * (counts.num_samples != 1)}"
    print(
        f"{cfg.name}: split {split!r}, {samples}, GT grid {occ}, "
        f"LSS grid {lss} (downsample {grid.lss_downsample}), "
        f"{len(cfg.data.cameras)} camera(s) at {h}x{w}, depth {dmin:g}..{dmax:g} m"
    )
    print(format_coverage(counts, grid))
    print(
        f"in view: voxel centre in front of a camera, depth in [{dmin:g}, {dmax:g}) m, inside the {h}x{w} "
        "input image; lifted: its LSS cell receives a frustum point; encoder: its LSS cell is active in "
        "the sparse encoder's finest output"
    )
    if args.json:
        out = {
            "config": cfg.name,
            "split": split,
            "data_root": str(cfg.data.root),
            "occ_size": list(grid.occ_size),
            "lss_downsample": grid.lss_downsample,
            **counts.to_dict(),
        }
        try:
            write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
        except OSError as err:
            return _error(f"cannot write {args.json}: {err}")
    return 0


def _memorise(args: argparse.Namespace) -> int:
    import torch

    from spotocc.commands.eval import apply_data_arguments
    from spotocc.config import get_config
    from spotocc.data.files import DataFileError
    from spotocc.diagnostics.memorise import format_memorise, memorise, without_augmentation
    from spotocc.engine.atomic import write_text_atomic
    from spotocc.engine.evaluator import default_dataset_factory

    if args.variant not in MEMORISE_VARIANTS:
        return _error(f"--variant must be one of {', '.join(MEMORISE_VARIANTS)}, got {args.variant!r}")
    for name in ("samples", "steps", "batch"):
        if getattr(args, name) < 1:
            return _error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        return _error(f"--lr must be > 0, got {args.lr}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # before training, not after
        return _error(f"cannot write {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        cfg = get_config(args.config, args.overrides)
        apply_data_arguments(cfg, args)  # --data -> data.root
    except (ValueError, FileNotFoundError) as err:
        return _error(str(err))
    if not Path(cfg.data.root).exists():
        return _error(f"data root {cfg.data.root} does not exist")
    split = cfg.data.train_split
    try:
        # train=True for the LiDAR depth targets; the training transform without augmentation
        dataset = default_dataset_factory(without_augmentation(cfg), split, train=True)
        if len(dataset) == 0:
            return _error(f"split {split!r} of {cfg.data.root} has no samples")
        scenes = [dataset[i] for i in range(min(args.samples, len(dataset)))]
    except (DataFileError, ValueError, OSError) as err:
        return _error(str(err))

    n, lr = len(scenes), args.lr or cfg.train.lr
    print(
        f"{cfg.name}: memorise {n} scene{'s' * (n != 1)} of split {split!r}, variant {args.variant}, "
        f"{args.steps} steps of batch {args.batch}, lr {lr:g}, seed {args.seed}, {device}",
        flush=True,
    )
    try:
        result = memorise(
            cfg,
            scenes,
            args.variant,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            log=lambda line: print(line, flush=True),
            device=device,
        )
    except ValueError as err:
        return _error(str(err))
    except FloatingPointError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    print(format_memorise(result))
    print(f"trained {result.steps} steps in {result.train_seconds:.0f} s; {result.seconds:.0f} s in all")
    if args.json:
        out = {"config": cfg.name, "split": split, "data_root": str(cfg.data.root), **result.to_dict()}
        try:
            write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
        except OSError as err:
            return _error(f"cannot write {args.json}: {err}")
    return 0


def _depth(args: argparse.Namespace) -> int:
    import torch

    from spotocc.commands.eval import apply_data_arguments
    from spotocc.data.files import DataFileError
    from spotocc.diagnostics.depth import format_depth_accuracy, measure_depth_accuracy
    from spotocc.diagnostics.memorise import without_augmentation
    from spotocc.engine.atomic import write_text_atomic
    from spotocc.engine.checkpoint import CheckpointError
    from spotocc.engine.evaluator import default_dataset_factory, load_model_from_checkpoint

    if args.samples < 1:
        return _error(f"--samples must be >= 1, got {args.samples}")
    if args.tolerance < 0:
        return _error(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")
    if not Path(args.checkpoint).exists():
        return _error(f"checkpoint {args.checkpoint} does not exist")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        model, cfg = load_model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=device)
        apply_data_arguments(cfg, args)  # --data -> data.root
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        return _error(str(err))
    if not Path(cfg.data.root).exists():
        return _error(f"data root {cfg.data.root} does not exist")
    split = args.split or cfg.data.val_split
    try:
        # train=True for the LiDAR depth; the training transform without augmentation
        dataset = default_dataset_factory(without_augmentation(cfg), split, train=True)
        if len(dataset) == 0:
            return _error(f"split {split!r} of {cfg.data.root} has no samples")
        acc = measure_depth_accuracy(
            model, cfg, dataset, args.samples, tolerance=args.tolerance, device=device
        )
    except (DataFileError, ValueError, OSError) as err:
        return _error(str(err))

    vt = cfg.model.view_transformer
    samples = f"{acc.num_samples} sample{'s' * (acc.num_samples != 1)}"
    print(
        f"{cfg.name}: split {split!r}, {samples}, depth bins {vt.depth_bound[0]:g}..{vt.depth_bound[1]:g} m "
        f"by {vt.depth_bound[2]:g} m, feature stride {vt.downsample}, from {args.checkpoint}"
    )
    print(format_depth_accuracy(acc))
    print(
        "cells: feature cells (rays) whose first labelled voxel is of the class and whose reference depth "
        "is in range; reference: the cell's nearest LiDAR depth, else the depth of that first voxel"
    )
    if args.json:
        out = {"checkpoint": str(args.checkpoint), "config": cfg.name, "split": split, **acc.to_dict()}
        try:
            write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
        except OSError as err:
            return _error(f"cannot write {args.json}: {err}")
    return 0
