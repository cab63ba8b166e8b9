"""Preset `spotocc_nusc_256`: SPOT-Occ on nuScenes-Occupancy as released (13.72 mIoU on val)."""

from spotocc.config import Config
from spotocc.configs._base import nuscenes_occupancy


def config() -> Config:
    return nuscenes_occupancy("spotocc_nusc_256", head_type="spot")
