"""RayIoU's ray origins from the Occ3D reader: the scene's key-frame LiDAR origins in the sample's ego
frame, checked against hand-placed poses (frames 10 m apart along the ego's x axis)."""

import dataclasses

import numpy as np
import pytest

from spotocc.config import GridConfig
from spotocc.data import Occ3DNuScenes
from spotocc.data.synthetic import generate
from spotocc.data.synthetic.geometry import NUSCENES_LIDAR_TO_EGO_TRANSLATION
from spotocc.data.synthetic.occ3d_format import INFO_FILES, ROOT
from spotocc.data.transforms import BevFlips
from spotocc.evaluation.ray_iou import NUSCENES_LIDAR_ORIGIN

GRID = GridConfig(point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(50, 50, 4))
IMAGE = (18, 32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("occ3d_origins")
    generate(out, "occ3d-nuscenes", num_train=1, num_val=1, seed=5, grid=GRID, image_size=IMAGE)
    return out


def _reader(out, sample_list, split="train"):
    return Occ3DNuScenes(
        out / ROOT, out / ROOT / sample_list, split=split, gts_root=out / ROOT / "gts", input_size=IMAGE,
        occ_size=GRID.occ_size, point_cloud_range=GRID.point_cloud_range,
    )  # fmt: skip


def test_a_single_frame_scene_casts_from_its_own_lidar(tree):
    from_pkl = _reader(tree, INFO_FILES["train"])
    assert np.allclose(from_pkl[0]["meta"]["ray_origins"], [NUSCENES_LIDAR_TO_EGO_TRANSLATION])
    from_json = _reader(tree, "annotations.json")  # no LiDAR calibration there: nuScenes' mounting
    assert np.allclose(from_json[0]["meta"]["ray_origins"], [NUSCENES_LIDAR_ORIGIN])


def test_neighbouring_frames_give_origins_in_the_sample_ego_frame(tree):
    dataset = _reader(tree, INFO_FILES["train"])
    base = dataset.records[0]
    frames = []
    for k, dx in enumerate((-10.0, 0.0, 10.0, 60.0)):  # the last is beyond 39 m: dropped
        shift = np.eye(4)
        shift[0, 3] = dx
        frames.append(
            dataclasses.replace(base, token=f"t{k}", scene_name="s", ego_to_global=base.ego_to_global @ shift)
        )
    dataset.records, dataset.scene_frames = frames, {"s": [0, 1, 2, 3]}
    t = np.asarray(NUSCENES_LIDAR_TO_EGO_TRANSLATION)
    expected = np.stack([t + [-10.0, 0, 0], t, t + [10.0, 0, 0]])
    assert np.allclose(dataset.ray_origins(1), expected, atol=1e-9)
    assert np.allclose(dataset.ray_origins(0)[:, 0], t[0] + np.array([0.0, 10.0, 20.0]), atol=1e-9)
    flipped = dataset.ray_origins(1, BevFlips(x=True))
    assert np.allclose(flipped[:, 0], -expected[:, 0]) and np.allclose(flipped[:, 1:], expected[:, 1:])
    dataset.records = [dataclasses.replace(f, scene_name="") for f in frames]
    assert dataset.ray_origins(1) is None
