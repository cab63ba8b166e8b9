"""Preset `sparseocc_occ3d`: the SparseOcc baseline on Occ3D-nuScenes (camera-mask mIoU, RayIoU).

The nuScenes image side (6 cameras at 256x704, ResNet-50) on Occ3D's 200x200x16 grid; what differs
from ``sparseocc_nusc_256`` and why is in :func:`spotocc.configs._base.occ3d_nuscenes`. No published
weights exist for this setting: it trains from the ImageNet backbone.

As in ``sparseocc_nusc_256``, ``head.softmax_over_batch_bug`` is off (see that preset).
"""

from spotocc.config import Config
from spotocc.configs._base import occ3d_nuscenes


def config() -> Config:
    cfg = occ3d_nuscenes("sparseocc_occ3d", head_type="sparseocc")
    cfg.model.head.softmax_over_batch_bug = False  # as in sparseocc_nusc_256
    return cfg
