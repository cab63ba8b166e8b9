"""One whole training step (forward, backward, AdamW) of a preset under config variants, side by side.

Each variant is a ';'-separated list of overrides ('' = the preset as it is); the variants run
interleaved, one step each per round, so a shared machine's load falls on all of them alike. Each round
takes the next batch of generated scenes (``spotocc synth``, written to a temporary folder unless
``--data`` points at a dataset of the preset's format), with the depth teacher weight at 0.5 (mid-run).
Prints the median step time, its ratio to the first variant, and the growth of the resident set over
one extra, untimed step of each variant (:func:`spotocc.benchmarking.memory.measure_peak`, CPU).

    python benchmarks/bench_train_step.py --preset synthetic_tiny --threads 2 \\
        '' 'train.amp=bf16' 'head.num_points=2048' 'train.amp=bf16;head.num_points=2048'
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spotocc.benchmarking.memory import MemoryPeak, measure_peak
from spotocc.config import get_config
from spotocc.data import build_dataset, collate
from spotocc.data.synthetic.generate import data_overrides, generate, source_image_size
from spotocc.engine.evaluator import autocast_context
from spotocc.engine.optim import build_optimizer
from spotocc.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=[""], help="';'-separated overrides per variant")
    parser.add_argument("--preset", default="synthetic_tiny")
    parser.add_argument("--data", help="dataset root of the preset's format (default: generate scenes)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        preset = get_config(args.preset)
        batch_size = preset.data.batch_size
        if args.data:
            data = [f"data.root={args.data}"]
        else:
            out = Path(tmp) / "scenes"
            num = (args.rounds + 1) * batch_size
            size = source_image_size(preset.data)
            generate(out, preset.data.format, num_train=num, num_val=1, grid=preset.grid, image_size=size)
            data = data_overrides(preset.data.format, out)
        runs = [_Run(args.preset, [*data, *filter(None, v.split(";"))], v) for v in args.variants]
        for round_index in range(args.rounds + 1):  # round 0: warm-up
            for run in runs:
                elapsed = run.step(round_index)
                if round_index > 0:
                    run.times.append(elapsed)
        for run in runs:
            with measure_peak(torch.device("cpu"), run.memory):
                run.step(args.rounds + 1)
    base = statistics.median(runs[0].times)
    print(f"{args.preset}, batch {batch_size}, {args.threads} thread(s), median of {args.rounds} steps")
    for run in runs:
        median = statistics.median(run.times)
        growth = "n/a" if run.memory.growth_mib is None else f"+{run.memory.growth_mib:.0f} MiB"
        print(f"{run.name:60s} {median * 1000:7.0f} ms  {median / base:5.2f}x  peak {growth}")


class _Run:
    """One variant: its model, optimiser and dataset, stepped one batch at a time."""

    def __init__(self, preset: str, overrides: list[str], name: str) -> None:
        self.name = name or "(the preset)"
        self.cfg = get_config(preset, overrides)
        torch.manual_seed(0)
        self.model = build_model(self.cfg, load_pretrained=False).train()
        self.model.depth_teacher_weight = 0.5
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.dataset = build_dataset(self.cfg, self.cfg.data.train_split, train=True)
        self.times: list[float] = []
        self.memory = MemoryPeak()

    def step(self, round_index: int) -> float:
        """One training step on the round's batch; returns its wall time in seconds."""
        size = self.cfg.data.batch_size
        batch = collate([self.dataset[(round_index * size + i) % len(self.dataset)] for i in range(size)])
        start = time.perf_counter()
        with autocast_context(torch.device("cpu"), self.cfg.train.amp):
            loss = sum(self.model.forward_train(batch).values())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
