"""Save a trained model's last-stage head outputs, the real inputs of full-resolution label formation.

Runs a checkpoint on the first samples of a split and writes an ``.npz`` that
``benchmarks/bench_labels.py --npz`` reads: ``class_probs`` [B, Q, C] (no-object column dropped),
``mask_logits`` [B, Q, X0, Y0, Z0] at the finest feature grid and ``out_size`` (the model's grid).

    spotocc quickstart                                            # trains synthetic_tiny
    python benchmarks/head_outputs_from_checkpoint.py work_dirs/quickstart/train/checkpoints/best \
        --data work_dirs/quickstart/data --out head_outputs.npz --samples 4
    python benchmarks/bench_labels.py --npz head_outputs.npz
"""

from __future__ import annotations

import argparse
import sys

import torch

from spotocc.benchmarking.labels import save_head_outputs
from spotocc.config import apply_overrides
from spotocc.data.batch import collate
from spotocc.engine.evaluator import default_dataset_factory, load_model_from_checkpoint, move_to_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint dir, .safetensors or work dir")
    parser.add_argument("--data", help="dataset root (default: the checkpoint config's data.root)")
    parser.add_argument("--split", help="split (default: the config's data.val_split)")
    parser.add_argument("--samples", type=int, default=1, help="samples, run as one batch (default 1)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")

    device = torch.device(args.device)
    model, cfg = load_model_from_checkpoint(args.checkpoint, device=device)
    if args.data:
        apply_overrides(cfg, [f"data.root={args.data}"])
    split = args.split or cfg.data.val_split
    dataset = default_dataset_factory(cfg, split, train=False)
    if len(dataset) < args.samples:
        raise SystemExit(f"--samples {args.samples}: split {split!r} of {cfg.data.root} has {len(dataset)}")
    batch = move_to_device(collate([dataset[i] for i in range(args.samples)]), device)
    model.eval()
    with torch.no_grad():
        voxel_feats, _ = model.extract_features(batch)
        class_probs, mask_logits = model.head.predict_logits(voxel_feats)  # [B, Q, C], [B, Q, X0, Y0, Z0]
    save_head_outputs(args.out, class_probs, mask_logits, tuple(model.occ_size))
    print(
        f"wrote {args.out}: class_probs {tuple(class_probs.shape)}, mask_logits {tuple(mask_logits.shape)}, "
        f"out_size {tuple(model.occ_size)} ({cfg.name}, split {split!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
