"""Occupancy models: image backbone, LSS view transformer, sparse voxel encoder and neck, heads."""

from spotocc.models.heads.spot_attention import SpotCrossAttention
from spotocc.models.occupancy import OccupancyModel, build_model

__all__ = ["OccupancyModel", "SpotCrossAttention", "build_model"]
