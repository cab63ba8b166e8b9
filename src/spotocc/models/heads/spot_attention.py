"""SPOT cross-attention (released ``SPOT_CA``): every query attends to its most similar keys only.

Spec 03 (SPOT cross-attention). Used by :class:`spotocc.models.heads.spot.SpotDecoderLayer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SpotCrossAttention(nn.Module):
    """Sparse-prototype cross-attention (released ``SPOT_CA``), batch-first.

    Per head, every query keeps its ``k`` most cosine-similar keys and averages their *raw* values
    (key + key_pos, no value projection) with softmax weights over ``cos / sqrt(head_dim)``. With
    ``U`` the merged prototypes and ``Qp`` the projected query::

        I = proj(U * Qp);  I_hat = I / ||I||  (over the QUERY axis, per sample and channel)
        out = query + dropout(final(alpha * I_hat + U))

    ``k = max(min_k, min(ceil(pruning_ratio * K), K))``, further capped at ``K`` (the released code
    fails when ``min_k > K``; everywhere else this is its rule).

    Implementation: instead of gathering a ``[B, H, Q, k, D]`` tensor of values, the top-k softmax
    weights are scattered into the (no longer needed) similarity buffer and applied with one dense
    matmul, which also keeps the backward free of a ``[B, H, Q, K, D]`` gradient buffer.

    Masks and edge cases:

    - ``attn_mask`` bool [B, Q, K], True = may not attend (same for every head). A row that blocks
      every key selects no prototype: its aggregate ``U`` is zero (the released code gives NaN and,
      through the query-axis normalisation, spreads it to every query of the sample).
    - ``query_padding_mask`` bool [B, Q], True = padding query (e.g. a DN slot without a GT). Padding
      rows are left out of the query-axis norm, so they cannot change the other queries' outputs;
      their own output is finite but meaningless.
    - ``fix_interaction_norm=True`` normalises ``I`` over channels instead of queries (a deliberate fix:
      each query's output then no longer depends on the other queries). Off = released behaviour.

    Args:
        embed_dims: C.
        num_heads: H (``C % H == 0``).
        pruning_ratio: rho, the kept fraction of keys.
        min_k: lower bound of k.
        dropout: on the output before the residual.
        fix_interaction_norm: see above.
    """

    def __init__(
        self,
        embed_dims: int = 192,
        num_heads: int = 6,
        pruning_ratio: float = 0.08,
        min_k: int = 10,
        *,
        dropout: float = 0.0,
        fix_interaction_norm: bool = False,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(
                f"SpotCrossAttention: embed_dims {embed_dims} not divisible by num_heads {num_heads}"
            )
        if not 0.0 < pruning_ratio <= 1.0:
            raise ValueError(f"SpotCrossAttention: pruning_ratio must be in (0, 1], got {pruning_ratio}")
        if min_k < 1:
            raise ValueError(f"SpotCrossAttention: min_k must be >= 1, got {min_k}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dim = embed_dims // num_heads
        self.pruning_ratio = pruning_ratio
        self.min_k = min_k
        self.fix_interaction_norm = fix_interaction_norm
        self.query_proj = nn.Sequential(nn.LayerNorm(embed_dims), nn.Linear(embed_dims, embed_dims))
        self.key_proj = nn.Sequential(nn.LayerNorm(embed_dims), nn.Linear(embed_dims, embed_dims))
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.final = nn.Linear(embed_dims, embed_dims)
        self.alpha = nn.Parameter(torch.empty(1, 1, embed_dims))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The module's own init (xavier-uniform matrices, alpha = 0.1); the head re-initialises it."""
        for name, param in self.named_parameters():
            if param.dim() > 1 and name != "alpha":
                nn.init.xavier_uniform_(param)
        nn.init.constant_(self.alpha, 0.1)

    def num_selected(self, num_keys: int) -> int:
        """k for ``num_keys`` keys: ``max(min_k, min(ceil(rho * K), K))``, capped at K."""
        return min(num_keys, max(self.min_k, min(math.ceil(self.pruning_ratio * num_keys), num_keys)))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor | None = None,
        key_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        query_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, C], key [B, K, C] (+ optional positions of the same shapes) -> [B, Q, C]."""
        self._check_inputs(query, key, query_pos, key_pos, attn_mask, query_padding_mask)
        batch, num_queries, channels = query.shape
        num_keys = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        residual = query
        query = query if query_pos is None else query + query_pos
        key = key if key_pos is None else key + key_pos  # also the values: raw key + position
        query_proj = self.query_proj(query)  # [B, Q, C]
        key_proj = self.key_proj(key)  # [B, K, C]
        query_unit = F.normalize(query_proj.view(batch, num_queries, heads, head_dim), dim=-1)
        key_unit = F.normalize(key_proj.view(batch, num_keys, heads, head_dim), dim=-1)
        values = key.view(batch, num_keys, heads, head_dim).transpose(1, 2)  # [B, H, K, D]

        prototypes = self._aggregate_top_k(
            query_unit.transpose(1, 2), key_unit.transpose(1, 2), values, attn_mask
        )  # [B, H, Q, D]
        prototypes = prototypes.transpose(1, 2).reshape(batch, num_queries, channels)  # [B, Q, C]

        interaction = self.proj(prototypes * query_proj)  # [B, Q, C]
        interaction = self._normalize_interaction(interaction, query_padding_mask)
        out = self.final(interaction * self.alpha + prototypes)
        return residual + self.dropout(out)

    def _aggregate_top_k(
        self,
        query_unit: torch.Tensor,
        key_unit: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Softmax-weighted mean of each (query, head)'s top-k values -> [B, H, Q, D]."""
        num_keys = key_unit.shape[2]
        sim = query_unit @ key_unit.transpose(-1, -2)  # [B, H, Q, K] cosine similarities
        blocked_rows = None
        if attn_mask is not None:
            sim.masked_fill_(attn_mask.unsqueeze(1), float("-inf"))
            blocked_rows = attn_mask.all(dim=-1)[:, None, :, None]  # [B, 1, Q, 1]
        top_sim, top_index = sim.topk(self.num_selected(num_keys), dim=-1, sorted=False)  # [B, H, Q, k]
        if blocked_rows is not None:
            top_sim = top_sim.masked_fill(blocked_rows, 0.0)  # keep the softmax finite
        weights = torch.softmax(top_sim * self.head_dim**-0.5, dim=-1)
        if blocked_rows is not None:
            weights = weights.masked_fill(blocked_rows, 0.0)  # no key allowed: empty prototype set
        # Reuse the similarity buffer for the dense weights: autograd keeps no reference to its values
        # (the matmul saved its inputs, topk only its indices), so overwriting it in place is safe.
        dense = sim.detach().zero_().scatter_(-1, top_index, weights.to(sim.dtype))  # [B, H, Q, K]
        return dense @ values.to(dense.dtype)  # [B, H, Q, D]

    def _normalize_interaction(
        self, interaction: torch.Tensor, query_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.fix_interaction_norm:
            return F.normalize(interaction, dim=-1)
        if query_padding_mask is None:
            return F.normalize(interaction, dim=1)  # released: across queries, per sample and channel
        kept = interaction.masked_fill(query_padding_mask.unsqueeze(-1), 0.0)
        norm = torch.linalg.vector_norm(kept, dim=1, keepdim=True)  # [B, 1, C]
        return interaction / norm.clamp_min(1e-12)

    def _check_inputs(self, query, key, query_pos, key_pos, attn_mask, query_padding_mask) -> None:
        name = type(self).__name__
        if query.dim() != 3 or key.dim() != 3:
            raise ValueError(
                f"{name}: query and key must be [B, Q, C] and [B, K, C], got {tuple(query.shape)} "
                f"and {tuple(key.shape)}"
            )
        batch, num_queries, channels = query.shape
        if channels != self.embed_dims or key.shape[2] != self.embed_dims or key.shape[0] != batch:
            raise ValueError(
                f"{name}: expected query [B, Q, {self.embed_dims}] and key [B, K, {self.embed_dims}] with "
                f"the same B, got {tuple(query.shape)} and {tuple(key.shape)}"
            )
        if key.shape[1] == 0:
            raise ValueError(f"{name}: key has no elements (K = 0)")
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(f"{name}: query_pos {tuple(query_pos.shape)} != query {tuple(query.shape)}")
        if key_pos is not None and key_pos.shape != key.shape:
            raise ValueError(f"{name}: key_pos {tuple(key_pos.shape)} != key {tuple(key.shape)}")
        if attn_mask is not None and (
            attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (batch, num_queries, key.shape[1])
        ):
            raise ValueError(
                f"{name}: attn_mask must be bool [B, Q, K] = {(batch, num_queries, key.shape[1])}, got "
                f"{attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        if query_padding_mask is not None and (
            query_padding_mask.dtype != torch.bool or tuple(query_padding_mask.shape) != (batch, num_queries)
        ):
            raise ValueError(
                f"{name}: query_padding_mask must be bool [B, Q] = {(batch, num_queries)}, got "
                f"{query_padding_mask.dtype} {tuple(query_padding_mask.shape)}"
            )
