"""Benchmark full-resolution label formation: the bounded method vs the chunked direct formula.

    python benchmarks/bench_labels.py                       # nuScenes sizes, structured synthetic inputs
    python benchmarks/bench_labels.py --preset kitti
    python benchmarks/bench_labels.py --npz head_outputs.npz --out-size 512 512 40
    python benchmarks/bench_labels.py --preset kitti --grid 32 32 8 --out-size 64 64 16 --num-queries 20

Inputs: an ``.npz`` with ``mask_logits`` [B, Q, X, Y, Z] and ``class_probs`` [B, Q, C] (or
``cls_logits`` [B, Q, C+1]), optionally ``out_size``; without one, Mask2Former-like outputs of a
random street scene (``structured_head_outputs``). Prints time (median after a warm-up, methods
called in turn), peak memory (RSS growth of a fresh process on CPU, allocator peak on CUDA), the
speed-up, label agreement and the bounded method's work fractions.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from spotocc.benchmarking.labels import benchmark_labels, load_head_outputs, structured_head_outputs

PRESETS = {  # low-res mask grid, output grid
    "nuscenes": ((128, 128, 10), (512, 512, 40)),
    "kitti": ((128, 128, 16), (256, 256, 32)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="nuscenes")
    parser.add_argument("--npz", help="real head outputs (see module docstring)")
    parser.add_argument("--grid", type=int, nargs=3, help="low-res mask grid of the synthetic inputs")
    parser.add_argument("--out-size", type=int, nargs=3, help="output grid (default: the preset's)")
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--methods", nargs="+", default=["bounded", "direct"])
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    grid, out_size = PRESETS[args.preset]
    grid = tuple(args.grid or grid)
    if args.npz:
        class_probs, mask_logits, npz_out = load_head_outputs(args.npz)
        out_size = tuple(args.out_size or npz_out or out_size)
        source = args.npz
    else:
        class_probs, mask_logits = structured_head_outputs(
            preset=args.preset, grid=grid, num_queries=args.num_queries, seed=args.seed
        )
        out_size = tuple(args.out_size or out_size)
        source = f"structured synthetic ({args.preset}, seed {args.seed})"
    device = torch.device(args.device)
    result = benchmark_labels(
        class_probs.to(device),
        mask_logits.to(device),
        out_size,
        methods=tuple(args.methods),
        repeats=args.repeats,
        measure_memory=not args.no_memory,
    )
    result["inputs"] = source
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"inputs: {source}")
    print(
        f"B={result['batch']} Q={result['num_queries']} C={result['num_classes']} "
        f"{result['grid']} -> {result['out_size']} on {result['device']} ({result['threads']} threads)"
    )
    for method in args.methods:
        peak = result.get(f"{method}_peak_mib")
        peak_text = f"{peak:9.1f} MiB peak" if peak is not None else ""
        print(f"  {method:8s} {result[f'{method}_s']:8.3f} s  {peak_text}")
    if "speedup" in result:
        print(f"  speed-up {result['speedup']:.1f}x, mismatched voxels {result['mismatched_voxels']}")
    if "voxels_refined_frac" in result:
        print(
            f"  bounded: cells undecided by corner bounds {100 * result['cells_undecided_frac']:.2f}%, "
            f"certified by refined bounds {100 * result['cells_refined_certified_frac']:.2f}%; voxels "
            f"evaluated with a few queries {100 * result['voxels_refined_frac']:.2f}%, "
            f"with all queries {100 * result['voxels_exact_frac']:.3f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
