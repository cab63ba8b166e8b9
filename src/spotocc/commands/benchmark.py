"""``spotocc benchmark``: time and peak memory of every stage, for one preset or two side by side.

    spotocc benchmark spotocc_nusc_256                                   # CPU, batch 1, both modes
    spotocc benchmark spotocc_kitti --device cuda --batch 2 --json kitti.json
    spotocc benchmark --compare spotocc_nusc_256 sparseocc_nusc_256 --mode infer

What is timed and how: :mod:`spotocc.benchmarking.stages`. With ``--compare`` the two models' runs
alternate in one process; the printout gives the second over the first.
"""

from __future__ import annotations

import argparse
import json

import torch

from spotocc.benchmarking.stages import MODES, benchmark, format_report
from spotocc.config import get_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines())
    parser.add_argument("preset", nargs="?", help="preset or saved config (.json) to time")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (all models)")
    parser.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="time two presets side by side, alternating"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per batch (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: cpu")
    parser.add_argument(
        "--mode", default="both", choices=("infer", "train", "both"), help="what to time (default both)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.compare and args.preset and "=" in args.preset:  # the first override, not a preset
        overrides.insert(0, args.preset)
        args.preset = None
    if bool(args.preset) == bool(args.compare):
        raise SystemExit("spotocc benchmark: give one PRESET, or --compare A B (not both)")
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"spotocc benchmark: --{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"spotocc benchmark: --warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("spotocc benchmark: --device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(args.compare or [args.preset])
    configs = [get_config(name, overrides) for name in names]
    result = benchmark(
        configs,
        batch_size=args.batch,
        device=torch.device(args.device),
        modes=MODES if args.mode == "both" else (args.mode,),
        repeats=args.repeats,
        warmup=args.warmup,
        amp=args.amp,
        seed=args.seed,
        log=print,
    )
    print(format_report(result))
    if args.json:
        from spotocc.engine.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
