"""Mask-classification occupancy heads (SPOT-Occ and the SparseOcc baseline) and their parts."""

from spotocc.models.heads.spot import HeadOutput, SpotCrossAttention, SpotDecoderLayer, SpotOccHead

__all__ = ["HeadOutput", "SpotCrossAttention", "SpotDecoderLayer", "SpotOccHead"]
