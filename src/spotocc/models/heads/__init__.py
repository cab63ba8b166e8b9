"""Mask-classification occupancy heads (SPOT-Occ and the SparseOcc baseline) and their parts."""

from spotocc.models.heads.sparseocc import (
    MaskedAttentionDecoderLayer,
    SparseOccHead,
    SparseOccOutput,
    masked_attention_mask,
)
from spotocc.models.heads.spot import HeadOutput, SpotDecoderLayer, SpotOccHead
from spotocc.models.heads.spot_attention import SpotCrossAttention

__all__ = [
    "HeadOutput",
    "MaskedAttentionDecoderLayer",
    "SparseOccHead",
    "SparseOccOutput",
    "SpotCrossAttention",
    "SpotDecoderLayer",
    "SpotOccHead",
    "masked_attention_mask",
]
