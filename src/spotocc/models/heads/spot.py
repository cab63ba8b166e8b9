"""SPOT-Occ head: the decoder layer around SPOT cross-attention, and the mask-classification head.

Spec 03, sections 1-3. Faithful by default (released numerics and quirks); the deliberate fixes are
the ``fix_*`` / ``dn_consistent`` switches, all off in the paper presets. About 480 lines: the head's
forward, its denoising queries and its outputs for the losses are one released module, kept as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spotocc.config import HeadConfig
from spotocc.models.heads.denoising import (
    DenoisingQueries,
    build_denoising_queries,
    denoising_cross_attn_mask,
    pool_class_masks,
)
from spotocc.models.heads.positional_encoding import SinePositionalEncoding3D
from spotocc.models.heads.spot_attention import SpotCrossAttention
from spotocc.models.heads.targets import occupancy_to_class_masks
from spotocc.models.labels import METHODS as LABEL_METHODS
from spotocc.models.labels import occupancy_labels

# --------------------------------------------------------------------------------------------------
# Decoder layer


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear (the residual is added by the decoder layer)."""

    def __init__(self, *, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class SpotDecoderLayer(nn.Module):
    """Post-norm decoder layer: SPOT cross-attention, norm, self-attention, norm, FFN, norm.

    Released quirk kept by default: the self-attention residual is added twice,
    ``x = norm(x + (x + self_attn(x)))`` (the wrapped attention already returned ``x + attn``);
    ``fix_double_residual=True`` gives the usual ``norm(x + self_attn(x))``. Self-attention is
    ``nn.MultiheadAttention`` (packed in-projection) with q = k = x + query_pos and v = x.
    """

    def __init__(
        self,
        *,
        embed_dims: int = 192,
        num_heads: int = 6,
        ffn_dims: int = 1536,
        pruning_ratio: float = 0.08,
        min_k: int = 10,
        dropout: float = 0.0,
        fix_interaction_norm: bool = False,
        fix_double_residual: bool = False,
    ) -> None:
        super().__init__()
        self.fix_double_residual = fix_double_residual
        self.cross_attn = SpotCrossAttention(
            embed_dims,
            num_heads,
            pruning_ratio,
            min_k,
            dropout=dropout,
            fix_interaction_norm=fix_interaction_norm,
        )
        self.cross_attn_norm = nn.LayerNorm(embed_dims)
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(embed_dims)
        self.ffn = FeedForward(embed_dims=embed_dims, hidden_dims=ffn_dims)
        self.ffn_norm = nn.LayerNorm(embed_dims)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        query_pos: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        *,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        query_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, C], memory [B, K, C] -> [B, Q, C].

        Args:
            self_attn_mask: bool [Q, Q], True = may not attend.
            cross_attn_mask: bool [B, Q, K], True = may not attend.
            query_padding_mask: bool [B, Q], True = padding query: not a self-attention key and not
                part of SPOT-CA's query-axis normalisation.
        """
        x = self.cross_attn(
            query,
            memory,
            query_pos,
            memory_pos,
            attn_mask=cross_attn_mask,
            query_padding_mask=query_padding_mask,
        )
        x = self.cross_attn_norm(x)

        q = x if query_pos is None else x + query_pos
        attended = self.self_attn(
            q,
            q,
            x,
            attn_mask=self_attn_mask,
            key_padding_mask=query_padding_mask,
            need_weights=False,
        )[0]
        x = x + attended if self.fix_double_residual else x + (x + attended)
        x = self.self_attn_norm(x)

        x = self.ffn_norm(x + self.ffn(x))
        return x


# --------------------------------------------------------------------------------------------------
# Head


@dataclass
class HeadOutput:
    """Predictions of :class:`SpotOccHead` (matching queries only in the two lists).

    Attributes:
        cls_logits: per stage [B, Q, C + 1] (last column = no object). Training: stage 0 (before the
            first decoder layer) .. stage L; inference: only stage L.
        mask_logits: per stage [B, Q, X0, Y0, Z0] over every voxel of the finest features.
        dn_outputs: (stage, cls [B, pad, C + 1], mask [B, pad, X0, Y0, Z0]) per DN-supervised stage, or
            None without DN.
        dn_meta: ``{"pad_size", "scalar", "max_num_gts", "num_gts_list"}``, or None without DN.
    """

    cls_logits: list[torch.Tensor]
    mask_logits: list[torch.Tensor]
    dn_outputs: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
    dn_meta: dict | None = None


class SpotOccHead(nn.Module):
    """SPOT-Occ mask-classification head (released ``SparseProto...Mask2Former...OccHead``).

    Queries (learned content + learned positions) pass ``num_layers`` :class:`SpotDecoderLayer` s;
    layer ``i`` reads memory level ``i % num_levels`` (level 0 = coarsest). After each stage the shared
    ``post_norm`` feeds ``class_embed`` (classes + no object) and ``mask_embed``, whose output dotted
    with every voxel of the finest features gives the mask logits. Training predicts at every stage
    (stage 0 = before the first layer); inference only after the last layer.

    Denoising (training with GT, ``dn_enabled``): one DN query per GT class of each sample (times
    ``dn_scalar``), prepended to the matching queries; see :mod:`spotocc.models.heads.denoising`.

    - released (``dn_consistent=False``): decoder layers ``i < dn_loss_layers`` restrict DN queries to
      their GT's max-pooled mask at that layer's level, and DN outputs are supervised at stages
      ``s < dn_loss_layers``. With the released ``dn_loss_layers=1``: mask in layer 0, loss on
      stage 0, which is computed before any layer, so the masked attention never reaches a loss.
    - consistent (``dn_consistent=True``, a fix): the same layers ``i < dn_loss_layers`` are masked and
      the DN outputs of exactly those layers are supervised, i.e. stages ``1 .. dn_loss_layers``.

    Parameter names (released ``pts_bbox_head.*`` -> here): ``transformer_decoder.layers.i`` ->
    ``layers.i`` with ``spot_cross_attn``/``pem_cross_attn`` -> ``cross_attn``, ``self_attn.attn`` ->
    ``self_attn``, ``ffn.layers.0.0`` -> ``ffn.fc1``, ``ffn.layers.1`` -> ``ffn.fc2``, ``norms.0/1/2`` ->
    ``cross_attn_norm``/``self_attn_norm``/``ffn_norm``; ``transformer_decoder.post_norm`` -> ``post_norm``;
    ``query_feat`` -> ``query_content``; ``query_embed`` -> ``query_pos``; ``cls_embed`` ->
    ``class_embed``; ``label_enc`` -> ``dn_label_embed``; ``level_embed`` and ``mask_embed.{0,2,4}``
    unchanged. No layout changes.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        embed_dims: int = 192,
        num_heads: int = 6,
        num_queries: int = 100,
        num_layers: int = 9,
        num_levels: int = 3,
        ffn_dims: int = 1536,
        pruning_ratio: float = 0.08,
        min_k: int = 10,
        dn_enabled: bool = True,
        dn_scalar: int = 1,
        dn_noise_scale: float = 0.01,
        dn_label_noise_ratio: float = 0.01,
        dn_loss_layers: int = 1,
        dn_consistent: bool = False,
        fix_interaction_norm: bool = False,
        fix_double_residual: bool = False,
        label_method: str = "bounded",
        criterion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_layers < 1 or num_levels < 1:
            raise ValueError(
                "SpotOccHead: num_classes, num_queries, num_layers and num_levels must be >= 1, got "
                f"{num_classes}, {num_queries}, {num_layers}, {num_levels}"
            )
        if embed_dims % 6:
            raise ValueError(
                f"SpotOccHead: embed_dims must be a multiple of 6 (3D sine PE), got {embed_dims}"
            )
        if dn_loss_layers < 0 or dn_scalar < 0:
            raise ValueError(
                f"SpotOccHead: dn_loss_layers and dn_scalar must be >= 0, got {dn_loss_layers}, {dn_scalar}"
            )
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_queries = num_queries
        self.num_levels = num_levels
        self.dn_enabled = dn_enabled
        self.dn_scalar = dn_scalar
        self.dn_noise_scale = dn_noise_scale
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_loss_layers = dn_loss_layers
        self.dn_consistent = dn_consistent

        self.layers = nn.ModuleList(
            SpotDecoderLayer(
                embed_dims=embed_dims,
                num_heads=num_heads,
                ffn_dims=ffn_dims,
                pruning_ratio=pruning_ratio,
                min_k=min_k,
                fix_interaction_norm=fix_interaction_norm,
                fix_double_residual=fix_double_residual,
            )
            for _ in range(num_layers)
        )
        self.post_norm = nn.LayerNorm(embed_dims)
        self.positional_encoding = SinePositionalEncoding3D(num_feats=embed_dims // 3, normalize=True)
        self.query_content = nn.Embedding(num_queries, embed_dims)
        self.query_pos = nn.Embedding(num_queries, embed_dims)
        self.level_embed = nn.Embedding(num_levels, embed_dims)
        self.class_embed = nn.Linear(embed_dims, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(embed_dims, embed_dims),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims),
        )
        self.dn_label_embed = nn.Embedding(num_classes, embed_dims)
        if label_method not in LABEL_METHODS:
            raise ValueError(
                f"{type(self).__name__}: label_method must be one of {LABEL_METHODS}, got {label_method!r}"
            )
        self.label_method = label_method
        self.criterion = criterion
        self.reset_decoder_parameters()

    @classmethod
    def from_config(cls, head_cfg: HeadConfig, criterion: nn.Module | None = None) -> SpotOccHead:
        """The head of ``head_cfg`` (``type == "spot"``); ``criterion`` defaults to ``MaskSetCriterion``."""
        if head_cfg.type != "spot":
            raise ValueError(f"SpotOccHead.from_config: head.type must be 'spot', got {head_cfg.type!r}")
        if criterion is None:
            from spotocc.models.heads.losses import MaskSetCriterion

            criterion = MaskSetCriterion.from_config(head_cfg)
        return cls(
            num_classes=head_cfg.num_classes,
            embed_dims=head_cfg.embed_dims,
            num_heads=head_cfg.num_heads,
            num_queries=head_cfg.num_queries,
            num_layers=head_cfg.num_layers,
            num_levels=head_cfg.num_levels,
            ffn_dims=head_cfg.ffn_dims,
            pruning_ratio=head_cfg.pruning_ratio,
            min_k=head_cfg.min_k,
            dn_enabled=head_cfg.dn_enabled,
            dn_scalar=head_cfg.dn_scalar,
            dn_noise_scale=head_cfg.dn_noise_scale,
            dn_label_noise_ratio=head_cfg.dn_label_noise_ratio,
            dn_loss_layers=head_cfg.dn_loss_layers,
            dn_consistent=head_cfg.dn_consistent,
            fix_interaction_norm=head_cfg.fix_interaction_norm,
            fix_double_residual=head_cfg.fix_double_residual,
            label_method=head_cfg.label_method,
            criterion=criterion,
        )

    def reset_decoder_parameters(self) -> None:
        """Released init: xavier-normal on every >= 2-dim decoder tensor (alpha included).

        Everything else keeps PyTorch's defaults (embeddings N(0, 1), Linear kaiming-uniform, LayerNorm
        1/0, attention biases 0).
        """
        for param in self.layers.parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)

    # ----------------------------------------------------------------------------------------------
    # public API

    def forward(self, voxel_feats: list[torch.Tensor], gt_occ: torch.Tensor | None = None) -> HeadOutput:
        """Predictions at every stage (training) or the last stage (eval); DN when training with GT.

        Args:
            voxel_feats: the neck output, ``num_levels + 1`` dense tensors [B, C, X, Y, Z]: index 0 =
                finest mask features, 1.. = coarser memories (used coarse to fine).
            gt_occ: uint8 labels [B, X, Y, Z] at GT resolution (255 = ignore); only used for DN.
        """
        use_dn = self.training and gt_occ is not None and self.dn_enabled
        return self._decode(voxel_feats, gt_occ if use_dn else None, all_stages=self.training)

    def forward_train(self, voxel_feats: list[torch.Tensor], gt_occ: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward with GT, then the criterion's named losses."""
        if self.criterion is None:
            raise RuntimeError("SpotOccHead.forward_train: the head was built without a criterion")
        out = self.forward(voxel_feats, gt_occ)
        return self.criterion(
            out.cls_logits, out.mask_logits, gt_occ, dn_outputs=out.dn_outputs, dn_meta=out.dn_meta
        )

    def predict_logits(self, voxel_feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-stage class probabilities [B, Q, C] (softmax over C + 1, no-object column dropped, not
        renormalised) and mask logits [B, Q, X0, Y0, Z0]. Never uses DN, whatever the mode."""
        out = self._decode(voxel_feats, None, all_stages=False)
        class_probs = out.cls_logits[-1].softmax(dim=-1)[..., :-1]
        return class_probs, out.mask_logits[-1]

    def predict(self, voxel_feats: list[torch.Tensor], out_size: tuple[int, int, int]) -> torch.Tensor:
        """int64 labels [B, *out_size] (see :func:`spotocc.models.labels.occupancy_labels`)."""
        class_probs, mask_logits = self.predict_logits(voxel_feats)
        return occupancy_labels(class_probs, mask_logits, out_size, self.label_method)

    # ----------------------------------------------------------------------------------------------
    # internals

    def dn_masked_layers(self) -> range:
        """Decoder layers whose cross-attention restricts DN queries to their GT masks."""
        return range(min(self.dn_loss_layers, len(self.layers)))

    def dn_supervised_stages(self) -> list[int]:
        """Prediction stages whose DN outputs are supervised (stage s = after s decoder layers)."""
        if self.dn_consistent:
            return [i + 1 for i in self.dn_masked_layers()]
        return list(range(min(self.dn_loss_layers, len(self.layers) + 1)))

    def _decode(
        self, voxel_feats: list[torch.Tensor], gt_occ: torch.Tensor | None, *, all_stages: bool
    ) -> HeadOutput:
        self._check_features(voxel_feats)
        mask_feats = voxel_feats[0]
        batch = mask_feats.shape[0]
        mask_grid = tuple(mask_feats.shape[2:])
        mask_feats_flat = mask_feats.flatten(2)  # [B, C, N0]

        memories, level_sizes = [], []
        for level in range(self.num_levels):
            feats = voxel_feats[self.num_levels - level]  # coarse to fine
            size = tuple(feats.shape[2:])
            pos = self.positional_encoding(size, device=feats.device, dtype=feats.dtype)  # [K, C]
            memory = feats.flatten(2).transpose(1, 2) + self.level_embed.weight[level]  # [B, K, C]
            memories.append(memory + pos)  # positions added once per level instead of once per layer
            level_sizes.append(size)

        content = self.query_content.weight.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, C]
        pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        dn, dn_cross_masks, num_dn = None, {}, 0
        if gt_occ is not None:
            if gt_occ.dim() != 4 or gt_occ.shape[0] != batch:
                raise ValueError(
                    f"SpotOccHead: gt_occ must be [B={batch}, X, Y, Z], got {tuple(gt_occ.shape)}"
                )
            dn, dn_cross_masks = self._prepare_dn(gt_occ, level_sizes)
        if dn is not None:
            num_dn = dn.meta["pad_size"]
            content = torch.cat([dn.content, content], dim=1)  # DN slots first
            pos = torch.cat([dn.content.detach(), pos], dim=1)  # a DN query's position = its content

        dn_stages = set(self.dn_supervised_stages()) if dn is not None else set()
        cls_logits, mask_logits, dn_outputs = [], [], []

        def record(stage: int, queries: torch.Tensor) -> None:
            with_dn = stage in dn_stages
            cls, masks = self._predict(
                queries if with_dn else queries[:, num_dn:], mask_feats_flat, mask_grid
            )
            if with_dn:
                dn_outputs.append((stage, cls[:, :num_dn], masks[:, :num_dn]))
            cls_logits.append(cls[:, num_dn:] if with_dn else cls)
            mask_logits.append(masks[:, num_dn:] if with_dn else masks)

        queries = content
        if all_stages:
            record(0, queries)
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            queries = layer(
                queries,
                memories[level],
                pos,
                self_attn_mask=dn.self_attn_mask if dn is not None else None,
                cross_attn_mask=dn_cross_masks.get(i),
                query_padding_mask=dn.query_padding_mask if dn is not None else None,
            )
            if all_stages or i == len(self.layers) - 1:
                record(i + 1, queries)

        return HeadOutput(
            cls_logits=cls_logits,
            mask_logits=mask_logits,
            dn_outputs=dn_outputs if dn is not None else None,
            dn_meta=dn.meta if dn is not None else None,
        )

    def _predict(
        self, queries: torch.Tensor, mask_feats_flat: torch.Tensor, mask_grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [B, q, C + 1] and mask logits [B, q, X0, Y0, Z0] of some queries [B, q, C]."""
        x = self.post_norm(queries)
        cls = self.class_embed(x)
        masks = torch.bmm(self.mask_embed(x), mask_feats_flat)  # [B, q, N0]
        return cls, masks.view(*masks.shape[:2], *mask_grid)

    def _prepare_dn(
        self, gt_occ: torch.Tensor, level_sizes: list[tuple[int, ...]]
    ) -> tuple[DenoisingQueries | None, dict[int, torch.Tensor]]:
        """DN queries and, per DN-masked decoder layer, its cross-attention mask [B, pad + Q, K_level]."""
        batch = len(gt_occ)
        layers = list(self.dn_masked_layers())
        levels = sorted({i % self.num_levels for i in layers})
        labels: list[torch.Tensor] = []
        pooled: dict[int, list[torch.Tensor]] = {level: [] for level in levels}
        for b in range(batch):
            sample_labels, class_masks = occupancy_to_class_masks(
                gt_occ[b], self.num_classes
            )  # [n_b, X, Y, Z]
            labels.append(sample_labels)
            for level in levels:
                pooled[level].append(pool_class_masks(class_masks, level_sizes[level]))
            del class_masks  # GT-resolution masks are large; keep only the pooled ones
        dn = build_denoising_queries(
            labels,
            self.dn_label_embed,
            num_queries=self.num_queries,
            num_classes=self.num_classes,
            scalar=self.dn_scalar,
            noise_scale=self.dn_noise_scale,
            label_noise_ratio=self.dn_label_noise_ratio,
        )
        if dn is None:
            return None, {}
        by_level = {
            level: denoising_cross_attn_mask(
                pooled[level],
                max_num_gts=dn.meta["max_num_gts"],
                scalar=dn.meta["scalar"],
                num_queries=self.num_queries,
            )
            for level in levels
        }
        return dn, {i: by_level[i % self.num_levels] for i in layers}

    def _check_features(self, voxel_feats: list[torch.Tensor]) -> None:
        if len(voxel_feats) != self.num_levels + 1:
            raise ValueError(
                f"SpotOccHead: expected {self.num_levels + 1} voxel feature volumes (mask features + "
                f"{self.num_levels} memory levels), got {len(voxel_feats)}"
            )
        batch = voxel_feats[0].shape[0]
        for index, feats in enumerate(voxel_feats):
            if feats.dim() != 5 or feats.shape[0] != batch or feats.shape[1] != self.embed_dims:
                raise ValueError(
                    f"SpotOccHead: voxel_feats[{index}] must be [B={batch}, C={self.embed_dims}, X, Y, Z], "
                    f"got {tuple(feats.shape)}"
                )
