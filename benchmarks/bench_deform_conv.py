"""The depth net's deformable convolution on the CPU: torchvision's kernel vs bilinear sampling.

spotocc runs ``deform_conv2d_by_sampling`` (``grid_sample`` + a grouped matmul) on the CPU and
torchvision's kernel elsewhere. The script checks that both agree (forward and the three gradients, in
float64), then times forward + backward of both side by side in one process (median of interleaved
repeats after warm-up), and measures each one's peak memory in a fresh subprocess as the rise of the
peak resident set size (VmHWM after resetting it) over the resident size just before the measured call.

    python benchmarks/bench_deform_conv.py                       # synthetic_tiny's and spotocc_kitti's sizes
    python benchmarks/bench_deform_conv.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spotocc.models.deform_conv import deform_conv2d_by_sampling  # noqa: E402

# (images, channels, feature height, feature width): the DCN input of each preset's depth net, 4 groups
CASES = {"synthetic_tiny": (2, 96, 24, 80), "spotocc_kitti": (1, 640, 24, 80)}
IMPLS = {
    "torchvision": lambda x, offset, weight: torchvision.ops.deform_conv2d(x, offset, weight, padding=1),
    "sampling": lambda x, offset, weight: deform_conv2d_by_sampling(x, offset, weight, padding=1),
}


def make_case(name: str, dtype=torch.float32) -> list[torch.Tensor]:
    images, channels, height, width = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, channels, height, width, generator=gen, dtype=dtype)
    offset = torch.randn(images, 18, height, width, generator=gen, dtype=dtype) * 2.0
    weight = torch.randn(channels, channels // 4, 3, 3, generator=gen, dtype=dtype) * 0.05
    return [t.requires_grad_() for t in (x, offset, weight)]


def forward_backward(impl: str, leaves: list[torch.Tensor]) -> torch.Tensor:
    out = IMPLS[impl](*leaves)
    out.square().mean().backward()
    return out


def check_agreement(name: str) -> float:
    """Largest relative difference of output and gradients between the two, float64."""
    worst = 0.0
    results = {}
    for impl in IMPLS:
        leaves = make_case(name, torch.float64)
        out = forward_backward(impl, leaves)
        results[impl] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(*results.values()):
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def child(args) -> None:
    torch.set_num_threads(args.threads)
    leaves = make_case(args.case)
    forward_backward(args.child, leaves)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    forward_backward(args.child, leaves)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mib(impl: str, args) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", impl, "--case", args.case, "--threads", str(args.threads)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--case", choices=sorted(CASES), default=None, help="one case (default: all)")
    parser.add_argument("--child", choices=sorted(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    for name in [args.case] if args.case else list(CASES):
        args.case = name
        print(f"{name}: DCN input {CASES[name]}, 4 groups, {args.threads} threads")
        print(f"  largest relative difference (float64, output and gradients): {check_agreement(name):.1e}")
        leaves = make_case(name)
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for impl in IMPLS:  # warm-up
            forward_backward(impl, leaves)
        for _ in range(args.repeats):
            for impl in IMPLS:
                start = time.perf_counter()
                forward_backward(impl, leaves)
                times[impl].append(time.perf_counter() - start)
        medians = {impl: statistics.median(ts) * 1000 for impl, ts in times.items()}
        for impl in IMPLS:
            peak = peak_memory_mib(impl, args)
            print(f"  {impl:12s} forward+backward {medians[impl]:8.1f} ms  peak {peak:7.1f} MiB")
        print(f"  torchvision / sampling: {medians['torchvision'] / medians['sampling']:.1f}x")


if __name__ == "__main__":
    main()
