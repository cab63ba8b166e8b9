"""Preset `sparseocc_nusc_256`: the SparseOcc baseline on nuScenes-Occupancy as released (13.19 mIoU)."""

from spotocc.config import Config
from spotocc.configs._base import nuscenes_occupancy


def config() -> Config:
    return nuscenes_occupancy("sparseocc_nusc_256", head_type="sparseocc")
