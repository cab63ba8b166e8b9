"""SSCMetrics.update on a nuScenes-size grid (512x512x40) versus the released per-class loop.

    python benchmarks/ssc_metrics.py [--repeats 5] [--threads 1]

Prints seconds per sample for both (after one warm-up call each, side by side in one run) and their
ratio, and checks that both produce the same counts. Memory: the update's temporaries are one int16
index per voxel (2 bytes x 10.5 M = 21 MB) plus the int16 copy of the prediction.
"""

from __future__ import annotations

import argparse
import time

import torch

from spotocc.data.classes import class_set
from spotocc.evaluation import SSCMetrics


def released_style_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int):
    """The released algorithm: mask, then one pass over the grid per class."""
    valid = target != 255
    g, p = target[valid].long(), pred[valid]
    sc = (int(((g > 0) & (p > 0)).sum()), int(((g == 0) & (p > 0)).sum()), int(((g > 0) & (p == 0)).sum()))
    tp, fp, fn = [], [], []
    for c in range(num_classes):
        tp.append(int(((g == c) & (p == c)).sum()))
        fp.append(int(((g != c) & (p == c)).sum()))
        fn.append(int(((g == c) & (p != c)).sum()))
    return sc, tp, fp, fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = class_set("nuscenes")[0]
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 17, (1, 512, 512, 40), generator=g).to(torch.uint8)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 17, target.shape, generator=g)

    metrics = SSCMetrics(names)
    metrics.update(pred, target)  # warm-up
    released_style_counts(pred, target, 17)  # warm-up

    t0 = time.perf_counter()
    for _ in range(args.repeats):
        metrics.update(pred, target)
    ours = (time.perf_counter() - t0) / args.repeats
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        sc, tp, fp, fn = released_style_counts(pred, target, 17)
    theirs = (time.perf_counter() - t0) / args.repeats

    one = SSCMetrics(names)
    one.update(pred, target)
    assert one.completion_counts() == sc
    assert [list(map(int, x)) for x in one.per_class_counts()] == [tp, fp, fn]
    print(f"grid {tuple(target.shape[1:])}, {args.threads} thread(s), {args.repeats} repeats")
    print(f"SSCMetrics.update (one bincount): {ours:.3f} s/sample")
    print(f"released per-class loop:          {theirs:.3f} s/sample")
    print(f"speed-up: {theirs / ours:.1f}x   counts identical: yes")


if __name__ == "__main__":
    main()
