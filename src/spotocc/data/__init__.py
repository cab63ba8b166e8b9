"""Datasets, augmentation, depth targets and the synthetic scene generator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotocc.data.batch import collate
from spotocc.data.files import DataFileError, MissingFileError
from spotocc.data.nuscenes_occ import NuScenesOccupancy
from spotocc.data.semantic_kitti import SemanticKITTI

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from spotocc.config import Config

__all__ = [
    "DataFileError",
    "MissingFileError",
    "NuScenesOccupancy",
    "SemanticKITTI",
    "build_dataset",
    "collate",
]

FORMATS = ("semantickitti", "nuscenes-occupancy")


def build_dataset(cfg: Config, split: str, *, train: bool | None = None) -> Dataset:
    """The dataset of ``cfg.data.format`` for ``split``.

    ``train=True`` turns on random augmentation and depth targets; by default it is on exactly for
    ``cfg.data.train_split``. SemanticKITTI splits: train, val, test, trainval, test-submit.
    nuScenes-Occupancy splits: ``train`` / ``val`` (``cfg.data.train_info`` / ``val_info``), or the
    path of an info ``.pkl``.
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
    raise ValueError(f"unknown data.format {data.format!r}; expected one of {FORMATS}")
