"""The training loop, the same code on CPU, one GPU, and many under torchrun; ``_run`` reads top to bottom.

Single process (CPU, or the first GPU)::

    spotocc train synthetic_tiny --work-dir runs/tiny

One machine, 8 GPUs (DDP with SyncBatchNorm, as released; global batch = 8 x data.batch_size)::

    torchrun --standalone --nproc_per_node=8 -m spotocc.cli train spotocc_nusc_256 --work-dir runs/nusc

Two machines (run on each, with its own --node_rank)::

    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        -m spotocc.cli train spotocc_nusc_256 --work-dir runs/nusc

Resume after an interruption (a crash, a kill, even during a checkpoint save)::

    spotocc train synthetic_tiny --work-dir runs/tiny --resume

What a step does (mmdet/mmcv semantics of the released runs): sum every model output whose key
contains ``"loss"``, backward (scaled by a GradScaler under fp16 autocast), clip the global gradient
norm to ``train.grad_clip``, AdamW step. After each epoch: the step schedule, evaluation every
``train.eval_interval`` epochs (the best SSC mIoU, Occ3D: camera-mask mIoU, keeps ``best``), and a checkpoint
every ``train.checkpoint_interval`` epochs (also every ``train.checkpoint_iter_interval`` iterations
if set). Resuming is exact: the checkpoint holds the model, optimizer, schedule, scaler, counters,
every rank's RNG states and the position in the epoch's sample order, and each sample's
augmentation is seeded from ``(seed, epoch, index)``, so the resumed run computes the same losses as
the uninterrupted one (bit for bit on the same hardware and thread count).

About 730 lines in one module on purpose: the loop, its steps and the state they save and restore
read top to bottom in one file, as nanoGPT's ``train.py`` does.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from spotocc.config import Config, TrainConfig
from spotocc.engine import distributed as dist_utils
from spotocc.engine.atomic import write_text_atomic
from spotocc.engine.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from spotocc.engine.evaluator import (
    DatasetFactory,
    ModelFactory,
    autocast_context,
    default_dataset_factory,
    default_model_factory,
    evaluate,
    move_to_device,
)
from spotocc.engine.metrics_log import MetricsLog
from spotocc.engine.optim import build_lr_scheduler, build_optimizer, clip_gradients
from spotocc.engine.sampling import ResumableDistributedSampler, SeededSamples
from spotocc.engine.scoring import uses_occ3d
from spotocc.errors import ConfigError
from spotocc.evaluation import format_ssc_table, metric_prefix, with_prefix
from spotocc.evaluation.occ3d_eval import format_occ3d_table

__all__ = ["TrainResult", "total_loss", "train"]

log = logging.getLogger("spotocc.train")
STATE_VERSION = 1


@dataclass
class TrainResult:
    """Where a run ended."""

    global_step: int
    epochs_completed: int
    best_miou: float | None
    last_checkpoint: Path | None


@dataclass
class _Progress:
    epoch: int = 0  # epochs completed
    iter_in_epoch: int = 0  # iterations completed in the current epoch
    global_step: int = 0
    best_miou: float | None = None
    best_step: int | None = None


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of every entry whose key contains ``"loss"`` (mmdet's ``_parse_losses``)."""
    terms = [value for key, value in losses.items() if "loss" in key]
    if not terms:
        raise ValueError(f"forward_train returned no entry whose key contains 'loss': {sorted(losses)}")
    return torch.stack([t.float().sum() for t in terms]).sum()


class _TrainStep(nn.Module):
    """Routes ``forward`` to ``model.forward_train`` so DDP's hooks see the training forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.forward_train(batch)


def train(
    cfg: Config,
    *,
    work_dir: str | Path,
    resume: bool | str | Path | None = None,
    device: str = "auto",
    model_factory: ModelFactory | None = None,
    dataset_factory: DatasetFactory | None = None,
    collate_fn: Callable | None = None,
    show_progress: bool | None = None,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``work_dir`` (see the module docstring for the launches).

    Args:
        resume: ``True`` resumes from the newest checkpoint in ``work_dir`` that verifies (starting fresh
            if there is none); a path resumes from that checkpoint.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        model_factory / dataset_factory / collate_fn: default to ``spotocc.models.build_model``,
            ``spotocc.data.build_dataset`` and ``spotocc.data.collate``.
        show_progress: tqdm bars on rank 0; None = only when stderr is a terminal.
        on_step_end: called with the global step after every iteration (after any checkpoint save).
    """
    owns_group = not dist_utils.is_distributed()
    info = dist_utils.init_distributed(device)
    work_dir = Path(work_dir)
    handlers = _setup_logging(work_dir, info.is_main)
    try:
        return _run(
            cfg,
            info=info,
            work_dir=work_dir,
            resume=resume,
            model_factory=model_factory or default_model_factory,
            dataset_factory=dataset_factory or default_dataset_factory,
            collate_fn=collate_fn,
            show_progress=show_progress,
            on_step_end=on_step_end,
        )
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        if owns_group:
            dist_utils.teardown_distributed()


def _run(
    cfg: Config,
    *,
    info: dist_utils.DistInfo,
    work_dir: Path,
    resume: bool | str | Path | None,
    model_factory: ModelFactory,
    dataset_factory: DatasetFactory,
    collate_fn: Callable | None,
    show_progress: bool | None,
    on_step_end: Callable[[int], None] | None,
) -> TrainResult:
    run = _set_up(cfg, info, work_dir, resume, model_factory, dataset_factory, collate_fn, show_progress)
    progress = run.progress
    stop = run.reached_max_iters()
    try:
        while progress.epoch < cfg.train.epochs and not stop:
            stop = _train_epoch(run, on_step_end)
            if not stop:
                _end_of_epoch(run)
    finally:
        run.metrics_log.close()
    return TrainResult(progress.global_step, progress.epoch, progress.best_miou, run.last_path)


@dataclass
class _Run:
    """What one training run holds: made by :func:`_set_up`, advanced by the loop of :func:`_run`."""

    cfg: Config
    info: dist_utils.DistInfo
    ckpt_dir: Path
    model: nn.Module
    step_module: nn.Module  # the model's training forward; DDP-wrapped with more than one process
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    progress: _Progress
    sampler: ResumableDistributedSampler
    loader: DataLoader
    iters_per_epoch: int
    metrics_log: MetricsLog
    dataset_factory: DatasetFactory
    collate_fn: Callable
    show_progress: bool | None
    window: _LogWindow = field(default_factory=lambda: _LogWindow())
    val_set: Any = None  # built at the first evaluation
    last_path: Path | None = None

    def reached_max_iters(self) -> bool:
        max_iters = self.cfg.train.max_iters
        return max_iters is not None and self.progress.global_step >= max_iters


def _set_up(
    cfg: Config,
    info: dist_utils.DistInfo,
    work_dir: Path,
    resume: bool | str | Path | None,
    model_factory: ModelFactory,
    dataset_factory: DatasetFactory,
    collate_fn: Callable | None,
    show_progress: bool | None,
) -> _Run:
    """The work directory, model, optimiser and schedule, the resumed state, the data and the logs."""
    tc = cfg.train
    check_depth_teacher_forcing(tc)
    device = info.device
    if collate_fn is None:
        from spotocc.data import collate as collate_fn
    ckpt_dir = work_dir / "checkpoints"
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(work_dir / "config.json", cfg.to_json())

    # model, optimiser, schedule (identical initial weights on every rank: same seed)
    _seed_all(tc.seed)
    model = model_factory(cfg).to(device)
    if info.world_size > 1 and tc.sync_bn:
        model = dist_utils.convert_sync_batchnorm(model, device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_lr_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    progress, resumed = _resume(resume, ckpt_dir, cfg, info, model, optimizer, scheduler, scaler)

    step_module: nn.Module = _TrainStep(model)
    if info.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters,
        )

    # data
    train_set = dataset_factory(cfg, cfg.data.train_split, train=True)
    if len(train_set) == 0:
        raise ValueError(f"training split {cfg.data.train_split!r} of {cfg.data.root} has no samples")
    sampler = ResumableDistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed
    )
    batch_size = cfg.data.batch_size
    loader = DataLoader(
        SeededSamples(train_set),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        drop_last=False,
        generator=torch.Generator().manual_seed(tc.seed),  # the loader never draws from the global RNG
    )
    iters_per_epoch = math.ceil(sampler.num_samples / batch_size)

    metrics_log = MetricsLog(
        work_dir,
        resume_step=progress.global_step if resumed else None,
        tensorboard=tc.tensorboard,
        enabled=info.is_main,
    )
    log.info(
        "training %s on %s: %d process(es) x batch %d = effective batch %d, %d samples, %d iterations/epoch, "
        "%d epochs, amp=%s, sync_bn=%s, %.2fM trainable parameters",
        cfg.name,
        device,
        info.world_size,
        batch_size,
        batch_size * info.world_size,
        len(train_set),
        iters_per_epoch,
        tc.epochs,
        tc.amp,
        tc.sync_bn and info.world_size > 1,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    return _Run(
        cfg=cfg,
        info=info,
        ckpt_dir=ckpt_dir,
        model=model,
        step_module=step_module,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        progress=progress,
        sampler=sampler,
        loader=loader,
        iters_per_epoch=iters_per_epoch,
        metrics_log=metrics_log,
        dataset_factory=dataset_factory,
        collate_fn=collate_fn,
        show_progress=show_progress,
    )


def _resume(
    resume: bool | str | Path | None,
    ckpt_dir: Path,
    cfg: Config,
    info: dist_utils.DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> tuple[_Progress, bool]:
    """Restore a checkpoint's full state if ``resume`` finds one, else start fresh; (progress, resumed)."""
    progress = _Progress()
    resume_from = _resume_target(resume, ckpt_dir)
    if resume_from is not None:
        _restore(resume_from, cfg, info, model, optimizer, scheduler, scaler, progress)
        return progress, True
    if info.is_main and (ckpt_dir / "last").exists():
        log.warning(
            "%s holds checkpoints of an earlier run; starting from scratch (older generations will be "
            "removed as new ones are saved). Pass --resume to continue that run instead.",
            ckpt_dir,
        )
    _seed_all(cfg.train.seed + info.rank)  # runtime randomness (dropout, noise) differs between ranks
    return progress, False


def _train_epoch(run: _Run, on_step_end: Callable[[int], None] | None) -> bool:
    """The rest of the current epoch, step by step; True when ``train.max_iters`` stopped it."""
    tc, progress = run.cfg.train, run.progress
    epoch = progress.epoch
    run.sampler.set_epoch(epoch)
    run.sampler.set_start(min(progress.iter_in_epoch * run.cfg.data.batch_size, run.sampler.num_samples))
    run.model.train()
    bar = _progress_bar(
        run.iters_per_epoch, progress.iter_in_epoch, f"epoch {epoch + 1}", run.show_progress, run.info
    )
    stop = False
    tic = time.perf_counter()
    for batch in run.loader:
        data_time = time.perf_counter() - tic
        losses, loss, grad_norm = _train_step(run, batch)
        progress.global_step += 1
        progress.iter_in_epoch += 1
        bar.update(1)
        run.window.add(losses, loss, grad_norm, time.perf_counter() - tic, data_time)

        end_of_epoch = progress.iter_in_epoch == run.iters_per_epoch
        if progress.global_step % max(tc.log_interval, 1) == 0 or end_of_epoch:
            _log_train(run, bar, epoch)
        stop = run.reached_max_iters()
        interval = tc.checkpoint_iter_interval
        iter_save_due = interval > 0 and progress.global_step % interval == 0
        if stop or (iter_save_due and not end_of_epoch):  # at an epoch end the save comes after evaluation
            _save(run, is_best=False)
        if on_step_end is not None:
            on_step_end(progress.global_step)
        if stop:
            break
        tic = time.perf_counter()
    bar.close()
    return stop


def _train_step(
    run: _Run, batch: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Forward, backward, clip and optimiser step on one batch: (named losses, their sum, grad norm)."""
    tc, device, scaler, optimizer = run.cfg.train, run.info.device, run.scaler, run.optimizer
    batch = move_to_device(batch, device)
    run.model.depth_teacher_weight = depth_teacher_weight(
        tc, run.progress.global_step, tc.epochs * run.iters_per_epoch
    )
    with autocast_context(device, tc.amp):
        losses = run.step_module(batch)
    loss = total_loss(losses)
    _check_finite(loss, run.progress.global_step + 1, scaler.is_enabled())
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(run.model.parameters(), tc.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses, loss, grad_norm


def check_depth_teacher_forcing(tc: TrainConfig) -> None:
    """ConfigError unless ``train.depth_teacher_forcing`` is in [0, 1] and its end fraction is > 0."""
    if not 0.0 <= tc.depth_teacher_forcing <= 1.0:
        raise ConfigError(f"train.depth_teacher_forcing must be in [0, 1], got {tc.depth_teacher_forcing}")
    if not tc.depth_teacher_forcing_end > 0.0:
        raise ConfigError(
            f"train.depth_teacher_forcing_end must be > 0 (a fraction of the run), "
            f"got {tc.depth_teacher_forcing_end}"
        )


def depth_teacher_weight(tc: TrainConfig, step: int, total_steps: int) -> float:
    """The share of depth targets in the lift at ``step`` (0-based) of ``total_steps``: linear from
    ``train.depth_teacher_forcing`` at step 0 to 0 at ``depth_teacher_forcing_end`` x total_steps."""
    if tc.depth_teacher_forcing <= 0.0:
        return 0.0
    end = tc.depth_teacher_forcing_end * total_steps
    return tc.depth_teacher_forcing * max(0.0, 1.0 - step / end)


def _log_train(run: _Run, bar: Any, epoch: int) -> None:
    """Log the averages since the last log line (a collective: every rank calls it at the same steps)."""
    progress = run.progress
    record = run.window.record(run.optimizer, progress, run.info.device)
    run.metrics_log.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}")
    if bar.disable:  # no progress bar (not a terminal, or not rank 0): a log line instead
        log.info(
            "epoch %d [%d/%d] step %d lr %.3g loss %.4f",
            epoch + 1,
            progress.iter_in_epoch,
            run.iters_per_epoch,
            progress.global_step,
            record["lr"],
            record["loss"],
        )


def _end_of_epoch(run: _Run) -> None:
    """Step the schedule, evaluate when due (the best SSC mIoU is kept), save a checkpoint when due."""
    tc, progress = run.cfg.train, run.progress
    run.scheduler.step()
    progress.epoch += 1
    progress.iter_in_epoch = 0
    improved = False
    final = progress.epoch == tc.epochs
    if tc.eval_interval > 0 and (progress.epoch % tc.eval_interval == 0 or final):
        improved = _validate(run)
    epoch_save_due = progress.epoch % max(tc.checkpoint_interval, 1) == 0
    iter_save_due = (
        tc.checkpoint_iter_interval > 0 and progress.global_step % tc.checkpoint_iter_interval == 0
    )
    if improved or final or epoch_save_due or iter_save_due:
        _save(run, is_best=improved)


def _validate(run: _Run) -> bool:
    """Evaluate on the validation split, log the metrics; True when the mIoU is a new best.

    The mIoU is the SSC mIoU, or for Occ3D configs the camera-mask mIoU (RayIoU, the slow part, is
    left to ``spotocc eval``).
    """
    cfg, progress = run.cfg, run.progress
    if run.val_set is None:
        run.val_set = run.dataset_factory(cfg, cfg.data.val_split, train=False)
    occ3d = uses_occ3d(cfg)
    result = evaluate(
        run.model,
        run.val_set,
        cfg,
        device=run.info.device,
        amp=cfg.train.amp,
        collate_fn=run.collate_fn,
        show_progress=run.show_progress,
        ray_iou=False,
    )
    run.model.train()
    miou = result.metrics["mIoU" if occ3d else "SSC_mIoU"]
    improved = progress.best_miou is None or miou > progress.best_miou
    if improved:
        progress.best_miou, progress.best_step = miou, progress.global_step
    prefixed = result.metrics if occ3d else with_prefix(result.metrics, metric_prefix(cfg.data.class_set))
    run.metrics_log.log({"type": "val", "step": progress.global_step, "epoch": progress.epoch, **prefixed})
    from spotocc.data.classes import class_set

    table = (
        format_occ3d_table(result.metrics)
        if occ3d
        else format_ssc_table({f"epoch {progress.epoch}": result.metrics}, class_set(cfg.data.class_set)[0])
    )
    log.info(
        "epoch %d validation on %d samples (best %smIoU %.2f):\n%s",
        progress.epoch,
        result.num_samples,
        "" if occ3d else "SSC ",
        progress.best_miou,
        table,
    )
    return improved


def _save(run: _Run, is_best: bool) -> None:
    """Save the full training state (rank 0 writes; every rank's RNG state goes in); all ranks wait."""
    cfg, info, progress = run.cfg, run.info, run.progress
    rng_states = dist_utils.all_gather_objects(_capture_rng())
    if info.is_main:
        state = {
            "version": STATE_VERSION,
            "epoch": progress.epoch,
            "iter_in_epoch": progress.iter_in_epoch,
            "global_step": progress.global_step,
            "best_miou": progress.best_miou,
            "best_step": progress.best_step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_states,
            "sampler": {
                "seed": cfg.train.seed,
                "world_size": info.world_size,
                "batch_size": cfg.data.batch_size,
            },
        }
        run.last_path = save_checkpoint(
            run.ckpt_dir,
            model_state=run.model.state_dict(),
            config=cfg.to_dict(),
            training_state=state,
            global_step=progress.global_step,
            info={
                "epoch": progress.epoch,
                "iter_in_epoch": progress.iter_in_epoch,
                "best_miou": progress.best_miou,
            },
            is_best=is_best,
            keep_last=cfg.train.keep_last,
        )
        log.info("saved checkpoint %s%s", run.last_path, " (best)" if is_best else "")
    dist_utils.barrier()


# --------------------------------------------------------------------------------------------------
# helpers


def _resume_target(resume: bool | str | Path | None, ckpt_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True or resume == "auto":
        target = None
        if dist_utils.is_main_process():
            target = find_resumable(ckpt_dir)
            if target is None:
                log.warning("--resume: no usable checkpoint in %s, starting from scratch", ckpt_dir)
        target = dist_utils.broadcast_object(str(target) if target else None)
        return Path(target) if target else None
    return resolve_checkpoint(resume)


def _restore(
    path: Path,
    cfg: Config,
    info: dist_utils.DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    progress: _Progress,
) -> None:
    loaded = load_checkpoint(path, with_training_state=True)
    state = loaded.training_state
    assert state is not None
    if int(state.get("version", 0)) != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('version')} is not {STATE_VERSION}")
    current = json.loads(cfg.to_json())  # tuples as JSON lists, like the saved config
    if loaded.config is not None and loaded.config != current:
        changed = _diff_keys(loaded.config, current)
        log.warning("resuming %s with a different config; changed keys: %s", path, ", ".join(changed))
    model.load_state_dict(loaded.model_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    progress.epoch = int(state["epoch"])
    progress.iter_in_epoch = int(state["iter_in_epoch"])
    progress.global_step = int(state["global_step"])
    progress.best_miou = state["best_miou"]
    progress.best_step = state["best_step"]
    sampler_state = state["sampler"]
    same_layout = (sampler_state["world_size"], sampler_state["batch_size"]) == (
        info.world_size,
        cfg.data.batch_size,
    )
    if not same_layout and progress.iter_in_epoch > 0:
        # The epoch's remaining order is defined per (world size, batch size); restart the epoch.
        log.warning(
            "resuming mid-epoch with world size x batch %d x %d instead of %d x %d: restarting epoch %d",
            info.world_size,
            cfg.data.batch_size,
            sampler_state["world_size"],
            sampler_state["batch_size"],
            progress.epoch + 1,
        )
        progress.global_step -= progress.iter_in_epoch
        progress.iter_in_epoch = 0
    rng = state["rng"]
    if info.rank < len(rng) and same_layout:
        _restore_rng(rng[info.rank])
    else:
        _seed_all(cfg.train.seed + info.rank + progress.global_step)
    log.info(
        "resumed from %s: epoch %d, iteration %d of the epoch, step %d",
        path,
        progress.epoch + 1,
        progress.iter_in_epoch,
        progress.global_step,
    )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator datasets use)
    torch.manual_seed(seed)


def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (the global generator datasets use)
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(state: Mapping[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (the global generator datasets use)
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite(loss: torch.Tensor, step: int, scaler_enabled: bool) -> None:
    """Stop on a NaN/inf loss (on every rank at once) unless the fp16 GradScaler handles it."""
    if scaler_enabled:
        return
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist_utils.is_distributed():
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1:
        raise FloatingPointError(
            f"the training loss is not finite at step {step}; resume from the last checkpoint with a lower "
            "learning rate or a different amp setting"
        )


class _LogWindow:
    """Per-iteration values since the last log line, averaged when logged (mmcv's logger does the same).

    The averages are then averaged over ranks, a collective: every rank must log at the same steps and
    produce the same loss names.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.time = 0.0
        self.data_time = 0.0

    def add(
        self,
        losses: Mapping[str, torch.Tensor],
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None,
        iter_time: float,
        data_time: float,
    ) -> None:
        values = {"loss": loss.detach().float()}
        # every entry is logged (mmdet logs accuracies too); only "loss" entries were summed into `loss`
        values.update({k: v.detach().float().sum() for k, v in losses.items() if isinstance(v, torch.Tensor)})
        if grad_norm is not None:
            values["grad_norm"] = grad_norm.detach().float()
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.time += iter_time
        self.data_time += data_time

    def record(
        self, optimizer: torch.optim.Optimizer, progress: _Progress, device: torch.device
    ) -> dict[str, Any]:
        names = ["loss"] + sorted(k for k in self.sums if k not in ("loss", "grad_norm"))
        names += ["grad_norm"] if "grad_norm" in self.sums else []
        means = dist_utils.reduce_mean(torch.stack([self.sums[k] for k in names]) / self.count).cpu()
        record: dict[str, Any] = {
            "type": "train",
            "step": progress.global_step,
            "epoch": progress.epoch + 1,
            "iter": progress.iter_in_epoch,
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        record.update({name: float(v) for name, v in zip(names, means)})
        record["time"] = self.time / self.count
        record["data_time"] = self.data_time / self.count
        if device.type == "cuda":
            record["memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        self.reset()
        return record


def _progress_bar(total: int, initial: int, desc: str, show: bool | None, info: dist_utils.DistInfo):
    from tqdm import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(
        total=total, initial=initial, desc=desc, disable=not (show and info.is_main), dynamic_ncols=True
    )


def _setup_logging(work_dir: Path, is_main: bool) -> list[logging.Handler]:
    """Rank 0 logs INFO to stdout and ``<work_dir>/train.log``; other ranks only warnings."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    handlers: list[logging.Handler] = []
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    handlers.append(stream)
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(work_dir / "train.log")
        file_handler.setFormatter(formatter)
        handlers.append(file_handler)
    for handler in handlers:
        log.addHandler(handler)
    return handlers
