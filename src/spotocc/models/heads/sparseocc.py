"""SparseOcc baseline head: Mask2Former masked attention over sparse mask features (spec 03, section 5).

The head SPOT-Occ is compared against, as released (``SparseMask2FormerOccHead`` /
``SparseMask2FormerOpenOccHead``): the same queries, memories, positional encoding, class and mask
embeddings as :class:`~spotocc.models.heads.spot.SpotOccHead`, with

- standard multi-head cross-attention over every key of the level, masked Mask2Former-style by the
  previous stage's mask prediction (:func:`masked_attention_mask`);
- a coarse occupancy classifier ``occ_pred_conv`` on the (detached) finest features whose
  non-empty score picks the top ``topk_ratio`` voxels; only those carry their own features in the
  mask einsum, every other voxel carries the learned ``empty_token``;
- a prediction after every stage, at inference too (the attention masks need it);
- four coarse voxel losses on ``occ_pred_conv`` (:mod:`spotocc.models.heads.coarse_losses`), its
  only training signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spotocc.config import HeadConfig
from spotocc.data.classes import cross_entropy_class_weights
from spotocc.models.heads.coarse_losses import coarse_voxel_losses
from spotocc.models.heads.positional_encoding import SinePositionalEncoding3D
from spotocc.models.heads.spot import FeedForward, HeadOutput
from spotocc.models.labels import METHODS as LABEL_METHODS
from spotocc.models.labels import occupancy_labels

# --------------------------------------------------------------------------------------------------
# Masked attention


def masked_attention_mask(
    mask_logits: torch.Tensor, level_size: tuple[int, int, int], num_heads: int
) -> torch.Tensor:
    """Mask2Former cross-attention mask of one memory level from a stage's mask logits.

    ``mask_logits`` [B, Q, X0, Y0, Z0] are adaptive-max-pooled to ``level_size`` (a coarse cell keeps
    the largest logit of the fine voxels it covers), a cell is blocked where ``sigmoid(pooled) < 0.5``,
    and a query row that would block every key is unblocked entirely (it attends everywhere).

    Returns:
        bool [B * num_heads, Q, prod(level_size)], True = may not attend; row ``b * num_heads + h``
        is sample b's mask for head h (the layout ``nn.MultiheadAttention`` expects), the same for
        every head. No gradient.
    """
    with torch.no_grad():
        pooled = F.adaptive_max_pool3d(mask_logits.detach().float(), tuple(level_size))  # [B, Q, x, y, z]
        blocked = pooled.flatten(2).sigmoid() < 0.5  # [B, Q, K]
        blocked &= ~blocked.all(dim=-1, keepdim=True)
        return blocked.repeat_interleave(num_heads, dim=0)  # [B * H, Q, K]


class MaskedAttentionDecoderLayer(nn.Module):
    """Post-norm Mask2Former decoder layer (released mmdet ``DetrTransformerDecoderLayer``).

    ``x1 = norm(x + cross_attn(x + query_pos, memory + memory_pos, memory, mask))``,
    ``x2 = norm(x1 + self_attn(x1 + query_pos, x1 + query_pos, x1))``, ``x3 = norm(x2 + ffn(x2))``:
    one residual per block (SPOT's layer adds the self-attention residual twice). Both attentions are
    ``nn.MultiheadAttention`` with packed in-projections; values are the memory without positions.
    """

    def __init__(
        self, *, embed_dims: int = 192, num_heads: int = 6, ffn_dims: int = 1536, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.cross_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
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
        cross_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, C], memory [B, K, C] -> [B, Q, C].

        Args:
            query_pos: [B, Q, C] added to queries and self-attention keys.
            memory_pos: [B, K, C] or [K, C], added to the cross-attention keys only.
            cross_attn_mask: bool [B * num_heads, Q, K] (see :func:`masked_attention_mask`), True =
                may not attend; no row may block every key.
        """
        q = query if query_pos is None else query + query_pos
        key = memory if memory_pos is None else memory + memory_pos
        attended = self.cross_attn(q, key, memory, attn_mask=cross_attn_mask, need_weights=False)[0]
        x = self.cross_attn_norm(query + attended)

        q = x if query_pos is None else x + query_pos
        x = self.self_attn_norm(x + self.self_attn(q, q, x, need_weights=False)[0])

        return self.ffn_norm(x + self.ffn(x))


# --------------------------------------------------------------------------------------------------
# Head


@dataclass
class SparseOccOutput(HeadOutput):
    """:class:`HeadOutput` plus the coarse occupancy logits ``[B, C, X0, Y0, Z0]`` of ``occ_pred_conv``
    (``dn_outputs`` and ``dn_meta`` are always None: the baseline has no denoising)."""

    coarse_logits: torch.Tensor | None = None


class SparseOccHead(nn.Module):
    """The SparseOcc baseline head, as released, for any batch size.

    Forward, per sample (spec 03 section 5.2):

    1. ``coarse = occ_pred_conv(F0.detach())`` [B, C, X0, Y0, Z0] (1x1 conv, GroupNorm, ReLU, 1x1
       conv; under activation checkpointing while training, as released: the same numbers, less
       memory). Trained only by the coarse voxel losses.
    2. Score ``1 - softmax(coarse)[empty]`` per voxel; the ``int(topk_ratio * N0)`` best voxels are
       *selected*. ``softmax_over_batch_bug=True`` reproduces the released nuScenes head, whose
       softmax runs over the batch axis: at its batch size 1 every score is exactly 0 and CUDA's
       top-k (ties taken in index order) selects the first ``k`` voxels of the row-major (x, y, z)
       flattening, i.e. a fixed slab of low x. Here that is done explicitly, per sample, for any
       batch size.
    3. Stage 0 (before any layer) and after every decoder layer: ``post_norm`` feeds ``class_embed``
       and ``mask_embed``; the mask logit of query q at voxel v is ``E_q . F0[v]`` at selected
       voxels and ``E_q . empty_token`` elsewhere. (Computed as one dense product with the
       unselected feature columns replaced by the token: the same values and gradients as the
       released gather / einsum / scatter, see ``benchmarks/bench_sparseocc_head.py``.)
    4. Decoder layer i reads memory level ``i % num_levels`` with the cross-attention mask built by
       :func:`masked_attention_mask` from the previous stage's mask logits.

    Training returns all ``num_layers + 1`` stages; inference computes them too (the masks need
    them) but returns only the last.

    Parameter names (released ``pts_bbox_head.*`` -> here): ``transformer_decoder.layers.i`` ->
    ``layers.i`` with ``attentions.0.attn`` -> ``cross_attn``, ``attentions.1.attn`` -> ``self_attn``,
    ``ffns.0.layers.0.0`` -> ``ffn.fc1``, ``ffns.0.layers.1`` -> ``ffn.fc2``, ``norms.0/1/2`` ->
    ``cross_attn_norm``/``self_attn_norm``/``ffn_norm``; ``transformer_decoder.post_norm`` ->
    ``post_norm``; ``query_feat`` -> ``query_content``; ``query_embed`` -> ``query_pos``;
    ``cls_embed`` -> ``class_embed``; ``level_embed``, ``mask_embed.{0,2,4}``, ``empty_token`` and
    ``occ_pred_conv.{0,1,3}`` unchanged. No layout changes.

    Args:
        num_classes: classes including the empty class 0.
        topk_ratio: fraction of voxels that keep their own features.
        softmax_over_batch_bug: see step 2 (released nuScenes quirk).
        class_frequencies: voxel counts per class; the coarse cross-entropy uses
            ``cross_entropy_class_weights(...)[:num_classes]``. Empty: unweighted.
        coarse_loss_weight: weight of each of the four coarse losses.
        coarse_norm_groups: GroupNorm groups in ``occ_pred_conv`` (32 as released).
        checkpoint_coarse: run ``occ_pred_conv`` under activation checkpointing while training.
        criterion: the matching loss (``MaskSetCriterion``); needed by :meth:`forward_train`.
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
        topk_ratio: float = 0.6,
        softmax_over_batch_bug: bool = False,
        class_frequencies: tuple[float, ...] | list[float] = (),
        coarse_loss_weight: float = 1.0,
        coarse_norm_groups: int = 32,
        checkpoint_coarse: bool = True,
        label_method: str = "bounded",
        criterion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_layers < 1 or num_levels < 1:
            raise ValueError(
                "SparseOccHead: num_classes, num_queries, num_layers and num_levels must be >= 1, got "
                f"{num_classes}, {num_queries}, {num_layers}, {num_levels}"
            )
        if embed_dims % 6 or embed_dims % num_heads:
            raise ValueError(
                f"SparseOccHead: embed_dims must be a multiple of 6 (3D sine PE) and of num_heads "
                f"{num_heads}, got {embed_dims}"
            )
        if not 0.0 <= topk_ratio <= 1.0:
            raise ValueError(f"SparseOccHead: topk_ratio must be in [0, 1], got {topk_ratio}")
        if (embed_dims // 2) % coarse_norm_groups:
            raise ValueError(
                f"SparseOccHead: occ_pred_conv width {embed_dims // 2} is not divisible by "
                f"coarse_norm_groups {coarse_norm_groups}"
            )
        if class_frequencies and len(class_frequencies) != num_classes:
            raise ValueError(
                f"SparseOccHead: class_frequencies has {len(class_frequencies)} entries, expected "
                f"num_classes = {num_classes}"
            )
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.num_levels = num_levels
        self.topk_ratio = topk_ratio
        self.softmax_over_batch_bug = softmax_over_batch_bug
        self.coarse_loss_weight = coarse_loss_weight
        self.checkpoint_coarse = checkpoint_coarse

        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(embed_dims=embed_dims, num_heads=num_heads, ffn_dims=ffn_dims)
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
        self.empty_token = nn.Embedding(1, embed_dims)
        self.occ_pred_conv = nn.Sequential(
            nn.Conv3d(embed_dims, embed_dims // 2, kernel_size=1),
            nn.GroupNorm(coarse_norm_groups, embed_dims // 2),
            nn.ReLU(inplace=True),
            nn.Conv3d(embed_dims // 2, num_classes, kernel_size=1),
        )
        weights = (
            cross_entropy_class_weights(class_frequencies)[:num_classes]
            if class_frequencies
            else [1.0] * num_classes
        )
        # not persistent: derived from the config, so checkpoints hold only the released tensors
        self.register_buffer("coarse_class_weights", torch.tensor(weights), persistent=False)
        if label_method not in LABEL_METHODS:
            raise ValueError(
                f"{type(self).__name__}: label_method must be one of {LABEL_METHODS}, got {label_method!r}"
            )
        self.label_method = label_method
        self.criterion = criterion
        self.reset_decoder_parameters()

    @classmethod
    def from_config(cls, head_cfg: HeadConfig, criterion: nn.Module | None = None) -> SparseOccHead:
        """The head of ``head_cfg`` (``type == "sparseocc"``); ``criterion`` defaults to
        ``MaskSetCriterion``."""
        if head_cfg.type != "sparseocc":
            raise ValueError(
                f"SparseOccHead.from_config: head.type must be 'sparseocc', got {head_cfg.type!r}"
            )
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
            topk_ratio=head_cfg.topk_ratio,
            softmax_over_batch_bug=head_cfg.softmax_over_batch_bug,
            class_frequencies=head_cfg.class_frequencies,
            coarse_loss_weight=head_cfg.coarse_loss_weight,
            coarse_norm_groups=head_cfg.coarse_norm_groups,
            label_method=head_cfg.label_method,
            criterion=criterion,
        )

    def reset_decoder_parameters(self) -> None:
        """Released init: xavier-normal on every >= 2-dim decoder tensor.

        Everything else keeps PyTorch's defaults (embeddings N(0, 1), Linear/Conv3d kaiming-uniform,
        LayerNorm/GroupNorm 1/0, attention biases 0).
        """
        for param in self.layers.parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)

    # ----------------------------------------------------------------------------------------------
    # public API

    def forward(self, voxel_feats: list[torch.Tensor], gt_occ: torch.Tensor | None = None) -> SparseOccOutput:
        """Predictions at every stage (training) or the last stage (eval), and the coarse logits.

        Args:
            voxel_feats: the neck output, ``num_levels + 1`` dense tensors [B, C, X, Y, Z]: index 0 =
                finest mask features, 1.. = coarser memories (used coarse to fine).
            gt_occ: accepted for symmetry with :class:`SpotOccHead`; the baseline has no denoising.
        """
        return self._decode(voxel_feats, all_stages=self.training)

    def forward_train(self, voxel_feats: list[torch.Tensor], gt_occ: torch.Tensor) -> dict[str, torch.Tensor]:
        """The criterion's matching losses on every stage plus the four coarse voxel losses."""
        if self.criterion is None:
            raise RuntimeError("SparseOccHead.forward_train: the head was built without a criterion")
        out = self.forward(voxel_feats, gt_occ)
        losses = dict(self.criterion(out.cls_logits, out.mask_logits, gt_occ))
        losses.update(
            coarse_voxel_losses(
                out.coarse_logits,
                gt_occ,
                class_weights=self.coarse_class_weights,
                loss_weight=self.coarse_loss_weight,
            )
        )
        return losses

    def predict_logits(self, voxel_feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-stage class probabilities [B, Q, C] (softmax over C + 1, no-object column dropped, not
        renormalised) and mask logits [B, Q, X0, Y0, Z0]."""
        out = self._decode(voxel_feats, all_stages=False)
        class_probs = out.cls_logits[-1].softmax(dim=-1)[..., :-1]
        return class_probs, out.mask_logits[-1]

    def predict(self, voxel_feats: list[torch.Tensor], out_size: tuple[int, int, int]) -> torch.Tensor:
        """int64 labels [B, *out_size] (see :func:`spotocc.models.labels.occupancy_labels`)."""
        class_probs, mask_logits = self.predict_logits(voxel_feats)
        return occupancy_labels(class_probs, mask_logits, out_size, self.label_method)

    def coarse_occupancy(self, mask_feats: torch.Tensor) -> torch.Tensor:
        """``occ_pred_conv`` of the detached mask features [B, C, X0, Y0, Z0] -> [B, N_cls, X0, Y0, Z0]."""
        x = mask_feats.detach()
        if self.checkpoint_coarse and self.training and torch.is_grad_enabled():
            return checkpoint(self.occ_pred_conv, x, use_reentrant=False)
        return self.occ_pred_conv(x)

    def select_voxels(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """bool [B, N0]: the voxels whose own features enter the masks (``int(topk_ratio * N0)`` each)."""
        batch = coarse_logits.shape[0]
        num_voxels = coarse_logits[0, 0].numel()
        k = int(num_voxels * self.topk_ratio)  # as released: int(W * H * D * 0.6)
        selected = torch.zeros(batch, num_voxels, dtype=torch.bool, device=coarse_logits.device)
        if self.softmax_over_batch_bug:
            selected[:, :k] = True  # released nuScenes: all scores 0, CUDA top-k keeps the first k
            return selected
        with torch.no_grad():
            probs = coarse_logits.detach().float().flatten(2).softmax(dim=1)  # [B, N_cls, N0]
            non_empty = 1.0 - probs[:, 0]  # [B, N0]
            index = non_empty.topk(k, dim=1, sorted=False).indices
        return selected.scatter_(1, index, True)

    # ----------------------------------------------------------------------------------------------
    # internals

    def _decode(self, voxel_feats: list[torch.Tensor], *, all_stages: bool) -> SparseOccOutput:
        self._check_features(voxel_feats)
        mask_feats = voxel_feats[0]
        batch, channels = mask_feats.shape[:2]
        mask_grid = tuple(mask_feats.shape[2:])

        coarse_logits = self.coarse_occupancy(mask_feats)
        selected = self.select_voxels(coarse_logits)  # [B, N0]
        token = self.empty_token.weight.view(1, channels, 1)
        mask_source = torch.where(selected[:, None, :], mask_feats.flatten(2), token)  # [B, C, N0]

        memories, positions, level_sizes = [], [], []
        for level in range(self.num_levels):
            feats = voxel_feats[self.num_levels - level]  # coarse to fine
            size = tuple(feats.shape[2:])
            memories.append(feats.flatten(2).transpose(1, 2) + self.level_embed.weight[level])  # [B, K, C]
            positions.append(self.positional_encoding(size, device=feats.device, dtype=feats.dtype))  # [K, C]
            level_sizes.append(size)

        queries = self.query_content.weight.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, C]
        pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        cls_logits, mask_logits = [], []

        cls, masks = self._predict(queries, mask_source, mask_grid)
        if all_stages:
            cls_logits.append(cls)
            mask_logits.append(masks)
        attn_mask = masked_attention_mask(masks, level_sizes[0], self.num_heads)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            queries = layer(queries, memories[level], pos, positions[level], cross_attn_mask=attn_mask)
            cls, masks = self._predict(queries, mask_source, mask_grid)
            if all_stages or i == last:
                cls_logits.append(cls)
                mask_logits.append(masks)
            if i < last:  # the last stage's mask would feed no layer
                attn_mask = masked_attention_mask(
                    masks, level_sizes[(i + 1) % self.num_levels], self.num_heads
                )

        return SparseOccOutput(cls_logits=cls_logits, mask_logits=mask_logits, coarse_logits=coarse_logits)

    def _predict(
        self, queries: torch.Tensor, mask_source: torch.Tensor, mask_grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [B, Q, C + 1] and mask logits [B, Q, X0, Y0, Z0] of queries [B, Q, C]."""
        x = self.post_norm(queries)
        cls = self.class_embed(x)
        masks = torch.bmm(self.mask_embed(x), mask_source)  # [B, Q, N0]
        return cls, masks.view(*masks.shape[:2], *mask_grid)

    def _check_features(self, voxel_feats: list[torch.Tensor]) -> None:
        if len(voxel_feats) != self.num_levels + 1:
            raise ValueError(
                f"SparseOccHead: expected {self.num_levels + 1} voxel feature volumes (mask features + "
                f"{self.num_levels} memory levels), got {len(voxel_feats)}"
            )
        batch = voxel_feats[0].shape[0]
        for index, feats in enumerate(voxel_feats):
            if feats.dim() != 5 or feats.shape[0] != batch or feats.shape[1] != self.embed_dims:
                raise ValueError(
                    f"SparseOccHead: voxel_feats[{index}] must be [B={batch}, C={self.embed_dims}, X, Y, Z], "
                    f"got {tuple(feats.shape)}"
                )
