"""Runs the trainer (and optionally a distributed evaluation) on the toys, in a fresh process.

The engine tests launch it with ``python engine_driver.py ...`` or ``torchrun ... engine_driver.py ...``
so that a run can be killed (SIGKILL at a step, or inside a checkpoint save) and resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)  # same thread count in every run: bitwise-comparable results

from engine_toys import toy_config, toy_dataset_factory, toy_model_factory  # noqa: E402

from spotocc.engine import checkpoint as ckpt  # noqa: E402
from spotocc.engine import distributed as dist_utils  # noqa: E402
from spotocc.engine.evaluator import evaluate, load_model_from_checkpoint  # noqa: E402
from spotocc.engine.trainer import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-at-save", type=int, help="kill during the Nth checkpoint save (1-based)")
    parser.add_argument("--kill-stage", default="files_written")
    parser.add_argument("--eval-out", help="after training, evaluate the last checkpoint, dump JSON here")
    args = parser.parse_args()
    cfg = toy_config(args.override)

    def kill_at_step(step: int) -> None:
        if args.kill_at_step is not None and step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    saves = {"n": 0}

    def kill_in_save(stage: str, path: Path) -> None:
        if stage == "files_written":
            saves["n"] += 1
        if args.kill_at_save is not None and saves["n"] == args.kill_at_save and stage == args.kill_stage:
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.add_save_hook(kill_in_save)
    info = dist_utils.init_distributed("cpu")
    train(
        cfg,
        work_dir=args.work_dir,
        resume=True if args.resume else None,
        device="cpu",
        model_factory=toy_model_factory,
        dataset_factory=toy_dataset_factory,
        show_progress=False,
        on_step_end=kill_at_step,
    )
    if args.eval_out:
        model, cfg = load_model_from_checkpoint(
            Path(args.work_dir) / "checkpoints" / "last", model_factory=toy_model_factory
        )
        result = evaluate(
            model,
            toy_dataset_factory(cfg, cfg.data.val_split, train=False),
            cfg,
            device=info.device,
            batch_size=1,
            num_workers=0,
            show_progress=False,
        )
        if info.is_main:
            out = {
                "metrics": result.metrics,
                "confusion": result.counts["confusion"].tolist(),
                "ignored": int(result.counts["ignored"][0]),
                "num_samples": result.num_samples,
                "sample_ids": result.sample_ids,
                "world_size": info.world_size,
            }
            Path(args.eval_out).write_text(json.dumps(out))
    dist_utils.teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
