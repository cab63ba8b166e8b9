"""Synthesise scenes, train ``synthetic_tiny``, evaluate, compare with a baseline (``spotocc quickstart``).

1. ``spotocc.data.synthetic.generate`` writes training and held-out scenes in the SemanticKITTI
   layout under ``<work_dir>/data``.
2. ``synthetic_tiny`` trains on the training scenes (CPU is fine; minutes).
3. The trained model is evaluated on the held-out scenes and its per-class table is printed next to
   an image-blind baseline: every voxel gets its most frequent label over the training scenes. A model
   that uses the cameras beats it. The predictions go to ``<work_dir>/predictions``, the numbers to
   ``<work_dir>/quickstart.json`` and a picture of the first held-out scene (camera, ground truth,
   prediction) to ``<work_dir>/quickstart.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spotocc.config import Config
from spotocc.engine.atomic import write_text_atomic
from spotocc.engine.evaluator import DatasetFactory, ModelFactory, default_dataset_factory
from spotocc.evaluation import SSCMetrics

__all__ = [
    "draw_first_prediction",
    "most_frequent_label_baseline",
    "run_quickstart",
    "score_fixed_prediction",
]


def run_quickstart(
    cfg: Config,
    *,
    work_dir: Path,
    num_train: int,
    num_val: int,
    device: str = "auto",
    generate_fn: Callable[..., Any] | None = None,
    model_factory: ModelFactory | None = None,
    dataset_factory: DatasetFactory | None = None,
    collate_fn: Callable | None = None,
    show_progress: bool | None = None,
    picture: bool = True,
) -> dict[str, dict[str, float]]:
    """Run the three stages; returns ``{"model": metrics, "baseline": metrics}`` (unprefixed, percent).

    ``picture``: draw ``quickstart.png`` of the first held-out scene.
    """
    from spotocc.data.classes import class_set
    from spotocc.engine.evaluator import evaluate, load_model_from_checkpoint
    from spotocc.engine.trainer import train
    from spotocc.evaluation import format_ssc_table

    dataset_factory = dataset_factory or default_dataset_factory
    data_dir = work_dir / "data"
    if generate_fn is None:
        from spotocc.data.synthetic import generate as generate_fn
    from spotocc.data.synthetic import source_image_size

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    print(f"[1/3] generating {num_train} training and {num_val} held-out scenes in {data_dir}")
    generate_fn(
        data_dir,
        format="semantickitti",
        num_train=num_train,
        num_val=num_val,
        seed=cfg.train.seed,
        grid=cfg.grid,
        image_size=source_image_size(cfg.data),  # the network input size: the reader resizes by 1
    )
    cfg.data.root = str(data_dir)
    seconds["generate"] = time.perf_counter() - start

    print(f"[2/3] training {cfg.name} for {cfg.train.epochs} epochs (logs: {work_dir / 'train'})")
    train(
        cfg,
        work_dir=work_dir / "train",
        device=device,
        model_factory=model_factory,
        dataset_factory=dataset_factory,
        collate_fn=collate_fn,
        show_progress=show_progress,
    )
    seconds["train"] = time.perf_counter() - start - seconds["generate"]

    print("[3/3] evaluating on the held-out scenes")
    eval_device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model, cfg = load_model_from_checkpoint(
        work_dir / "train" / "checkpoints" / "last", device=eval_device, model_factory=model_factory
    )
    val_set = dataset_factory(cfg, cfg.data.val_split, train=False)
    predictions = work_dir / "predictions"
    model_metrics = evaluate(
        model,
        val_set,
        cfg,
        device=eval_device,
        predictions_dir=predictions,
        collate_fn=collate_fn,
        show_progress=show_progress,
    ).metrics
    names = class_set(cfg.data.class_set)[0]
    train_set = dataset_factory(cfg, cfg.data.train_split, train=False)  # no augmentation: the GT as stored
    fixed = most_frequent_label_baseline(train_set, len(names), collate_fn=collate_fn)
    baseline_metrics = score_fixed_prediction(fixed, val_set, cfg, collate_fn=collate_fn)
    columns = {cfg.name: model_metrics, "image-blind baseline": baseline_metrics}
    print(format_ssc_table(columns, names))
    for key, label in (("SSC_mIoU", "SSC mIoU"), ("SC_IoU", "SC IoU")):
        ours, blind = model_metrics[key], baseline_metrics[key]
        print(f"{label + ':':9s} model {ours:.2f} vs image-blind baseline {blind:.2f} ({ours - blind:+.2f})")
    if picture:
        path = draw_first_prediction(work_dir / "quickstart.png", val_set, predictions, cfg)
        print(f"picture: {path}")
    seconds["evaluate"] = time.perf_counter() - start - seconds["generate"] - seconds["train"]
    seconds["total"] = time.perf_counter() - start
    print(
        f"wall time: {seconds['total'] / 60:.1f} min (generate {seconds['generate']:.0f} s, "
        f"train {seconds['train']:.0f} s, evaluate {seconds['evaluate']:.0f} s)"
    )
    results = {"model": model_metrics, "baseline": baseline_metrics}
    write_text_atomic(work_dir / "quickstart.json", json.dumps({**results, "seconds": seconds}, indent=2))
    return results


def draw_first_prediction(path: Path, dataset: Dataset, predictions: Path, cfg: Config) -> Path:
    """Camera image(s), ground truth and prediction of ``dataset[0]`` as one PNG at ``path``."""
    from spotocc.engine.evaluator import read_prediction
    from spotocc.visualization.panel import save_prediction_panel

    sample = dataset[0]
    sample_id = str(sample["meta"]["sample_id"])
    return save_prediction_panel(
        path,
        sample,
        None,
        read_prediction(predictions, sample_id),
        cfg.data.class_set,
        cfg.grid.point_cloud_range,
        f"{cfg.name} after the quickstart, held-out scene",
        sample_id=sample_id,
        bgr_input=cfg.data.bgr_input,
    )


def _batches(dataset: Dataset, collate_fn: Callable | None):
    if collate_fn is None:
        from spotocc.data import collate as collate_fn
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, collate_fn=collate_fn)
    for batch in loader:
        if "gt_occ" not in batch:
            raise ValueError("the baseline needs ground truth (gt_occ) in every sample")
        yield batch


def _gt_batches(dataset: Dataset, collate_fn: Callable | None):
    for batch in _batches(dataset, collate_fn):
        yield batch["gt_occ"]  # [B, X, Y, Z] uint8


def most_frequent_label_baseline(
    dataset: Dataset, num_classes: int, *, ignore_index: int = 255, collate_fn: Callable | None = None
) -> np.ndarray:
    """Per voxel, the label seen most often over ``dataset`` (ties: the smaller id; never seen: 0)."""
    counts: torch.Tensor | None = None
    for gt in _gt_batches(dataset, collate_fn):
        labels = gt.reshape(gt.shape[0], -1).long()  # [B, V]
        num_voxels = labels.shape[1]
        if counts is None:
            counts = torch.zeros(num_voxels * num_classes, dtype=torch.int64)
            shape = tuple(gt.shape[1:])
        voxel = torch.arange(num_voxels).expand_as(labels)
        valid = labels != ignore_index
        # one histogram over (voxel, label) pairs: index voxel * C + label
        counts += torch.bincount((voxel * num_classes + labels)[valid], minlength=num_voxels * num_classes)
    if counts is None:
        raise ValueError("the baseline needs at least one training sample")
    per_voxel = counts.reshape(-1, num_classes)  # [V, C]
    return per_voxel.argmax(dim=1).reshape(shape).numpy().astype(np.uint8)  # argmax: first maximum wins


def score_fixed_prediction(
    prediction: np.ndarray,
    dataset: Dataset,
    cfg: Config,
    *,
    collate_fn: Callable | None = None,
    ray_iou: bool = True,
) -> dict[str, float]:
    """Metrics of predicting the same ``prediction`` [X, Y, Z] for every sample of ``dataset``.

    SSC metrics; for Occ3D configs (:func:`~spotocc.engine.scoring.uses_occ3d`) the Occ3D metrics that
    ``spotocc eval`` prints (camera-mask mIoU / IoU, unmasked, and RayIoU unless ``ray_iou`` is False),
    so read ``dataset`` as evaluation sets are read (``default_dataset_factory(..., train=False)``).
    """
    from spotocc.data.classes import class_set
    from spotocc.engine.scoring import build_scorer, uses_occ3d

    pred = torch.from_numpy(prediction.astype(np.int64))
    if uses_occ3d(cfg):
        scorer = build_scorer(cfg, ray_iou=ray_iou)
        for batch in _batches(dataset, collate_fn):
            scorer.update(pred.expand_as(batch["gt_occ"]), batch)
        return scorer.compute()
    metrics = SSCMetrics(class_set(cfg.data.class_set)[0], class0_quirk=cfg.eval.class0_quirk)
    for gt in _gt_batches(dataset, collate_fn):
        metrics.update(pred.expand_as(gt), gt)
    return metrics.compute()
