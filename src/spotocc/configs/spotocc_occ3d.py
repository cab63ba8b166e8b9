"""Preset `spotocc_occ3d`: SPOT-Occ on Occ3D-nuScenes (camera-mask mIoU, RayIoU).

The nuScenes image side (6 cameras at 256x704, ResNet-50) on Occ3D's 200x200x16 grid; what differs
from ``spotocc_nusc_256`` and why is in :func:`spotocc.configs._base.occ3d_nuscenes`. No published
weights exist for this setting: it trains from the ImageNet backbone.
"""

from spotocc.config import Config
from spotocc.configs._base import occ3d_nuscenes


def config() -> Config:
    return occ3d_nuscenes("spotocc_occ3d", head_type="spot")
