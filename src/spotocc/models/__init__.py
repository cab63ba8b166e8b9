"""Occupancy models: image backbone, LSS view transformer, sparse voxel encoder and neck, heads."""

from spotocc.models.heads.spot import SpotCrossAttention

__all__ = ["SpotCrossAttention"]
