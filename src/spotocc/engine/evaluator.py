"""Evaluation and prediction loops, single-process or distributed, and loading a model from a checkpoint.

What is scored follows the config (:mod:`spotocc.engine.scoring`): the SSC metrics, or for Occ3D
configs camera-mask mIoU, its unmasked variant and RayIoU.

Under torchrun every rank runs the model on one contiguous slice of the dataset (no padding, so each
sample is counted exactly once, whatever the dataset length), then the raw metric counts are summed
across ranks before the metrics are computed once. Predictions are written as one compressed
``<sample_id>.npz`` per sample, key ``"labels"``, uint8 ``[X, Y, Z]``, each file written atomically.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spotocc.config import Config
from spotocc.engine import distributed as dist_utils
from spotocc.engine.atomic import atomic_output
from spotocc.engine.sampling import ContiguousShards
from spotocc.engine.scoring import SSCScorer, build_scorer, evaluation_config, scored_ground_truth
from spotocc.evaluation import SSCMetrics

__all__ = [
    "EvalResult",
    "ModelFactory",
    "DatasetFactory",
    "autocast_context",
    "build_metrics",
    "default_dataset_factory",
    "default_model_factory",
    "evaluate",
    "evaluate_predictions",
    "load_model_from_checkpoint",
    "move_to_device",
    "prediction_path",
    "read_prediction",
    "scored_ground_truth",
    "write_prediction",
]

ModelFactory = Callable[[Config], nn.Module]
DatasetFactory = Callable[..., Dataset]  # (cfg, split, *, train=None) -> Dataset


def default_model_factory(cfg: Config) -> nn.Module:
    from spotocc.models import build_model  # imported lazily: the model package is heavy

    return build_model(cfg)


def default_dataset_factory(cfg: Config, split: str, *, train: bool | None = None) -> Dataset:
    """``build_dataset``; a set read without training transforms gets :func:`evaluation_config`."""
    from spotocc.data import build_dataset

    if not (split == cfg.data.train_split if train is None else train):
        cfg = evaluation_config(cfg)
    return build_dataset(cfg, split, train=train)


def _default_collate() -> Callable:
    from spotocc.data import collate

    return collate


@dataclass
class EvalResult:
    """Metrics (unprefixed, percent), raw counts, and which samples were scored (all ranks, in order)."""

    metrics: dict[str, float]
    counts: dict[str, np.ndarray]
    num_samples: int  # samples scored (with ground truth), summed over ranks
    sample_ids: list[str] = field(default_factory=list)  # every sample scored, rank order
    num_predicted: int = 0  # samples run through the model (or read from files)


def build_metrics(cfg: Config) -> SSCMetrics:
    from spotocc.data.classes import class_set

    names, _ = class_set(cfg.data.class_set)
    return SSCMetrics(names, class0_quirk=cfg.eval.class0_quirk)


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"none", "bf16", "fp16"} (disabled for "none")."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------------
# prediction files


def prediction_path(out_dir: str | os.PathLike, sample_id: str) -> Path:
    """``out_dir / f"{sample_id}.npz"``; a sample id may contain ``/`` (subfolders) but not ``..``."""
    parts = Path(sample_id).parts
    if not sample_id or Path(sample_id).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ValueError(f"sample id {sample_id!r} cannot be used as a prediction file name")
    return Path(out_dir) / f"{sample_id}.npz"


def write_prediction(out_dir: str | os.PathLike, sample_id: str, labels: np.ndarray | torch.Tensor) -> Path:
    """Write ``labels`` [X, Y, Z] as uint8 into ``<out_dir>/<sample_id>.npz`` (key "labels"), atomically."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if labels.ndim != 3:
        raise ValueError(f"prediction for {sample_id!r} must be [X, Y, Z], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"prediction for {sample_id!r} has labels outside 0..255")
    path = prediction_path(out_dir, sample_id)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, labels=labels.astype(np.uint8))
    return path


def read_prediction(out_dir: str | os.PathLike, sample_id: str) -> np.ndarray:
    """The uint8 labels of ``<out_dir>/<sample_id>.npz``, with a clear error if missing or malformed."""
    path = prediction_path(out_dir, sample_id)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} for sample {sample_id!r} does not exist")
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            labels = data["labels"] if "labels" in keys else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"prediction file {path} is unreadable: {err}") from err
    if labels is None:
        raise ValueError(f"prediction file {path} has no 'labels' array (keys: {keys})")
    return labels


# --------------------------------------------------------------------------------------------------
# loops


def _shard_loader(
    dataset: Dataset, batch_size: int, num_workers: int, collate_fn: Callable, pin_memory: bool = False
) -> DataLoader:
    sampler = ContiguousShards(
        len(dataset),  # type: ignore[arg-type]
        num_replicas=dist_utils.get_world_size(),
        rank=dist_utils.get_rank(),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )


def _progress(total: int, desc: str, show: bool | None):
    from tqdm import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not (show and dist_utils.is_main_process()), leave=False)


def _gather(metrics: SSCScorer, scored_ids: list[str], num_predicted: int) -> EvalResult:
    """Sum the counts over ranks and compute the metrics once (same result on every rank)."""
    flat = torch.cat([metrics.counts_tensor(), torch.tensor([len(scored_ids), num_predicted])])
    if dist_utils.is_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else torch.device("cpu")
        flat = dist_utils.all_reduce_sum(flat.to(device)).cpu()
    metrics.load_counts_tensor(flat[:-2])
    all_ids = [sid for ids in dist_utils.all_gather_objects(scored_ids) for sid in ids]
    return EvalResult(
        metrics=metrics.compute(),
        counts=metrics.export_counts(),
        num_samples=int(flat[-2]),
        sample_ids=all_ids,
        num_predicted=int(flat[-1]),
    )


def _uses_nccl() -> bool:
    import torch.distributed as dist

    return dist_utils.is_distributed() and dist.get_backend() == "nccl"


@torch.no_grad()  # not inference_mode: tensors a model caches while predicting stay usable in training
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: Config,
    *,
    device: torch.device,
    amp: str = "none",
    batch_size: int | None = None,
    num_workers: int | None = None,
    predictions_dir: str | os.PathLike | None = None,
    collate_fn: Callable | None = None,
    show_progress: bool | None = None,
    ray_iou: bool = True,
) -> EvalResult:
    """Run ``model.predict`` over ``dataset`` (this rank's slice), score samples that have ``gt_occ``.

    With ``predictions_dir`` every prediction is also written to ``<dir>/<sample_id>.npz``. The model
    is put in eval mode (the caller restores training mode). Collective under torchrun: every rank
    must call it. ``ray_iou=False`` leaves RayIoU out of an Occ3D evaluation (it is the slow part).
    """
    collate_fn = collate_fn or _default_collate()
    loader = _shard_loader(
        dataset,
        batch_size or cfg.eval.batch_size,
        cfg.data.num_workers if num_workers is None else num_workers,
        collate_fn,
        pin_memory=device.type == "cuda",
    )
    metrics = build_scorer(cfg, ray_iou=ray_iou)
    scored: list[str] = []
    num_predicted = 0
    model.eval()
    with _progress(len(loader), "eval", show_progress) as bar:
        for batch in loader:
            batch = move_to_device(batch, device)
            with autocast_context(device, amp):
                labels = model.predict(batch)
            expected = tuple(cfg.grid.occ_size)
            if labels.dim() != 4 or tuple(labels.shape[1:]) != expected:
                raise ValueError(
                    f"model.predict returned shape {tuple(labels.shape)}, expected [B, *{expected}]"
                )
            ids = [str(m["sample_id"]) for m in batch["meta"]]
            num_predicted += len(ids)
            if predictions_dir is not None:
                for sample_id, sample_labels in zip(ids, labels.cpu()):
                    write_prediction(predictions_dir, sample_id, sample_labels)
            if "gt_occ" in batch:
                metrics.update(labels, batch)
                scored.extend(ids)
            bar.update(1)
    return _gather(metrics, scored, num_predicted)


def evaluate_predictions(
    predictions_dir: str | os.PathLike,
    dataset: Dataset,
    cfg: Config,
    *,
    num_workers: int | None = None,
    collate_fn: Callable | None = None,
    show_progress: bool | None = None,
    ray_iou: bool = True,
) -> EvalResult:
    """Score saved ``<sample_id>.npz`` predictions (the model's ids) against the dataset's ground truth."""
    collate_fn = collate_fn or _default_collate()
    loader = _shard_loader(
        dataset, 1, cfg.data.num_workers if num_workers is None else num_workers, collate_fn
    )
    metrics = build_scorer(cfg, ray_iou=ray_iou)
    scored: list[str] = []
    num_read = 0
    with _progress(len(loader), "eval", show_progress) as bar:
        for batch in loader:
            for i, meta in enumerate(batch["meta"]):
                sample_id = str(meta["sample_id"])
                if "gt_occ" not in batch:
                    raise ValueError(f"sample {sample_id!r} has no ground truth (gt_occ): nothing to score")
                gt = batch["gt_occ"][i]
                pred = read_prediction(predictions_dir, sample_id)
                if tuple(pred.shape) != tuple(gt.shape):
                    raise ValueError(
                        f"prediction {prediction_path(predictions_dir, sample_id)} has shape {pred.shape}, "
                        f"ground truth has {tuple(gt.shape)}"
                    )
                metrics.update(pred, batch, i)
                scored.append(sample_id)
                num_read += 1
            bar.update(1)
    return _gather(metrics, scored, num_read)


# --------------------------------------------------------------------------------------------------
# checkpoint -> model


def load_model_from_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    config: str | None = None,
    device: torch.device | str = "cpu",
    model_factory: ModelFactory | None = None,
    allow_numpy_pickle: bool = True,
    allow_unsafe_pickle: bool = False,
) -> tuple[nn.Module, Config]:
    """Rebuild the model from the checkpoint's embedded config (plus ``overrides``) and load its weights.

    ``config`` (a preset name or a ``.json``) is needed only for weights files without an embedded
    config, e.g. a released ``.pth`` (read safely and mapped strictly by
    :mod:`spotocc.engine.released_checkpoint`; the two ``allow_*`` flags are its opt-ins). Returns the
    model in eval mode on ``device`` and the resolved config.
    """
    from spotocc.config import apply_overrides, get_config
    from spotocc.engine.checkpoint import CheckpointError, load_checkpoint
    from spotocc.engine.released_checkpoint import is_released_checkpoint_path

    if is_released_checkpoint_path(checkpoint):
        return _load_released(
            checkpoint,
            overrides=overrides,
            config=config,
            device=device,
            model_factory=model_factory,
            allow_numpy_pickle=allow_numpy_pickle,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
    loaded = load_checkpoint(checkpoint, with_training_state=False)
    if config is not None:
        cfg = get_config(config)
    elif loaded.config is not None:
        cfg = Config.from_dict(loaded.config)
    else:
        raise CheckpointError(
            f"{loaded.path} carries no config; pass the preset or config it was trained with (--config)"
        )
    apply_overrides(cfg, overrides)
    cfg.model.image_backbone.weights = None  # every weight comes from the checkpoint
    model = (model_factory or default_model_factory)(cfg)
    missing, unexpected = model.load_state_dict(loaded.model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{loaded.path} does not fit the {cfg.name!r} model: missing {len(missing)} keys "
            f"(e.g. {missing[:3]}), unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})"
        )
    model.to(device).eval()
    return model, cfg


def _load_released(
    checkpoint: str | os.PathLike,
    *,
    overrides: Sequence[str],
    config: str | None,
    device: torch.device | str,
    model_factory: ModelFactory | None,
    allow_numpy_pickle: bool,
    allow_unsafe_pickle: bool,
) -> tuple[nn.Module, Config]:
    """A released mmcv-era ``.pth`` with ``--config PRESET`` -> model and config."""
    from spotocc.config import get_config
    from spotocc.engine.checkpoint import CheckpointError
    from spotocc.engine.released_checkpoint import load_released_checkpoint, preset_hint

    if config is None:
        guess = preset_hint(
            checkpoint, allow_numpy=allow_numpy_pickle, allow_unsafe_pickle=allow_unsafe_pickle
        )
        raise CheckpointError(
            f"{checkpoint} is a released .pth without a spotocc config; pass the preset it belongs to "
            f"with --config" + (f" (it looks like {guess})" if guess else "")
        )
    cfg = get_config(config, overrides)
    cfg.model.image_backbone.weights = None  # every weight comes from the checkpoint
    model = (model_factory or default_model_factory)(cfg)
    load_released_checkpoint(
        model,
        checkpoint,
        config_name=cfg.name,
        allow_numpy=allow_numpy_pickle,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )
    model.to(device).eval()
    return model, cfg
