"""Time and peak memory of every stage of a model, for one config or two side by side.

The library behind ``spotocc benchmark`` (its command line is :mod:`spotocc.commands.benchmark`).

What is timed: a model of the config with random weights (nothing is downloaded) on a batch of the
config's real sizes (:mod:`spotocc.benchmarking.inputs`). After ``warmup`` untimed runs, each of
``repeats`` runs times every stage on its own (CUDA synchronised before and after), and the median
per stage is reported. With two configs both models live in one process and their runs alternate,
so both see the same machine state; the report gives the second over the first.

- ``infer``: ``model.eval()`` under ``torch.no_grad``: image_encoder (backbone + SECONDFPN),
  view_transformer (depth net, lift, voxel pooling), voxel_encoder, voxel_neck, head (decoder up to
  the last stage's class probabilities and mask logits), labels (full-resolution labels). Together
  they are ``model.predict(batch)``.
- ``train``: one training step in ``model.train()``: the same forward stages (the head stage includes
  matching and every loss, the view_transformer stage the depth loss), backward of the summed loss,
  and optimizer (gradient clipping and the AdamW step of the preset's optimiser).

Peak memory per stage: the CUDA allocator's peak, or on CPU the resident set's high-water mark during
the stage (see :mod:`spotocc.benchmarking.memory`), as the highest total and as growth over the stage's
start, in one extra run after the timed ones (measuring memory costs time of its own).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotocc.benchmarking.memory import MemoryPeak, measure_peak, resident_mib
from spotocc.config import Config

__all__ = ["INFER_STAGES", "MODES", "TRAIN_STAGES", "benchmark", "format_report"]

INFER_STAGES = ("image_encoder", "view_transformer", "voxel_encoder", "voxel_neck", "head", "labels")
TRAIN_STAGES = (
    "image_encoder",
    "view_transformer",
    "voxel_encoder",
    "voxel_neck",
    "head",
    "backward",
    "optimizer",
)
MODES = ("infer", "train")


# --------------------------------------------------------------------------------------------------
# measuring


@dataclass
class _StageLog:
    """Times (timed runs) and peak memory (the memory run) of each stage of one model and mode."""

    device: torch.device
    phase: str = "warmup"  # "warmup": nothing recorded, "time" or "memory"
    times: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, MemoryPeak] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.phase == "memory":
            peak = self.peaks.setdefault(name, MemoryPeak())
            with measure_peak(self.device, peak):
                yield
            return
        if self.phase != "time":
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.times.setdefault(name, []).append(time.perf_counter() - start)

    def summary(self, stages: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in stages:
            times = self.times[name]
            out[name] = {
                "median_s": statistics.median(times),
                "min_s": min(times),
                "times_s": times,
                "peak_mib": self.peaks[name].peak_mib if name in self.peaks else None,
                "growth_mib": self.peaks[name].growth_mib if name in self.peaks else None,
            }
        runs = len(self.times[stages[0]])
        out["total"] = {
            "median_s": statistics.median(sum(self.times[s][r] for s in stages) for r in range(runs)),
            "peak_mib": _max_or_none(out[s]["peak_mib"] for s in stages),
        }
        return out


def _max_or_none(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer_stages(model: torch.nn.Module, batch: dict[str, Any], log: _StageLog) -> torch.Tensor:
    """``model.predict(batch)``, stage by stage: int64 labels [B, X, Y, Z]."""
    from spotocc.models.labels import occupancy_labels

    with torch.no_grad():
        with log.stage("image_encoder"):
            feats = model.encode_images(batch["img"])  # [B, N, C, H/16, W/16]
        with log.stage("view_transformer"):
            volume, _ = model.lift(feats, batch)  # [B, C, X, Y, Z]
        with torch.autocast(volume.device.type, enabled=False):  # as OccupancyModel.encode_voxels
            with log.stage("voxel_encoder"):
                levels = model.voxel_encoder(volume.float())
            with log.stage("voxel_neck"):
                voxel_feats = model.voxel_neck(levels)
        with log.stage("head"):
            class_probs, mask_logits = model.head.predict_logits(voxel_feats)  # [B,Q,C], [B,Q,X0,Y0,Z0]
        with log.stage("labels"):
            return occupancy_labels(class_probs, mask_logits, model.occ_size, model.head.label_method)


def train_stages(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    log: _StageLog,
    autocast: Callable[[], Any],
) -> dict[str, torch.Tensor]:
    """One training step as the trainer takes it (forward_train, backward, clip, AdamW), by stage."""
    from spotocc.engine.optim import clip_gradients
    from spotocc.engine.trainer import total_loss

    optimizer.zero_grad(set_to_none=True)
    with autocast():
        with log.stage("image_encoder"):
            feats = model.encode_images(batch["img"])
        with log.stage("view_transformer"):
            volume, depth_prob = model.lift(feats, batch)
            losses = {"loss_depth": model.depth_loss(batch, depth_prob)}
        with torch.autocast(volume.device.type, enabled=False):
            with log.stage("voxel_encoder"):
                levels = model.voxel_encoder(volume.float())
            with log.stage("voxel_neck"):
                voxel_feats = model.voxel_neck(levels)
        with log.stage("head"):
            losses.update(model.head.forward_train(voxel_feats, batch["gt_occ"]))
    with log.stage("backward"):
        scaler.scale(total_loss(losses)).backward()
    with log.stage("optimizer"):
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        clip_gradients(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return losses


@dataclass
class _Subject:
    """One model under test and what it needs for both modes."""

    cfg: Config
    model: torch.nn.Module
    batch: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    logs: dict[str, _StageLog] = field(default_factory=dict)


def benchmark(
    configs: Sequence[Config],
    *,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    modes: Sequence[str] = MODES,
    repeats: int = 3,
    warmup: int = 1,
    amp: str = "none",
    seed: int = 0,
    measure_memory: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every stage of each config's model (runs alternate between models); a JSON-able dict.

    Timed runs (after ``warmup`` untimed ones) record time only; one more run per model and mode
    (``measure_memory``) records the peak memory of each stage.

    Returns ``{"setup": {...}, "runs": {name: {"infer": {stage: stats}, "train": ...}}}`` and, for two
    configs, ``"ratios"``: per mode and stage, the second model's median time and peak memory over
    the first's.
    """
    from spotocc.benchmarking.inputs import benchmark_batch
    from spotocc.engine.evaluator import autocast_context, move_to_device
    from spotocc.engine.optim import build_optimizer
    from spotocc.models import build_model
    from spotocc.models.sparse.conv import resolve_backend

    device = torch.device(device)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    names = [cfg.name for cfg in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark: two configs with the same name {names}")
    say = log or (lambda _msg: None)
    subjects: list[_Subject] = []
    for cfg in configs:
        torch.manual_seed(seed)
        model = build_model(cfg, load_pretrained=False).to(device)
        batch = move_to_device(benchmark_batch(cfg, batch_size, seed=seed), device)
        subject = _Subject(cfg, model, batch)
        if "train" in modes:
            subject.optimizer = build_optimizer(model, cfg.train)
            subject.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        subjects.append(subject)
        params = sum(p.numel() for p in model.parameters())
        say(f"built {cfg.name}: {params / 1e6:.1f} M parameters, batch of {batch_size} ({_input_text(cfg)})")

    def autocast():
        return autocast_context(device, amp)

    for mode in modes:
        for subject in subjects:
            subject.model.train(mode == "train")
            subject.logs[mode] = _StageLog(device)
        phases = ["warmup"] * warmup + ["time"] * repeats + (["memory"] if measure_memory else [])
        for run, phase in enumerate(phases):
            for subject in subjects:
                stage_log = subject.logs[mode]
                stage_log.phase = phase
                if mode == "infer":
                    with autocast():
                        infer_stages(subject.model, subject.batch, stage_log)
                else:
                    train_stages(
                        subject.model,
                        subject.batch,
                        subject.optimizer,
                        subject.scaler,
                        subject.cfg,
                        stage_log,
                        autocast,
                    )
            say(f"{mode}: run {run + 1}/{len(phases)} ({phase}) done")

    stages = {"infer": INFER_STAGES, "train": TRAIN_STAGES}
    result: dict[str, Any] = {
        "setup": {
            "presets": names,
            "batch_size": batch_size,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "amp": amp,
            "repeats": repeats,
            "warmup": warmup,
            "modes": list(modes),
            "sparse_backend": {
                cfg.name: resolve_backend(cfg.model.sparse_backend, device) for cfg in configs
            },
            "inputs": {cfg.name: _input_text(cfg) for cfg in configs},
            "torch": torch.__version__,
            "resident_mib_after": resident_mib() if device.type == "cpu" else None,
        },
        "runs": {s.cfg.name: {m: s.logs[m].summary(stages[m]) for m in modes} for s in subjects},
    }
    if len(subjects) == 2:
        first, second = (result["runs"][n] for n in names)
        result["ratios"] = {
            mode: {
                stage: {
                    "time": _ratio(second[mode][stage]["median_s"], first[mode][stage]["median_s"]),
                    "peak_mib": _ratio(second[mode][stage]["peak_mib"], first[mode][stage]["peak_mib"]),
                    "growth_mib": _ratio(
                        second[mode][stage].get("growth_mib"), first[mode][stage].get("growth_mib")
                    ),
                }
                for stage in (*stages[mode], "total")
            }
            for mode in modes
        }
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _input_text(cfg: Config) -> str:
    h, w = cfg.data.input_size
    grid = "x".join(str(s) for s in cfg.grid.occ_size)
    cams = len(cfg.data.cameras)
    return f"{cams} camera{'s' if cams > 1 else ''} at {h}x{w}, {grid} grid"


# --------------------------------------------------------------------------------------------------
# printing


def format_report(result: dict[str, Any]) -> str:
    """The result of :func:`benchmark` as text tables: one per mode, a column pair per model."""
    setup = result["setup"]
    names = setup["presets"]
    lines = [
        f"device {setup['device']} ({setup['device_name'] or 'unknown'}), {setup['threads']} threads, "
        f"batch {setup['batch_size']}, amp {setup['amp']}, torch {setup['torch']}",
        f"median of {setup['repeats']} timed runs after {setup['warmup']} warm-up run(s); random weights; "
        "peak = highest "
        + ("allocated CUDA memory" if setup["device"].startswith("cuda") else "resident set")
        + " during the stage, +growth over its start",
    ]
    for name in names:
        lines.append(f"  {name}: {setup['inputs'][name]}, sparse backend {setup['sparse_backend'][name]}")
    ratios = result.get("ratios")
    for mode in setup["modes"]:
        title = "inference (eval, no_grad)" if mode == "infer" else "one training step"
        header = f"{title:28s}" + "".join(f"{_short(n):>30s}" for n in names)
        if ratios:
            header += f"{'B/A time':>10s}{'B/A peak':>10s}"
        lines += [
            "",
            header,
            " " * 28 + "".join(f"{'median s':>10s}{'peak MiB (+growth)':>20s}" for _ in names),
        ]
        stages = [*(INFER_STAGES if mode == "infer" else TRAIN_STAGES), "total"]
        for stage in stages:
            row = f"  {stage:26s}"
            for name in names:
                stats = result["runs"][name][mode][stage]
                row += f"{stats['median_s']:10.3f}{_memory_text(stats):>20s}"
            if ratios:
                r = ratios[mode][stage]
                row += f"{_ratio_text(r['time']):>10s}{_ratio_text(r['peak_mib']):>10s}"
            lines.append(row)
    if ratios:
        lines += ["", f"B/A: {names[1]} over {names[0]} (above 1: {names[0]} is faster / smaller)"]
    return "\n".join(lines)


def _short(name: str) -> str:
    return name if len(name) <= 26 else name[:25] + "~"


def _memory_text(stats: dict[str, Any]) -> str:
    peak, growth = stats.get("peak_mib"), stats.get("growth_mib")
    if peak is None:
        return "n/a"
    return f"{peak:.0f}" + ("" if growth is None else f" (+{growth:.0f})")


def _ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
