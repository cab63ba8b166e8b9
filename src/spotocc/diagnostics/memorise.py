"""Oracle ablations: can a stage of the pipeline memorise a few training scenes?

Each variant trains on the same few scenes it is then scored on (no augmentation), so a class that
stays low is one the trained part cannot fit even when generalisation is not asked for:

- ``pipeline``: the whole model, its own losses (``forward_train``, summed as the trainer does);
  ``train.depth_teacher_forcing`` applies over the run's steps, as in the trainer.
- ``gt-depth``: the same, but the depth distribution that the LSS lift pools is the one-hot LiDAR
  depth bin wherever a feature cell has a LiDAR point (cells without one keep the predicted
  distribution), in training and in scoring (:class:`GroundTruthDepth`); no depth loss, since it
  would only see replaced cells. Pipeline low, gt-depth high: the predicted depth is the bottleneck.
- ``gt-features``: the head alone, on voxel features that are a fixed function of the ground truth
  (:class:`GroundTruthFeatures`). Low here: the head, its matching or its losses are wrong.
- ``voxel-ce``: the image -> voxel stages with the mask-classification head replaced by a per-voxel
  linear classifier on the mask features (:class:`VoxelClassifier`). High here but low in
  ``pipeline``: the head is what fails on real features.

Scoring uses :class:`spotocc.evaluation.SSCMetrics` on the memorised scenes, one scene at a time.
About 510 lines in one module: the four variants share one training loop and one scoring, and each
adds only a small module around the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spotocc.config import AugmentationConfig, Config, GridConfig
from spotocc.data.batch import collate
from spotocc.data.classes import IGNORE_INDEX, class_set
from spotocc.engine.evaluator import move_to_device
from spotocc.engine.optim import build_optimizer, clip_gradients
from spotocc.engine.trainer import check_depth_teacher_forcing, depth_teacher_weight, total_loss
from spotocc.evaluation import SSCMetrics, format_ssc_table
from spotocc.evaluation.ssc import round_percent
from spotocc.models import build_model
from spotocc.models.occupancy import CAMERA_KEYS, OccupancyModel
from spotocc.models.view_transform import ViewTransformer

__all__ = [
    "VARIANTS",
    "GroundTruthDepth",
    "GroundTruthFeatures",
    "MemoriseResult",
    "VoxelClassifier",
    "format_memorise",
    "head_input_sizes",
    "memorise",
    "without_augmentation",
]

VARIANTS = ("pipeline", "gt-depth", "gt-features", "voxel-ce")
LOG_EVERY = 20  # steps between loss lines
MIN_VOXELS = 500  # classes with at least this many GT voxels are checked against TARGET_IOU
TARGET_IOU = 50.0


def without_augmentation(cfg: Config) -> Config:
    """A copy of ``cfg`` whose training transform is fixed: no random resize, crop, rotation or flips."""
    out = copy.deepcopy(cfg)
    out.data.augmentation = AugmentationConfig(
        resize_lim=(0.0, 0.0), rot_lim=(0.0, 0.0), flip=False, bda=False
    )
    return out


# --------------------------------------------------------------------------------------------------
# Oracles


class GroundTruthDepth:
    """A forward hook on ``view_transformer.depth_net`` that swaps in one-hot LiDAR depth logits.

    :meth:`set` takes a batch (its ``gt_depth`` [B, N, H, W]); the next depth-net outputs then carry logits
    +-``logit`` around the true bin (``depth_target_bins(..., fix_bin_offset=True)``, the bin whose frustum
    depth is nearest) at every feature cell with a LiDAR point (or, under
    ``view_transformer.depth_from_occupancy``, with a labelled voxel along its ray), so the softmax
    there is one-hot to within ``D * exp(-2 * logit)``. Other cells and the context channels are the
    network's own. Use as a context manager (or call :meth:`remove`) to take the hook off.
    """

    def __init__(self, view_transformer: ViewTransformer, *, logit: float = 20.0) -> None:
        self.view_transformer = view_transformer
        self.logit = float(logit)
        self.bins: torch.Tensor | None = None  # [B*N*fH*fW] int64
        self.valid: torch.Tensor | None = None  # [B*N*fH*fW] bool
        self._handle = view_transformer.depth_net.register_forward_hook(self._replace)

    def set(self, batch: dict[str, Any]) -> None:
        """The batch the next forward sees: its LiDAR depth ``gt_depth`` [B, N, H, W] (0 = no point) and,
        under ``view_transformer.depth_from_occupancy``, its ``gt_occ`` and camera tensors."""
        vt = self.view_transformer
        points = vt.geometry(*(batch[key] for key in CAMERA_KEYS)) if vt.depth_from_occupancy else None
        self.bins, self.valid = vt.depth_target_bins(
            batch["gt_depth"], gt_occ=batch.get("gt_occ"), points=points, fix_bin_offset=True
        )

    def _replace(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.bins is None or self.valid is None:
            raise RuntimeError("GroundTruthDepth: set(gt_depth) must be called before the forward")
        bn, _, fh, fw = output.shape  # [B*N, D + Ct, fH, fW]
        d = self.view_transformer.num_bins
        if self.bins.numel() != bn * fh * fw:
            raise RuntimeError(
                f"GroundTruthDepth: depth targets for {self.bins.numel()} cells, depth net output has "
                f"{bn} x {fh} x {fw}"
            )
        onehot = F.one_hot(self.bins, d).to(output.dtype)  # [B*N*fH*fW, D]
        onehot = onehot.view(bn, fh, fw, d).permute(0, 3, 1, 2)  # [B*N, D, fH, fW]
        valid = self.valid.view(bn, 1, fh, fw)
        logits = torch.where(valid, (2.0 * onehot - 1.0) * self.logit, output[:, :d])  # [B*N, D, fH, fW]
        return torch.cat([logits, output[:, d:]], dim=1)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> GroundTruthDepth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def head_input_sizes(grid: GridConfig, num_volumes: int = 4) -> list[tuple[int, int, int]]:
    """Spatial sizes of the head's inputs: the LSS grid, then ``(n - 1) // 2 + 1`` per axis per level
    (the strided levels of :class:`~spotocc.models.sparse.encoder.SparseLatentDiffuser`)."""
    sizes = [tuple(int(s) for s in grid.lss_size)]
    while len(sizes) < num_volumes:
        sizes.append(tuple((s - 1) // 2 + 1 for s in sizes[-1]))
    return sizes  # type: ignore[return-value]


class GroundTruthFeatures(nn.Module):
    """Voxel features that are a fixed function of the GT: labels [B, X, Y, Z] -> the head's inputs.

    Level 0: per LSS cell (``lss_downsample``^3 GT voxels), the share of each class (ignore counted as
    class 0), i.e. the one-hot labels average-pooled to the LSS grid; each coarser level average-pools
    the previous one by 2 (ceil mode: the sizes of :func:`head_input_sizes`). Every level is mapped to
    the head's channels by one fixed random matrix [num_classes, channels] (N(0, 1) entries, seeded).
    No parameters.
    """

    def __init__(
        self, num_classes: int, channels: int, *, lss_downsample: int, num_volumes: int = 4, seed: int = 0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lss_downsample = lss_downsample
        self.num_volumes = num_volumes
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(num_classes, channels, generator=generator))

    def class_shares(self, gt_occ: torch.Tensor) -> torch.Tensor:
        """Labels [B, X, Y, Z] -> class shares per LSS cell [B, C, X/s, Y/s, Z/s] (s = lss_downsample, floor).

        Counted per cell with ``scatter_add_`` rather than pooling a one-hot volume, which would be
        num_classes times the size of the labels (gigabytes at nuScenes size).
        """
        b, s, c = gt_occ.shape[0], self.lss_downsample, self.num_classes
        size = [n // s for n in gt_occ.shape[1:]]
        labels = gt_occ[:, : size[0] * s, : size[1] * s, : size[2] * s].long()
        labels = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
        blocks = labels.reshape(b, size[0], s, size[1], s, size[2], s).permute(0, 1, 3, 5, 2, 4, 6)
        blocks = blocks.reshape(b, -1, s**3)  # [B, K, s^3]: the labels of each LSS cell
        counts = torch.zeros(b, blocks.shape[1], c, device=gt_occ.device)  # [B, K, C]
        counts.scatter_add_(2, blocks, torch.ones(blocks.shape, device=gt_occ.device))
        return (counts / s**3).transpose(1, 2).reshape(b, c, *size)  # [B, C, X', Y', Z']

    def forward(self, gt_occ: torch.Tensor) -> list[torch.Tensor]:
        level = self.class_shares(gt_occ)  # [B, C, X', Y', Z']
        volumes = []
        for index in range(self.num_volumes):
            if index:
                level = F.avg_pool3d(level, 2, ceil_mode=True)  # [B, C, ceil(X'/2), ...]
            features = torch.einsum("bcxyz,cd->bdxyz", level, self.projection)  # [B, D, X', Y', Z']
            volumes.append(features.contiguous())
        return volumes


class VoxelClassifier(nn.Module):
    """A model's image -> voxel stages with a per-voxel classifier instead of its head.

    A 1x1x1 Conv3d on the mask features (``voxel_feats[0]``, LSS grid), trilinearly upsampled to the
    occupancy grid. Losses: cross-entropy (ignore 255) plus the model's depth loss when the batch has
    ``gt_depth``. The model's head takes no part (it gets no gradient).
    """

    def __init__(self, model: OccupancyModel, num_classes: int, channels: int) -> None:
        super().__init__()
        self.model = model
        self.classifier = nn.Conv3d(channels, num_classes, kernel_size=1)

    def logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, C, X, Y, Z] at ``model.occ_size``, depth probabilities [B*N, D, fH, fW])."""
        voxel_feats, depth_prob = self.model.extract_features(batch)
        coarse = self.classifier(voxel_feats[0])  # [B, C, X', Y', Z']
        logits = F.interpolate(coarse, size=self.model.occ_size, mode="trilinear", align_corners=False)
        return logits, depth_prob

    def forward_train(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, depth_prob = self.logits(batch)
        losses = {"loss_ce": F.cross_entropy(logits, batch["gt_occ"].long(), ignore_index=IGNORE_INDEX)}
        if "gt_depth" in batch:
            losses["loss_depth"] = self.model.depth_loss(batch, depth_prob)
        return losses

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits(batch)[0].argmax(dim=1)  # [B, X, Y, Z]


# --------------------------------------------------------------------------------------------------
# What a variant trains and how it predicts


@dataclass
class _Trainee:
    module: nn.Module  # its parameters with requires_grad are optimised; train() / eval() switch it
    losses: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    predict: Callable[[dict[str, Any]], torch.Tensor]
    close: Callable[[], None] = lambda: None


def _trainee(variant: str, cfg: Config, model: OccupancyModel, seed: int) -> _Trainee:
    if variant == "pipeline":
        return _Trainee(model, model.forward_train, model.predict)
    if variant == "gt-depth":
        oracle = GroundTruthDepth(model.view_transformer)

        def gt_depth_losses(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            oracle.set(batch)
            losses = model.forward_train(batch)
            # Every cell the depth loss supervises has its logits replaced: the loss is a constant without
            # gradient (and large under the released one-bin target offset), so it is left out.
            losses.pop("loss_depth", None)
            return losses

        def gt_depth_predict(batch: dict[str, Any]) -> torch.Tensor:
            oracle.set(batch)
            return model.predict(batch)

        return _Trainee(model, gt_depth_losses, gt_depth_predict, oracle.remove)
    if variant == "gt-features":
        head_cfg = cfg.model.head
        features = GroundTruthFeatures(
            head_cfg.num_classes,
            head_cfg.embed_dims,
            lss_downsample=cfg.grid.lss_downsample,
            num_volumes=head_cfg.num_levels + 1,
            seed=seed,
        ).to(next(model.head.parameters()).device)
        head = model.head

        def head_losses(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return head.forward_train(features(batch["gt_occ"]), batch["gt_occ"])

        @torch.no_grad()
        def head_predict(batch: dict[str, Any]) -> torch.Tensor:
            return head.predict(features(batch["gt_occ"]), model.occ_size)

        return _Trainee(head, head_losses, head_predict)
    if variant == "voxel-ce":
        device = next(model.parameters()).device
        voxel_ce = VoxelClassifier(model, cfg.model.head.num_classes, cfg.model.voxel_neck.out_channels)
        voxel_ce.to(device)
        head_params = [p for p in model.head.parameters() if p.requires_grad]
        for p in head_params:  # the head takes no part: out of the optimiser, back on at the end
            p.requires_grad_(False)

        def unfreeze() -> None:
            for p in head_params:
                p.requires_grad_(True)

        return _Trainee(voxel_ce, voxel_ce.forward_train, voxel_ce.predict, unfreeze)
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class MemoriseResult:
    """Scores of one memorisation run on the scenes it trained on (IoU values in percent)."""

    variant: str
    steps: int
    batch_size: int
    num_samples: int
    lr: float
    seed: int
    class_names: tuple[str, ...]
    metrics: dict[str, float]  # SSCMetrics.compute(): SC_*, SSC_mIoU (all classes), SSC_<name>_IoU
    gt_voxels: list[int]  # labelled GT voxels per class over the scenes
    present_miou: float  # mean IoU over the non-empty classes present in the scenes
    loss_history: list[float] = field(default_factory=list)  # total loss of every step
    last_losses: dict[str, float] = field(default_factory=dict)  # named losses of the last step
    train_seconds: float = 0.0
    seconds: float = 0.0  # reading, training and scoring

    def class_iou(self, c: int) -> float:
        return self.metrics[f"SSC_{self.class_names[c]}_IoU"]

    def present_classes(self, min_voxels: int = 1) -> list[int]:
        """Class ids with at least ``min_voxels`` labelled GT voxels in the scenes."""
        return [c for c, n in enumerate(self.gt_voxels) if n >= max(min_voxels, 1)]

    def checked_classes(self) -> list[tuple[int, float, bool]]:
        """(class, IoU, IoU >= TARGET_IOU) for the non-empty classes with >= MIN_VOXELS GT voxels."""
        return [
            (c, self.class_iou(c), self.class_iou(c) >= TARGET_IOU)
            for c in self.present_classes(MIN_VOXELS)
            if c != 0
        ]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        out["classes"] = [
            {"id": c, "name": self.class_names[c], "gt_voxels": self.gt_voxels[c], "iou": self.class_iou(c)}
            for c in self.present_classes()
        ]
        out["checked"] = {
            "min_voxels": MIN_VOXELS,
            "target_iou": TARGET_IOU,
            "classes": [
                {"name": self.class_names[c], "iou": iou, "reached": ok}
                for c, iou, ok in self.checked_classes()
            ],
        }
        return out


def memorise(
    cfg: Config,
    dataset: Sequence[dict[str, Any]],
    variant: str,
    steps: int,
    batch_size: int = 2,
    lr: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    *,
    model: OccupancyModel | None = None,
    device: str | torch.device = "cpu",
) -> MemoriseResult:
    """Train ``variant`` (see the module docstring) on every scene of ``dataset``, then score it on them.

    ``dataset``: the scenes, each item a sample dict with ``gt_occ`` (and ``gt_depth`` for ``gt-depth``),
    read once; make it without augmentation (:func:`without_augmentation`, ``train=True`` for depth).
    Every step draws ``batch_size`` scenes uniformly with replacement (a generator seeded by ``seed``);
    AdamW at ``lr`` (default ``cfg.train.lr``) with the trainer's parameter groups, weight decay and
    gradient clipping (``cfg.train``); the loss is logged every ``LOG_EVERY`` steps through ``log``.
    ``model``: trained in place (default: ``build_model(cfg, load_pretrained=False)`` after
    ``torch.manual_seed(seed)``). The global RNG state is restored on return.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("memorise: no scenes to memorise")
    emit = log or (lambda _: None)
    device = torch.device(device)
    lr = cfg.train.lr if lr is None else float(lr)
    t0 = time.perf_counter()
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        scenes = [_checked_scene(dataset[i], i, variant) for i in range(len(dataset))]
        if model is None:
            model = build_model(cfg, load_pretrained=False)
        model.to(device)
        trainee = _trainee(variant, cfg, model, seed)
        try:
            history, last, train_seconds = _train(
                trainee, cfg, scenes, steps, batch_size, lr, seed, device, emit
            )
            metrics = _score(trainee, cfg, scenes, device)
        finally:
            trainee.close()
    names = metrics.class_names
    tp, fp, fn = metrics.per_class_counts()
    gt_voxels = metrics.confusion.sum(axis=1).tolist()
    present = [c for c in range(1, len(names)) if gt_voxels[c] > 0]
    present_miou = (
        round_percent(float(np.mean(tp[present] / (tp[present] + fp[present] + fn[present] + 1e-5))))
        if present
        else 0.0
    )
    return MemoriseResult(
        variant=variant,
        steps=steps,
        batch_size=batch_size,
        num_samples=len(scenes),
        lr=lr,
        seed=seed,
        class_names=tuple(names),
        metrics=metrics.compute(),
        gt_voxels=[int(n) for n in gt_voxels],
        present_miou=present_miou,
        loss_history=history,
        last_losses=last,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - t0,
    )


def _checked_scene(sample: dict[str, Any], index: int, variant: str) -> dict[str, Any]:
    sample_id = sample.get("meta", {}).get("sample_id", index)
    if "gt_occ" not in sample:
        raise ValueError(f"sample {sample_id} has no ground truth (gt_occ); memorising needs labels")
    if variant == "gt-depth" and "gt_depth" not in sample:
        raise ValueError(f"sample {sample_id} has no LiDAR depth (gt_depth); read the scenes with train=True")
    return sample


def _train(
    trainee: _Trainee,
    cfg: Config,
    scenes: list[dict[str, Any]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[list[float], dict[str, float], float]:
    """``steps`` optimiser steps; returns (total loss per step, last step's named losses, seconds)."""
    train_cfg = dataclasses.replace(cfg.train, lr=lr)
    check_depth_teacher_forcing(train_cfg)
    optimizer = build_optimizer(trainee.module, train_cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    losses: dict[str, torch.Tensor] = {}
    trainee.module.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        picks = torch.randint(0, len(scenes), (batch_size,), generator=generator).tolist()
        batch = move_to_device(collate([scenes[i] for i in picks]), device)
        if isinstance(trainee.module, OccupancyModel):  # train.depth_teacher_forcing, as the trainer does
            trainee.module.depth_teacher_weight = depth_teacher_weight(train_cfg, step - 1, steps)
        losses = trainee.losses(batch)
        loss = total_loss(losses)
        value = float(loss.detach())
        if not math.isfinite(value):
            named = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in losses.items())
            raise FloatingPointError(f"memorise: the loss is not finite at step {step} ({named})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, train_cfg.grad_clip)
        optimizer.step()
        history.append(value)
        if step == 1 or step % LOG_EVERY == 0 or step == steps:
            parts = [
                f"{k} {float(v.detach()):.3f}" for k, v in losses.items() if "loss" in k and "." not in k
            ]
            elapsed = time.perf_counter() - t0
            log(f"step {step}/{steps}  loss {value:.3f}  ({', '.join(parts)})  {elapsed:.0f}s")
    last = {k: float(v.detach()) for k, v in losses.items()}
    return history, last, time.perf_counter() - t0


def _score(trainee: _Trainee, cfg: Config, scenes: list[dict[str, Any]], device: torch.device) -> SSCMetrics:
    """Eval-mode predictions of every scene, one at a time, against its GT."""
    metrics = SSCMetrics(class_set(cfg.data.class_set)[0], class0_quirk=cfg.eval.class0_quirk)
    trainee.module.eval()
    with torch.no_grad():
        for scene in scenes:
            batch = move_to_device(collate([scene]), device)
            metrics.update(trainee.predict(batch), batch["gt_occ"])  # [1, X, Y, Z] each
    return metrics


# --------------------------------------------------------------------------------------------------
# Text


def format_memorise(result: MemoriseResult) -> str:
    """The per-class IoU table of the classes present, SC IoU, mIoU and the >= MIN_VOXELS check."""
    names = result.class_names
    present = result.present_classes()
    table = format_ssc_table({"IoU (%)": result.metrics}, [names[c] for c in present])
    nonempty = [c for c in present if c != 0]
    lines = [
        table,
        f"SC IoU {result.metrics['SC_IoU']:.2f}, mIoU {result.present_miou:.2f} over the {len(nonempty)} "
        f"non-empty classes present (SSC mIoU over all {len(names) - 1}: {result.metrics['SSC_mIoU']:.2f})",
    ]
    checked = result.checked_classes()
    if checked:
        reached = sum(ok for _, _, ok in checked)
        cells = ", ".join(f"{names[c]} {iou:.1f} {'yes' if ok else 'NO'}" for c, iou, ok in checked)
        lines.append(
            f"classes with >= {MIN_VOXELS} GT voxels reaching {TARGET_IOU:g} IoU: "
            f"{reached} of {len(checked)}: {cells}"
        )
    else:
        lines.append(f"no non-empty class has >= {MIN_VOXELS} GT voxels in these scenes")
    return "\n".join(lines)
