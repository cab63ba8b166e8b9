"""Preset `spotocc_kitti`: SPOT-Occ on SemanticKITTI as released (13.27 mIoU on val)."""

from spotocc.config import Config
from spotocc.configs._base import semantic_kitti


def config() -> Config:
    return semantic_kitti("spotocc_kitti", head_type="spot")
