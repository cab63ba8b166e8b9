"""Time one full MaskSetCriterion call (10 stages + DN) at nuScenes sizes, with its peak memory.

Sizes: GT 512x512x40 (15 classes present, ~3% ignored voxels), mask logits 128x128x10, 100 queries,
P = 50,176 points, DN at stage 0 with one slot per GT. Also compares, side by side, one stage's
mask-loss candidate draw (3P distinct voxels per GT row) done the released way (torch.multinomial
without replacement over every GT voxel's weight) and with spotocc's grouped sampler.

    python benchmarks/bench_criterion.py [--batch-size 1] [--repeats 2] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import threading
import time

import torch

from spotocc.data.classes import NUSCENES_OCC_FREQUENCIES, point_sampling_weights
from spotocc.models.heads.losses import MaskSetCriterion
from spotocc.models.heads.matching import VoxelGroups, sample_without_replacement

GT_SHAPE = (512, 512, 40)
LOW_SHAPE = (128, 128, 10)
NUM_CLASSES = 17
NUM_QUERIES = 100
NUM_STAGES = 10
ABSENT_CLASSES = (2, 6)  # bicycle, motorcycle: 15 GT classes per sample


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class RssPeak:
    """Highest resident set size (MiB) seen by a background thread while the block runs."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.value = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, _rss_mib())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.value = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.value = max(self.value, _rss_mib())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_gt(batch: int, device: torch.device, seed: int) -> torch.Tensor:
    """Labels drawn i.i.d. from the class frequencies (timing does not depend on spatial layout)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor(NUSCENES_OCC_FREQUENCIES, dtype=torch.float64)
    probs[list(ABSENT_CLASSES)] = 0
    grids = []
    for _ in range(batch):
        labels = torch.multinomial(probs, GT_SHAPE[0] * GT_SHAPE[1] * GT_SHAPE[2], True, generator=gen)
        labels = labels.to(torch.uint8)
        labels[torch.rand(labels.shape, generator=gen) < 0.03] = 255
        grids.append(labels.view(GT_SHAPE))
    return torch.stack(grids).to(device)


def make_logits(batch: int, num_gts: list[int], device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).requires_grad_(True)

    cls = [randn(batch, NUM_QUERIES, NUM_CLASSES + 1) for _ in range(NUM_STAGES)]
    mask = [randn(batch, NUM_QUERIES, *LOW_SHAPE) for _ in range(NUM_STAGES)]
    pad = max(num_gts)
    dn = [(0, randn(batch, pad, NUM_CLASSES + 1), randn(batch, pad, *LOW_SHAPE))]
    meta = {"pad_size": pad, "scalar": 1, "max_num_gts": pad, "num_gts_list": num_gts}
    return cls, mask, dn, meta


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def released_draw_seconds(voxel_weights: torch.Tensor, rows: int, num_samples: int, device) -> float:
    """Seconds per row of the released draw: torch.multinomial without replacement over all voxels."""
    weights = voxel_weights[None].expand(rows, -1).contiguous()  # [rows, N] float64
    torch.multinomial(weights, num_samples, replacement=False)  # warm-up
    return min(timed(lambda: torch.multinomial(weights, num_samples, False), device, 2)) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--released-rows", type=int, default=2, help="rows for the torch.multinomial draw")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # on a shared machine, 1 thread gives the steadiest timings
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}"
    )

    gt = make_gt(args.batch_size, device, seed=0)
    criterion = MaskSetCriterion(num_classes=NUM_CLASSES, class_frequencies=NUSCENES_OCC_FREQUENCIES).to(
        device
    )
    groups = [VoxelGroups.from_occupancy(g, NUM_CLASSES) for g in gt]
    num_gts = [len(g.present_classes()) for g in groups]
    cls, mask, dn, meta = make_logits(args.batch_size, num_gts, device, seed=1)
    print(f"GT classes per sample: {num_gts}; inputs ready, RSS {_rss_mib():.0f} MiB")

    # --- side by side: one stage's candidate draw for G rows, released way vs grouped sampler
    num_candidates = int(criterion.num_points * criterion.oversample_ratio)
    sampling = torch.tensor(point_sampling_weights(NUSCENES_OCC_FREQUENCIES), dtype=torch.float64)
    voxel_weights = torch.cat([sampling, sampling.new_zeros(1)]).to(device)[gt[0].long().clamp(max=17)]
    voxel_weights = voxel_weights.reshape(-1)  # [N] float64, what the release builds per GT row
    t_released = released_draw_seconds(voxel_weights, args.released_rows, num_candidates, device)
    row_weights = groups[0].class_weight_rows(criterion.sampling_weight, num_gts[0])
    sample_without_replacement(groups[0], row_weights, num_candidates)  # warm-up
    t_ours = min(timed(lambda: sample_without_replacement(groups[0], row_weights, num_candidates), device, 2))
    t_ours /= num_gts[0]
    print(
        f"candidate draw ({num_candidates} distinct of {voxel_weights.numel()} voxels) per row: "
        f"torch.multinomial {t_released * 1e3:.1f} ms, grouped sampler {t_ours * 1e3:.1f} ms "
        f"(ratio {t_released / t_ours:.1f}x); per stage with {num_gts[0]} rows: "
        f"{t_released * num_gts[0]:.2f} s vs {t_ours * num_gts[0]:.2f} s"
    )

    # --- pieces of one step
    t_groups = timed(lambda: [VoxelGroups.from_occupancy(g, NUM_CLASSES) for g in gt], device, args.repeats)
    print(f"VoxelGroups for the batch (once per step): {statistics.median(t_groups):.3f} s")

    def match_stage():
        with torch.no_grad():
            for b, g in enumerate(groups):
                criterion.match(cls[-1][b], mask[-1][b], g, g.present_classes())

    match_stage()
    print(
        f"matching of one stage (P={criterion.num_points}): "
        f"{statistics.median(timed(match_stage, device, 2)):.3f} s"
    )

    # --- full call: forward (10 stages + DN) and backward
    leaves = [*cls, *mask, dn[0][1], dn[0][2]]

    def step():
        _sync(device)
        start = time.perf_counter()
        losses = criterion(cls, mask, gt, dn, meta)
        _sync(device)
        middle = time.perf_counter()
        sum(losses.values()).backward()
        _sync(device)
        return middle - start, time.perf_counter() - middle, len(losses)

    step()  # warm-up; later steps accumulate into the same .grad tensors (no new allocation)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_mib()
    with RssPeak() as peak:
        results = [step() for _ in range(args.repeats)]
    forward = statistics.median(r[0] for r in results)
    backward = statistics.median(r[1] for r in results)
    print(
        f"full criterion ({NUM_STAGES} stages + DN, {results[0][2]} losses): forward {forward:.2f} s, "
        f"backward {backward:.2f} s (median of {args.repeats})"
    )
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves) / 2**20
    print(
        f"memory: resident before the call (inputs, grads {grads:.0f} MiB) {rss_before:.0f} MiB; "
        f"peak during forward+backward +{peak.value - rss_before:.0f} MiB (RSS sampled every 2 ms)"
    )
    if device.type == "cuda":
        print(f"CUDA peak allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
