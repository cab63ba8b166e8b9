"""Set criterion of the mask-classification heads (spec 03, sections 3.3 and 4).

Every prediction stage is matched to the GT classes independently (Hungarian matching on class-frequency
weighted GT points) and supervised with a class-weighted cross-entropy and with sigmoid BCE and naive dice
losses on uncertainty-sampled points. Denoising (DN) slots are assigned to their GT directly. The loss
reductions and average factors are those of the release (mmdet 2.14 ``CrossEntropyLoss``, the project's
``DiceLoss``); all of it runs in fp32, also under autocast. About 490 lines in one module: the
criterion and its loss terms are used only together, by both heads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spotocc.config import HeadConfig
from spotocc.data.classes import cross_entropy_class_weights, point_sampling_weights
from spotocc.engine.distributed import reduce_mean
from spotocc.models.heads.matching import (
    VoxelGroups,
    classification_cost,
    hungarian_match,
    importance_sample_points,
    mask_bce_cost,
    mask_dice_cost,
    point_sample_3d,
    sample_without_replacement,
    voxel_coords,
)

# Match cost weights of the released assigner (class, mask BCE, dice) and the dice eps of cost and loss.
MATCH_CLS_WEIGHT = 2.0
MATCH_MASK_WEIGHT = 5.0
MATCH_DICE_WEIGHT = 5.0
DICE_EPS = 1.0


def weighted_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    class_weight: Tensor,
    avg_factor: Tensor | float,
    label_weights: Tensor | None = None,
) -> Tensor:
    """mmdet 2.14 ``CrossEntropyLoss`` (softmax) with ``class_weight`` and ``avg_factor``, loss weight 1.

    ``sum_n label_weights[n] * class_weight[y_n] * -log softmax(logits[n])[y_n] / avg_factor``.

    Args:
        logits: ``[N, K]``; labels: int64 ``[N]``; class_weight: ``[K]``; label_weights: ``[N]`` or None.
    """
    loss = F.cross_entropy(logits.float(), labels, weight=class_weight.float(), reduction="none")  # [N]
    if label_weights is not None:
        loss = loss * label_weights.float()
    return loss.sum() / avg_factor


def weighted_bce_loss(
    point_logits: Tensor, point_targets: Tensor, row_weights: Tensor, avg_factor: Tensor | float
) -> Tensor:
    """Sigmoid BCE summed over points and rows, row r weighted by ``row_weights[r]``, over ``avg_factor``.

    Args:
        point_logits, point_targets: ``[R, P]``; row_weights: ``[R]``.
    """
    loss = F.binary_cross_entropy_with_logits(point_logits.float(), point_targets.float(), reduction="none")
    return (loss * row_weights.float()[:, None]).sum() / avg_factor


def naive_dice_loss(
    point_logits: Tensor,
    point_targets: Tensor,
    row_weights: Tensor,
    avg_factor: Tensor | float,
    eps: float = DICE_EPS,
) -> Tensor:
    """``sum_r w_r (1 - (2 sum_p s t + eps) / (sum_p s + sum_p t + eps)) / avg_factor``, ``s = sigmoid(x)``.

    Args:
        point_logits, point_targets: ``[R, P]``; row_weights: ``[R]``.
    """
    probs = point_logits.float().sigmoid()
    targets = point_targets.float()
    dice = (2.0 * (probs * targets).sum(1) + eps) / (probs.sum(1) + targets.sum(1) + eps)  # [R]
    return ((1.0 - dice) * row_weights.float()).sum() / avg_factor


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast: nothing to disable
        return contextlib.nullcontext()


class MaskSetCriterion(nn.Module):
    """Losses of a mask-classification head for all prediction stages, plus its denoising slots.

    Args:
        num_classes: C, classes including the empty class 0 (the no-object logit is index C).
        class_frequencies: C voxel counts; give the CE/mask class weights ``(1/ln f_c)/(1/ln f_0)``
            (``no_object_weight`` appended) and the point-sampling weights ``(f_max/f_c)**gamma``.
        num_points: P points per row for matching and for the mask losses.
        oversample_ratio, importance_sample_ratio: uncertainty sampling of the mask-loss points.
        sample_weight_gamma: exponent of the point-sampling weights.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        class_frequencies: Sequence[float],
        loss_cls_weight: float = 2.0,
        loss_mask_weight: float = 5.0,
        loss_dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 50176,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        sample_weight_gamma: float = 0.25,
    ) -> None:
        super().__init__()
        if len(class_frequencies) != num_classes:
            raise ValueError(
                f"MaskSetCriterion: class_frequencies has {len(class_frequencies)} entries, "
                f"num_classes is {num_classes}"
            )
        if any(not f > 1.0 for f in class_frequencies):
            raise ValueError(
                "MaskSetCriterion: class_frequencies must be voxel counts > 1 (weights use 1/ln f)"
            )
        if num_points < 1 or oversample_ratio < 1.0 or not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(
                "MaskSetCriterion: need num_points >= 1, oversample_ratio >= 1 and importance_sample_ratio "
                f"in [0, 1], got {num_points}, {oversample_ratio}, {importance_sample_ratio}"
            )
        self.num_classes = num_classes
        self.loss_cls_weight = loss_cls_weight
        self.loss_mask_weight = loss_mask_weight
        self.loss_dice_weight = loss_dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weight = cross_entropy_class_weights(class_frequencies, no_object_weight)
        self.register_buffer(
            "class_weight", torch.tensor(class_weight, dtype=torch.float32), persistent=False
        )
        # Sampling weights only steer host-side draws: a plain fp64 tensor, untouched by module.to(dtype).
        self.sampling_weight = torch.tensor(
            point_sampling_weights(class_frequencies, sample_weight_gamma), dtype=torch.float64
        )
        self._uniform_weight = torch.ones(num_classes, dtype=torch.float64)

    @classmethod
    def from_config(cls, head_cfg: HeadConfig) -> MaskSetCriterion:
        """The criterion configured by a :class:`HeadConfig`."""
        return cls(
            num_classes=head_cfg.num_classes,
            class_frequencies=head_cfg.class_frequencies,
            loss_cls_weight=head_cfg.loss_cls_weight,
            loss_mask_weight=head_cfg.loss_mask_weight,
            loss_dice_weight=head_cfg.loss_dice_weight,
            no_object_weight=head_cfg.no_object_weight,
            num_points=head_cfg.num_points,
            oversample_ratio=head_cfg.oversample_ratio,
            importance_sample_ratio=head_cfg.importance_sample_ratio,
            sample_weight_gamma=head_cfg.sample_weight_gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )

    def forward(
        self,
        cls_logits: list[Tensor],
        mask_logits: list[Tensor],
        gt_occ: Tensor,
        dn_outputs: list[tuple[int, Tensor, Tensor]] | None = None,
        dn_meta: dict | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """All losses of one training step.

        Args:
            cls_logits: per stage ``[B, Q, C+1]`` (last logit = no object); stage 0 is the prediction
                before the first decoder layer, the last stage the final prediction.
            mask_logits: per stage ``[B, Q, X0, Y0, Z0]`` at the mask-feature resolution.
            gt_occ: ``[B, X, Y, Z]`` integer labels at GT resolution, 255 = ignore.
            dn_outputs: ``(stage, cls [B, pad, C+1], mask [B, pad, X0, Y0, Z0])`` per DN-supervised stage.
            dn_meta: ``{"pad_size", "scalar", "max_num_gts", "num_gts_list"}`` of the DN queries.
            generator: random generator on ``gt_occ.device`` for every draw (default: the global one).

        Returns:
            ``loss_cls``, ``loss_mask``, ``loss_dice`` for the last stage, ``d{k}.loss_*`` for earlier stages,
            ``[d{k}.]loss_{cls,mask,dice}_dn`` for each DN-supervised stage (no prefix for the last stage).
        """
        num_stages = self._check_inputs(cls_logits, mask_logits, gt_occ)
        last = num_stages - 1

        def key(stage: int, name: str) -> str:
            return name if stage == last else f"d{stage}.{name}"

        with _autocast_disabled(gt_occ.device.type):
            # Shared by every stage: the GT grouped by class (sampling structure) and the present classes.
            groups = [VoxelGroups.from_occupancy(gt_occ[b], self.num_classes) for b in range(len(gt_occ))]
            gt_labels = [g.present_classes() for g in groups]
            dn_stages = self._check_dn(dn_outputs, dn_meta, gt_labels, num_stages, gt_occ)
            losses: dict[str, Tensor] = {}
            for stage in range(num_stages):
                loss_cls, loss_mask, loss_dice = self._matching_losses(
                    cls_logits[stage].float(), mask_logits[stage].float(), groups, gt_labels, generator
                )
                losses[key(stage, "loss_cls")] = loss_cls
                losses[key(stage, "loss_mask")] = loss_mask
                losses[key(stage, "loss_dice")] = loss_dice
            for stage, dn_cls, dn_mask in dn_stages:
                loss_cls, loss_mask, loss_dice = self._dn_losses(
                    dn_cls.float(), dn_mask.float(), groups, gt_labels, dn_meta or {}, generator
                )
                losses[key(stage, "loss_cls_dn")] = loss_cls
                losses[key(stage, "loss_mask_dn")] = loss_mask
                losses[key(stage, "loss_dice_dn")] = loss_dice
        return losses

    # ----------------------------------------------------------------------------------------------
    # Matching queries

    def _matching_losses(
        self,
        cls: Tensor,
        mask: Tensor,
        groups: list[VoxelGroups],
        gt_labels: list[Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss_cls, loss_mask, loss_dice) of one stage: ``cls`` [B, Q, C+1], ``mask`` [B, Q, X0, Y0, Z0]."""
        batch, num_queries = cls.shape[:2]
        labels = torch.full((batch, num_queries), self.num_classes, dtype=torch.long, device=cls.device)
        rows: list[tuple[Tensor, Tensor]] = []  # per sample: matched queries (ascending), their GT labels
        for b in range(batch):
            query, gt = self.match(cls[b], mask[b], groups[b], gt_labels[b], generator=generator)
            labels[b, query] = gt_labels[b][gt]
            rows.append((query, gt_labels[b][gt]))
        labels = labels.flatten()  # [B * Q]
        class_weight = self.class_weight.to(cls.device, torch.float32)
        # avg_factor = sum of the per-query class weights (not averaged across processes, as released).
        loss_cls = self.loss_cls_weight * weighted_cross_entropy(
            cls.flatten(0, 1), labels, class_weight, avg_factor=class_weight[labels].sum()
        )
        loss_mask, loss_dice = self._point_losses(
            mask, rows, groups, single_class_rows=False, generator=generator
        )
        return loss_cls, loss_mask, loss_dice

    @torch.no_grad()
    def match(
        self,
        cls: Tensor,
        mask: Tensor,
        groups: VoxelGroups,
        gt_labels: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Hungarian matching of one sample's queries (``cls`` [Q, C+1], ``mask`` [Q, X0, Y0, Z0]) to its GTs.

        Costs are evaluated on ``num_points`` distinct GT voxels drawn with the class-frequency weights,
        one point set for all query/GT pairs. Returns (query indices ascending, GT indices), int64.
        """
        if len(gt_labels) == 0:
            empty = torch.empty(0, dtype=torch.long, device=cls.device)
            return empty, empty
        weights = groups.class_weight_rows(self.sampling_weight, 1)
        points = sample_without_replacement(groups, weights, self.num_points, generator=generator)  # [1, P]
        coords = voxel_coords(points, groups.grid_shape)  # [1, P, 3]
        point_logits = point_sample_3d(mask.float()[None], coords)[0]  # [Q, P]
        point_targets = groups.labels_at(points[0])[None, :] == gt_labels[:, None]  # [G, P]
        cost = (
            classification_cost(cls, gt_labels, MATCH_CLS_WEIGHT)
            + mask_bce_cost(point_logits, point_targets, MATCH_MASK_WEIGHT)
            + mask_dice_cost(point_logits, point_targets, MATCH_DICE_WEIGHT, eps=DICE_EPS)
        )  # [Q, G]
        return hungarian_match(cost)

    # ----------------------------------------------------------------------------------------------
    # Denoising slots

    def _dn_losses(
        self,
        cls: Tensor,
        mask: Tensor,
        groups: list[VoxelGroups],
        gt_labels: list[Tensor],
        dn_meta: dict,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss_cls_dn, loss_mask_dn, loss_dice_dn); DN slot ``g * max_num_gts + t`` is the sample's GT t."""
        batch, pad_size = cls.shape[:2]
        if pad_size == 0:  # no GT anywhere: nothing to denoise (the release builds no DN queries then)
            empty = cls.flatten()[:0].sum() + mask.flatten()[:0].sum()
            return empty, empty, empty
        scalar, max_num_gts = int(dn_meta["scalar"]), int(dn_meta["max_num_gts"])
        labels = torch.full((batch, pad_size), self.num_classes, dtype=torch.long, device=cls.device)
        label_weights = torch.zeros(batch, pad_size, device=cls.device)
        rows: list[tuple[Tensor, Tensor]] = []  # per sample: DN slots with a GT, their labels
        for b in range(batch):
            num_gts = len(gt_labels[b])
            group_start = torch.arange(scalar, device=cls.device)[:, None] * max_num_gts  # [scalar, 1]
            slots = (
                group_start + torch.arange(num_gts, device=cls.device)[None, :]
            ).flatten()  # [scalar * n]
            slot_labels = gt_labels[b].repeat(scalar)
            labels[b, slots] = slot_labels
            label_weights[b, slots] = 1.0
            rows.append((slots, slot_labels))
        labels = labels.flatten()  # [B * pad]
        class_weight = self.class_weight.to(cls.device, torch.float32)
        # As released: padded slots have label weight 0, yet their no-object class weight (0.1) still
        # counts in the average factor, so with B > 1 and unequal GT counts the DN CE is scaled down.
        loss_cls = self.loss_cls_weight * weighted_cross_entropy(
            cls.flatten(0, 1),
            labels,
            class_weight,
            avg_factor=class_weight[labels].sum(),
            label_weights=label_weights.flatten(),
        )
        loss_mask, loss_dice = self._point_losses(
            mask, rows, groups, single_class_rows=True, generator=generator
        )
        return loss_cls, loss_mask, loss_dice

    # ----------------------------------------------------------------------------------------------
    # Point-sampled mask losses

    def _point_losses(
        self,
        mask: Tensor,
        rows: list[tuple[Tensor, Tensor]],
        groups: list[VoxelGroups],
        *,
        single_class_rows: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """(loss_mask, loss_dice) of the supervised rows: per sample (query/slot indices, GT labels).

        Matching rows draw their candidates from the whole sample (class-frequency weights); DN rows
        (``single_class_rows``) from their own GT class only, filling with arbitrary other voxels when
        that class has too few voxels (spec 03 section 3.3, "sampling surprise").
        """
        class_weight = self.class_weight.to(mask.device, torch.float32)
        preds, targets, weights = [], [], []
        for b, (index, row_labels) in enumerate(rows):
            if len(index) == 0:
                continue
            row_logits = mask[b].index_select(0, index)  # [R, X0, Y0, Z0]
            if single_class_rows:
                candidate_weights = groups[b].single_class_rows(self.sampling_weight, row_labels)
                random_weights = groups[b].single_class_rows(self._uniform_weight, row_labels)
            else:
                candidate_weights = groups[b].class_weight_rows(self.sampling_weight, len(index))
                random_weights = groups[b].class_weight_rows(self._uniform_weight, len(index))
            points = importance_sample_points(
                groups[b],
                row_logits.detach(),
                candidate_weights,
                random_weights,
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                generator=generator,
            )  # [R, P]
            coords = voxel_coords(points, groups[b].grid_shape)  # [R, P, 3]
            preds.append(point_sample_3d(row_logits[:, None], coords)[:, 0])  # [R, P]
            targets.append(groups[b].labels_at(points) == row_labels[:, None])  # [R, P]
            weights.append(class_weight[row_labels])  # [R]
        if not preds:
            # No supervised row in this process. Still join the collectives so other processes never wait.
            zero = mask.new_zeros(())
            reduce_mean(zero)
            reduce_mean(zero)
            empty = mask.flatten()[:0].sum()  # 0 with a graph, as released
            return empty, empty
        point_logits = torch.cat(preds)  # [R, P]
        point_targets = torch.cat(targets)
        row_weights = torch.cat(weights)  # [R]
        dice_avg_factor = reduce_mean(row_weights.sum())
        mask_avg_factor = reduce_mean(row_weights.sum() * self.num_points)
        loss_dice = self.loss_dice_weight * naive_dice_loss(
            point_logits, point_targets, row_weights, dice_avg_factor
        )
        loss_mask = self.loss_mask_weight * weighted_bce_loss(
            point_logits, point_targets, row_weights, mask_avg_factor
        )
        return loss_mask, loss_dice

    # ----------------------------------------------------------------------------------------------
    # Input checks

    def _check_inputs(self, cls_logits: list[Tensor], mask_logits: list[Tensor], gt_occ: Tensor) -> int:
        if len(cls_logits) == 0 or len(cls_logits) != len(mask_logits):
            raise ValueError(
                f"MaskSetCriterion: need one cls and one mask tensor per stage, got {len(cls_logits)} "
                f"and {len(mask_logits)}"
            )
        if gt_occ.dim() != 4 or gt_occ.is_floating_point():
            raise ValueError(
                f"MaskSetCriterion: gt_occ must be integer [B, X, Y, Z], got {tuple(gt_occ.shape)}"
            )
        batch = gt_occ.shape[0]
        for stage, (cls, mask) in enumerate(zip(cls_logits, mask_logits)):
            if cls.dim() != 3 or cls.shape[0] != batch or cls.shape[2] != self.num_classes + 1:
                raise ValueError(
                    f"MaskSetCriterion: cls_logits[{stage}] must be [B={batch}, Q, {self.num_classes + 1}], "
                    f"got {tuple(cls.shape)}"
                )
            if mask.dim() != 5 or tuple(mask.shape[:2]) != tuple(cls.shape[:2]):
                raise ValueError(
                    f"MaskSetCriterion: mask_logits[{stage}] must be [B, Q, X0, Y0, Z0] with B, Q of "
                    f"cls_logits ({tuple(cls.shape[:2])}), got {tuple(mask.shape)}"
                )
            if cls.device != gt_occ.device or mask.device != gt_occ.device:
                raise ValueError(
                    f"MaskSetCriterion: stage {stage} logits and gt_occ are on different devices"
                )
        num_voxels = gt_occ[0].numel()
        if int(self.num_points * self.oversample_ratio) > num_voxels:
            raise ValueError(
                f"MaskSetCriterion: num_points * oversample_ratio = "
                f"{int(self.num_points * self.oversample_ratio)}"
                f" distinct points per row exceed the {num_voxels} voxels of the GT grid; lower num_points"
            )
        return len(cls_logits)

    def _check_dn(
        self,
        dn_outputs: list[tuple[int, Tensor, Tensor]] | None,
        dn_meta: dict | None,
        gt_labels: list[Tensor],
        num_stages: int,
        gt_occ: Tensor,
    ) -> list[tuple[int, Tensor, Tensor]]:
        if not dn_outputs:
            return []
        if dn_meta is None:
            raise ValueError("MaskSetCriterion: dn_outputs given without dn_meta")
        missing = {"pad_size", "scalar", "max_num_gts", "num_gts_list"} - set(dn_meta)
        if missing:
            raise ValueError(f"MaskSetCriterion: dn_meta lacks {sorted(missing)}")
        num_gts = [len(labels) for labels in gt_labels]
        pad_size, scalar, max_num_gts = (
            int(dn_meta["pad_size"]),
            int(dn_meta["scalar"]),
            int(dn_meta["max_num_gts"]),
        )
        if list(dn_meta["num_gts_list"]) != num_gts or max_num_gts != max(num_gts):
            raise ValueError(
                f"MaskSetCriterion: dn_meta num_gts_list={list(dn_meta['num_gts_list'])}, max_num_gts="
                f"{max_num_gts} disagree with the GT classes present per sample {num_gts}"
            )
        if pad_size != scalar * max_num_gts:
            raise ValueError(f"MaskSetCriterion: dn_meta pad_size={pad_size} != scalar * max_num_gts")
        stages = [stage for stage, _, _ in dn_outputs]
        if len(set(stages)) != len(stages) or not all(0 <= s < num_stages for s in stages):
            raise ValueError(
                f"MaskSetCriterion: DN stages {stages} must be distinct and in [0, {num_stages - 1}]"
            )
        for stage, cls, mask in dn_outputs:
            if tuple(cls.shape) != (len(gt_occ), pad_size, self.num_classes + 1):
                raise ValueError(
                    f"MaskSetCriterion: DN cls of stage {stage} must be "
                    f"{(len(gt_occ), pad_size, self.num_classes + 1)}, got {tuple(cls.shape)}"
                )
            if mask.dim() != 5 or tuple(mask.shape[:2]) != (len(gt_occ), pad_size):
                raise ValueError(
                    f"MaskSetCriterion: DN mask of stage {stage} must be [B, {pad_size}, X0, Y0, Z0], "
                    f"got {tuple(mask.shape)}"
                )
        return list(dn_outputs)
