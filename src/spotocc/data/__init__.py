"""Datasets, augmentation, depth targets and the synthetic scene generator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotocc.data.batch import collate
from spotocc.data.files import DataFileError, MissingFileError
from spotocc.data.nuscenes_occ import NuScenesOccupancy
from spotocc.data.occ3d_nuscenes import Occ3DNuScenes
from spotocc.data.semantic_kitti import SemanticKITTI

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from spotocc.config import Config

__all__ = [
    "DataFileError",
    "MissingFileError",
    "NuScenesOccupancy",
    "Occ3DNuScenes",
    "SemanticKITTI",
    "build_dataset",
    "collate",
]

FORMATS = ("semantickitti", "nuscenes-occupancy", "occ3d-nuscenes")


def build_dataset(cfg: Config, split: str, *, train: bool | None = None) -> Dataset:
    """The dataset of ``cfg.data.format`` for ``split``.

    ``train=True`` turns on random augmentation and depth targets; by default it is on exactly for
    ``cfg.data.train_split``. SemanticKITTI splits: train, val, test, trainval, test-submit.
    nuScenes-Occupancy splits: ``train`` / ``val`` (``cfg.data.train_info`` / ``val_info``), or the
    path of an info ``.pkl``. Occ3D-nuScenes: ``train`` / ``val`` likewise (an annotations.json is read
    for its ``<split>_split``), or the path of a sample list (``.pkl``, or ``.json`` read for ``val``).
    """
    data = cfg.data
    if train is None:
        train = split == data.train_split
    if data.format == "semantickitti":
        return SemanticKITTI(
            data.root,
            split,
            occ_size=cfg.grid.occ_size,
            point_cloud_range=cfg.grid.point_cloud_range,
            input_size=data.input_size,
            cameras=data.cameras,
            augmentation=data.augmentation,
            train=train,
            every_5th_scan=data.every_5th_scan,
            bgr_input=data.bgr_input,
        )
    if data.format == "nuscenes-occupancy":
        infos = {"train": data.train_info, "val": data.val_info}
        if split in infos:
            info_file = infos[split]
        elif split.endswith(".pkl"):
            info_file = split
        else:
            raise ValueError(
                f"unknown nuScenes-Occupancy split {split!r}; expected 'train', 'val' or an info .pkl path"
            )
        return NuScenesOccupancy(
            data.root,
            info_file,
            data.occ_root,
            depth_root=data.depth_root,
            cameras=data.cameras,
            input_size=data.input_size,
            occ_size=cfg.grid.occ_size,
            point_cloud_range=cfg.grid.point_cloud_range,
            augmentation=data.augmentation,
            train=train,
            bgr_input=data.bgr_input,
        )
    if data.format == "occ3d-nuscenes":
        lists = {"train": data.train_info, "val": data.val_info}
        if split in lists:
            sample_list, list_split = lists[split], split
        elif split.endswith((".pkl", ".json")):
            sample_list, list_split = split, "val"
        else:
            raise ValueError(
                f"unknown Occ3D split {split!r}; expected 'train', 'val' or a sample list (.pkl / .json)"
            )
        return Occ3DNuScenes(
            data.root,
            sample_list,
            split=list_split,
            gts_root=data.occ_root or None,
            depth_root=data.depth_root,
            gt_mask=data.gt_mask,
            cameras=data.cameras,
            input_size=data.input_size,
            occ_size=cfg.grid.occ_size,
            point_cloud_range=cfg.grid.point_cloud_range,
            augmentation=data.augmentation,
            train=train,
            bgr_input=data.bgr_input,
        )
    raise ValueError(f"unknown data.format {data.format!r}; expected one of {FORMATS}")
