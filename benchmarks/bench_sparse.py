"""Benchmark: SparseLatentDiffuser + SparseFeaturePyramid, sparse backends side by side, on CPU.

Input: an LSS volume of the preset's size ([B, 128, 128, 128, 10] for nuScenes; B = ``--batch``,
default 1) whose active voxels form a random blob-like mask (a smoothed noise field, thresholded)
covering ``--density`` of the grid, as an LSS volume does where frustum points land. Each
configuration runs in a fresh subprocess (so its peak RSS is its own): one warm-up, then
``--repeats`` timed runs (best and median reported).

    python benchmarks/bench_sparse.py                       # nuScenes preset, forward and fwd+bwd
    python benchmarks/bench_sparse.py --preset spotocc_kitti --modes forward
    python benchmarks/bench_sparse.py --preset synthetic_tiny --batch 2 --density 0.66 \
        --configs reference:2 dense:2 --repeats 5    # the dense backend where the grid is small

Wall time is what a user waits; on a shared machine the process CPU time (all threads summed) is the
steadier measure of work. Peak memory = max RSS during the timed runs minus RSS before the first
forward (weights, input and imports excluded). spconv's CPU kernels always run with one thread
(they are wrong with more).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from spotocc.config import get_config
    from spotocc.models.sparse.encoder import SparseLatentDiffuser
    from spotocc.models.sparse.pyramid import SparseFeaturePyramid

    torch.set_num_threads(args.threads)
    cfg = get_config(args.preset, [f"model.sparse_backend={args.backend!r}"])
    torch.manual_seed(0)
    encoder = SparseLatentDiffuser.from_config(cfg.model)
    neck = SparseFeaturePyramid.from_config(cfg.model)
    encoder.train(args.mode != "forward")
    neck.train(args.mode != "forward")
    x, y, z = cfg.grid.lss_size
    channels = cfg.model.voxel_encoder.in_channels
    # blob-like active set: smoothed noise thresholded at the quantile giving the wanted density
    noise = F.avg_pool3d(
        torch.rand(args.batch, 1, x, y, z), kernel_size=(9, 9, 3), stride=1, padding=(4, 4, 1)
    )
    threshold = torch.quantile(noise.flatten()[:: max(1, noise.numel() // 100_000)], 1 - args.density)
    active = noise > threshold  # [1, 1, X, Y, Z]
    volume = torch.rand(args.batch, channels, x, y, z) * active
    density = active.float().mean().item()

    def step() -> None:
        if args.mode == "forward":
            with torch.no_grad():
                neck(encoder(volume))
        else:
            outs = neck(encoder(volume.requires_grad_()))
            sum(o.square().mean() for o in outs).backward()
            encoder.zero_grad(set_to_none=True)
            neck.zero_grad(set_to_none=True)
            volume.grad = None

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        levels = encoder(volume)
    return {
        "backend": args.backend,
        "threads": args.threads,
        "mode": args.mode,
        "density": density,
        "active": [level.num_active for level in levels],
        "best_s": min(times),
        "median_s": statistics.median(times),
        "cpu_s": min(cpu_times),
        "peak_mib": (rss_peak - rss_before) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="spotocc_nusc_256")
    parser.add_argument("--density", type=float, default=0.4, help="fraction of active voxels in the input")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["reference:1", "spconv:1", "reference:2"],
        help="backend:threads pairs to compare",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    print(f"preset {args.preset}, density {args.density}, batch {args.batch}, best/median of {args.repeats}")
    results = []
    for mode in args.modes:
        for config in args.configs:
            backend, threads = config.split(":")
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                f"--preset={args.preset}",
                f"--density={args.density}",
                f"--repeats={args.repeats}",
                f"--batch={args.batch}",
                f"--backend={backend}",
                f"--threads={threads}",
                f"--mode={mode}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            print(
                f"{mode:17s} {backend:9s} threads={threads}  best {result['best_s']:7.2f} s  "
                f"median {result['median_s']:7.2f} s  cpu {result['cpu_s']:7.2f} s  "
                f"peak +{result['peak_mib']:6.0f} MiB  "
                f"(density {result['density']:.2f}, active per level {result['active']})",
                flush=True,
            )
    for mode in args.modes:
        base = [r for r in results if r["mode"] == mode and r["backend"] == "spconv"]
        if base:
            for r in results:
                if r["mode"] == mode and r is not base[0]:
                    print(
                        f"{mode}: {r['backend']} ({r['threads']} threads) / spconv (1 thread) = "
                        f"{r['best_s'] / base[0]['best_s']:.2f}x wall time, "
                        f"{r['cpu_s'] / base[0]['cpu_s']:.2f}x CPU time"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
