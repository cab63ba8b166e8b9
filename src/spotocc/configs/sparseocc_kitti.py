"""Preset `sparseocc_kitti`: the SparseOcc baseline on SemanticKITTI as released (12.21 mIoU)."""

from spotocc.config import Config
from spotocc.configs._base import semantic_kitti


def config() -> Config:
    return semantic_kitti("sparseocc_kitti", head_type="sparseocc")
