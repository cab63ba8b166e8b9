"""Procedural street scenes written in the real dataset layouts (SemanticKITTI, nuScenes-Occupancy, Occ3D).

A newcomer without a dataset can run the whole pipeline on them. Each scene is a randomly laid-out
street (road with random offset, heading, curvature and lanes; sidewalks, parking, buildings,
terrain, trees, fences, poles, signs, vehicles, people, cones, barriers) rasterised into a voxel grid
at the GT resolution, then ray-cast into camera images (per-class colours with shading, texture, sky
and noise) and a spinning multi-beam LiDAR scan. See :func:`generate` and :func:`make_sample`.

Modules: ``kinds`` (what a scene is made of, label ids, colours), ``layout`` (the procedural scene),
``geometry`` (world grid, calibration, camera rigs), ``raycast`` (exact voxel ray casting),
``render`` (images, scans, observability), ``visibility`` (Occ3D's LiDAR and camera masks),
``sample`` (one sample in memory), ``kitti_format`` / ``nuscenes_format`` / ``occ3d_format``
(writers), ``generate`` (the dataset), ``baseline`` (image-blind baseline).
"""

from spotocc.data.synthetic.baseline import most_frequent_labels, ssc_scores
from spotocc.data.synthetic.generate import SyntheticSummary, data_overrides, generate, source_image_size
from spotocc.data.synthetic.kinds import KINDS, SEMANTIC_KITTI_LEARNING_MAP, SEMANTIC_KITTI_LEARNING_MAP_INV
from spotocc.data.synthetic.sample import (
    DEFAULT_GRIDS,
    DEFAULT_IMAGE_SIZES,
    FORMATS,
    SyntheticSample,
    make_sample,
)

__all__ = [
    "DEFAULT_GRIDS",
    "DEFAULT_IMAGE_SIZES",
    "FORMATS",
    "KINDS",
    "SEMANTIC_KITTI_LEARNING_MAP",
    "SEMANTIC_KITTI_LEARNING_MAP_INV",
    "SyntheticSample",
    "SyntheticSummary",
    "data_overrides",
    "generate",
    "make_sample",
    "most_frequent_labels",
    "source_image_size",
    "ssc_scores",
]
