"""Generated Occ3D scenes: written files read back exactly, and the reader's cameras see the GT voxels.

The projection test goes from the renderer's own per-pixel hits (camera depth and hit voxel) through
the reader's rots / trans / intrins to the ego frame: the 3D point of a pixel must lie in the GT voxel
the renderer hit, and the reader's label there must be that surface's class.
"""

import json
import pickle

import numpy as np
import pytest
import torch

from spotocc.config import GridConfig
from spotocc.data import Occ3DNuScenes
from spotocc.data.synthetic import generate, make_sample
from spotocc.data.synthetic.kinds import OCC3D_MODEL_CLASS
from spotocc.data.synthetic.occ3d_format import INFO_FILES, ROOT

GRID = GridConfig(
    point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(50, 50, 8), lss_downsample=2
)
IMAGE = (45, 80)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("occ3d_synth")
    summary = generate(out, "occ3d-nuscenes", num_train=2, num_val=1, seed=3, grid=GRID, image_size=IMAGE)
    return out, summary


def _reader(out, sample_list, split="train", **kwargs):
    return Occ3DNuScenes(
        out / ROOT, sample_list, split=split, gts_root=out / ROOT / "gts", input_size=IMAGE,
        occ_size=GRID.occ_size, point_cloud_range=GRID.point_cloud_range, **kwargs,
    )  # fmt: skip


def test_both_lists_read_back_the_generated_samples(synth):
    out, summary = synth
    assert summary.format == "occ3d-nuscenes" and len(summary.class_voxels["train"]) == 18
    root = out / ROOT
    infos = pickle.loads((root / INFO_FILES["train"]).read_bytes())["infos"]
    annotations = json.loads((root / "annotations.json").read_text())
    assert (
        annotations["train_split"] == [i["scene_name"] for i in infos] and len(annotations["val_split"]) == 1
    )
    from_pkl = _reader(out, root / INFO_FILES["train"])
    from_json = _reader(out, root / "annotations.json")
    for index in range(2):
        expected = make_sample("occ3d-nuscenes", "train", index, seed=3, grid=GRID, image_size=IMAGE)
        a, b = from_pkl[index], from_json[index]
        assert a["meta"]["sample_id"] == b["meta"]["sample_id"]
        for sample in (a, b):
            assert (sample["gt_occ"].numpy() == expected.gt).all()
            assert (sample["mask_lidar"].numpy() == expected.extras["mask_lidar"]).all()
            assert (sample["mask_camera"].numpy() == expected.extras["mask_camera"]).all()
        for key in ("rots", "trans", "intrins", "img"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
        mask_camera, mask_lidar = expected.extras["mask_camera"], expected.extras["mask_lidar"]
        assert (
            mask_camera.any() and (mask_lidar | ~mask_camera).all() and mask_lidar.mean() > mask_camera.mean()
        )
    assert len(_reader(out, root / "annotations.json", split="val")) == 1


def test_reader_cameras_put_every_pixel_hit_in_its_gt_voxel(synth):
    out, _ = synth
    dataset = _reader(out, out / ROOT / INFO_FILES["train"])
    sample = dataset[0]
    expected = make_sample("occ3d-nuscenes", "train", 0, seed=3, grid=GRID, image_size=IMAGE)
    world = expected.scene.world
    lo = np.asarray(GRID.point_cloud_range[:3])
    voxel = np.asarray(GRID.occ_voxel_size)
    checked = agree = 0
    for camera, render in zip(expected.cameras, expected.renders):
        n = dataset.cameras.index(camera.name)  # the reader's camera order is the config's
        v, u = np.nonzero(render.voxel >= 0)
        hit = np.stack(np.unravel_index(render.voxel[v, u], world.shape), axis=1) - np.asarray(
            world.gt_offset
        )
        inside = np.all((hit >= 0) & (hit < np.asarray(GRID.occ_size)), axis=1)
        v, u, hit = v[inside], u[inside], hit[inside]
        depth = render.depth[v, u].astype(np.float64)
        K = sample["intrins"][n][:3, :3].double().numpy()
        cam = depth[:, None] * (np.linalg.inv(K) @ np.stack([u, v, np.ones_like(u)]).astype(np.float64)).T
        ego = cam @ sample["rots"][n].double().numpy().T + sample["trans"][n].double().numpy()  # [P, 3]
        # the hit point lies on the entered face: a millimetre further along the ray is inside the voxel
        ray = ego - sample["trans"][n].double().numpy()
        inside_point = ego + 1e-3 * ray / np.linalg.norm(ray, axis=1, keepdims=True)
        idx = np.floor((inside_point - lo) / voxel).astype(np.int64)
        assert (idx == hit).all(axis=1).mean() > 0.995
        labels = sample["gt_occ"].numpy()[tuple(hit.T)]
        kinds = render.kind[v, u]
        checked += labels.size
        agree += int((labels == OCC3D_MODEL_CLASS[kinds]).sum())
        assert sample["mask_camera"].numpy()[tuple(hit.T)].mean() > 0.95  # what a camera hits, it sees
    assert checked > 1000 and agree / checked > 0.99
