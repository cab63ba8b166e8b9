"""Time and peak memory of using a released checkpoint: convert to safetensors, or load the .pth directly.

Writes a full-size synthetic released-layout checkpoint of the preset (random tensors with the released
names and shapes, from ``tests/data/released_parameters``) to a temporary folder, then runs, each in a
fresh process so peak memories do not mix:

- ``convert``: ``convert_released_checkpoint`` (weights-only read, meta-device skeleton, safetensors write);
- ``load-pth``: ``build_model_from_released`` (build the real model, read, strict load);
- ``load-converted``: ``load_model_from_checkpoint`` on the converted file (what ``spotocc eval`` does);
- ``build-only``: ``build_model`` alone, the floor of both loads.

    python benchmarks/bench_released_checkpoint.py [--preset spotocc_kitti] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

STAGES = ("build-only", "convert", "load-pth", "load-converted")


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


def _layout():
    path = Path(__file__).parents[1] / "tests" / "data" / "released_parameters" / "released_layout.py"
    spec = importlib.util.spec_from_file_location("released_layout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(stage: str, preset: str, pth: Path, out: Path) -> dict:
    from spotocc.config import get_config
    from spotocc.engine.evaluator import load_model_from_checkpoint
    from spotocc.engine.released_checkpoint import build_model_from_released, convert_released_checkpoint
    from spotocc.models import build_model

    cfg = get_config(preset)
    start_rss = _rss_mib()
    start = time.perf_counter()
    with RssPeak() as peak:
        if stage == "build-only":
            build_model(cfg, load_pretrained=False)
        elif stage == "convert":
            convert_released_checkpoint(pth, out, cfg)
        elif stage == "load-pth":
            build_model_from_released(cfg, pth)
        elif stage == "load-converted":
            load_model_from_checkpoint(out)
    return {"seconds": time.perf_counter() - start, "peak_extra_mib": peak.value - start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="spotocc_kitti")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--files", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.preset, Path(args.files[0]), Path(args.files[1]))))
        return

    rl = _layout()
    with tempfile.TemporaryDirectory() as tmp:
        pth, out = Path(tmp) / "released.pth", Path(tmp) / "converted.safetensors"
        state = rl.released_state_dict(args.preset, seed=0)
        torch.save(rl.mmcv_checkpoint(state), pth)
        size_mib = pth.stat().st_size / 2**20
        del state
        print(f"{args.preset}: released file {size_mib:.0f} MiB, {args.threads} threads")
        for stage in STAGES:
            cmd = [sys.executable, __file__, "--preset", args.preset, "--threads", str(args.threads)]
            result = subprocess.run(
                [*cmd, "--stage", stage, "--files", str(pth), str(out)],
                capture_output=True,
                text=True,
                check=True,
            )
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"  {stage:15s} {numbers['seconds']:6.2f} s   peak +{numbers['peak_extra_mib']:6.0f} MiB")


if __name__ == "__main__":
    main()
