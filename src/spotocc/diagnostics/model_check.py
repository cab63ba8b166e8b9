"""One training step and one prediction of ``synthetic_tiny`` on generated scenes (``spotocc doctor``).

Two scenes are generated at the preset's sizes (one camera at 192x640, a 64x64x16 grid) into a
temporary folder and read back by the real SemanticKITTI reader, as one batch of 2. The step is the
trainer's: ``forward_train`` under :func:`~spotocc.engine.evaluator.autocast_context`, the summed loss,
backward (through a GradScaler for fp16, repeated while it skips overflowing steps), gradient clipping
and the AdamW step of the preset. Then ``predict`` in eval mode under the same autocast. Wrong: a
non-finite loss, gradient or weight, no weight that moved, labels of the wrong shape or outside the
classes, or a mixed-precision loss more than :data:`AMP_LOSS_TOLERANCE` away from the float32 loss of
the same weights and batch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from spotocc.diagnostics.selfcheck import CheckFailed

__all__ = ["AMP_LOSS_TOLERANCE", "MAX_SKIPPED_STEPS", "TinyModelCheck", "amp_for_device"]

# relative difference allowed between the first loss under autocast and in float32 (measured: 0.03%
# for bf16 on a CPU; the Hungarian matching may pick other pairs in reduced precision)
AMP_LOSS_TOLERANCE = 0.1
MAX_SKIPPED_STEPS = 16  # fp16: the GradScaler halves its scale (from 65536) at each skipped step


def amp_for_device(device: torch.device) -> str:
    """The mixed precision the device supports: bf16 (CPUs, and GPUs from Ampere on), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


class TinyModelCheck:
    """Generates the batch once and runs a training step and a prediction per precision."""

    def __init__(self, overrides: Sequence[str] = (), num_scenes: int = 2) -> None:
        self.overrides = list(overrides)
        self.num_scenes = num_scenes
        self._data: tuple[Any, dict[str, Any]] | None = None
        self.first_loss: dict[str, float] = {}  # amp -> first loss, for the fp32 comparison

    def data(self):
        """(config, batch) of ``num_scenes`` generated scenes, read by the real reader."""
        if self._data is None:
            from spotocc.config import apply_overrides, get_config
            from spotocc.data import build_dataset, collate
            from spotocc.data.synthetic import generate, source_image_size

            cfg = get_config("synthetic_tiny", self.overrides)
            with tempfile.TemporaryDirectory(prefix="spotocc-doctor-") as root:
                summary = generate(
                    root,
                    "semantickitti",
                    num_train=self.num_scenes,
                    num_val=0,
                    seed=0,
                    grid=cfg.grid,
                    image_size=source_image_size(cfg.data),
                    lidar_azimuth_steps=128,  # a sparser LiDAR: faster, and depth targets stay
                )
                cfg = apply_overrides(cfg, summary.data_overrides)
                dataset = build_dataset(cfg, "train", train=True)
                batch = collate([dataset[i] for i in range(len(dataset))])
            self._data = (cfg, batch)
        return self._data

    def run(self, device: torch.device, amp: str) -> str:
        """One training step and one prediction under ``amp`` ("none", "bf16" or "fp16")."""
        from spotocc.benchmarking.memory import MemoryPeak, measure_peak
        from spotocc.engine.evaluator import autocast_context, move_to_device
        from spotocc.engine.optim import build_optimizer
        from spotocc.models import build_model
        from spotocc.models.sparse.conv import resolve_backend

        cfg, batch = self.data()
        batch = move_to_device(batch, device)
        torch.manual_seed(0)
        model = build_model(cfg, load_pretrained=False).to(device).train()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = build_optimizer(model, cfg.train)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        train_peak, predict_peak = MemoryPeak(), MemoryPeak()
        torch.manual_seed(1)  # the same noise (denoising queries, point sampling) in every precision
        start = time.perf_counter()
        with measure_peak(device, train_peak):
            loss, skipped = self._train_step(model, batch, optimizer, scaler, cfg, device, amp)
        train_seconds = time.perf_counter() - start
        moved = sum(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise CheckFailed(f"non-finite weights after the step under amp={amp}")
        if moved == 0:
            raise CheckFailed(f"no weight changed in the training step under amp={amp}")

        model.eval()
        start = time.perf_counter()
        with measure_peak(device, predict_peak), torch.no_grad(), autocast_context(device, amp):
            labels = model.predict(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        predict_seconds = time.perf_counter() - start
        expected = (batch["gt_occ"].shape[0], *cfg.grid.occ_size)
        if tuple(labels.shape) != expected or labels.dtype != torch.int64:
            raise CheckFailed(f"predict gave {labels.dtype} {tuple(labels.shape)}, expected int64 {expected}")
        num_classes = cfg.model.head.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise CheckFailed(f"predicted labels outside 0..{num_classes - 1}")

        value = float(loss.detach())
        self.first_loss[amp] = value
        parts = [f"loss {value:.3f}"]
        reference = self.first_loss.get("none")
        if amp != "none" and reference is not None:
            change = abs(value - reference) / max(abs(reference), 1e-12)
            if change > AMP_LOSS_TOLERANCE:
                raise CheckFailed(
                    f"the {amp} loss {value:.4f} is {change:.0%} away from the float32 loss {reference:.4f} "
                    "of the same weights and batch"
                )
            parts[0] += f" ({change:.2%} from float32)"
        if skipped:
            scale = scaler.get_scale()
            parts.append(
                f"the GradScaler skipped {skipped} overflowing step{'s' if skipped > 1 else ''} first"
            )
            parts[-1] += f" (scale now {scale:.0f})"
        parts.append(f"step {train_seconds:.2f} s, predict {predict_seconds:.2f} s")
        peaks = [p.peak_mib for p in (train_peak, predict_peak)]
        if all(p is not None for p in peaks):
            kind = "allocated" if device.type == "cuda" else "resident"
            parts.append(f"peak {kind} memory {peaks[0]:.0f} / {peaks[1]:.0f} MiB")
        backend = resolve_backend(cfg.model.sparse_backend, device)
        parts.append(f"batch {expected[0]}, sparse backend {backend}")
        return "; ".join(parts)

    @staticmethod
    def _train_step(model, batch, optimizer, scaler, cfg, device, amp) -> tuple[torch.Tensor, int]:
        """The trainer's step: (the first total loss, the steps the fp16 GradScaler skipped first).

        A GradScaler starts at a scale (65536) that usually overflows fp16 gradients; it skips such a
        step and halves the scale, so under fp16 the step repeats until one is taken (at most
        :data:`MAX_SKIPPED_STEPS` skips, down to a scale of 1).
        """
        from spotocc.engine.evaluator import autocast_context
        from spotocc.engine.optim import clip_gradients
        from spotocc.engine.trainer import total_loss

        first_loss = None
        for skipped in range(MAX_SKIPPED_STEPS + 1 if scaler.is_enabled() else 1):
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, amp):
                losses = model.forward_train(batch)
            loss = total_loss(losses)
            bad = [k for k, v in losses.items() if "loss" in k and not torch.isfinite(v).all()]
            if bad or not torch.isfinite(loss):
                raise CheckFailed(f"non-finite losses under amp={amp}: {', '.join(bad) or 'the total'}")
            first_loss = loss.detach() if first_loss is None else first_loss
            scaler.scale(loss).backward()
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            clip_gradients(model.parameters(), cfg.train.grad_clip)
            finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            if not finite and not scaler.is_enabled():
                raise CheckFailed(f"non-finite gradients under amp={amp} with a finite loss")
            scaler.step(optimizer)  # skipped by the GradScaler when fp16 gradients overflowed
            scaler.update()
            if finite:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return first_loss, skipped
        raise CheckFailed(
            f"fp16 gradients overflowed in {MAX_SKIPPED_STEPS + 1} steps, down to a GradScaler scale of "
            f"{scaler.get_scale():.0f}, with finite losses"
        )
