"""Occ3DNuScenes against a tiny tree written here by hand (numpy / json / pickle), in both list forms.

Nothing here uses spotocc's writers or its quaternion code: poses go through scipy's Rotation, labels
are remapped with np.where, so the reader is checked against an independent reading of the format.
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from spotocc.data import DataFileError, MissingFileError, Occ3DNuScenes, collate
from spotocc.data.classes import OCC3D_CLASSES, model_to_occ3d_ids, occ3d_to_model_ids
from spotocc.data.occ3d_nuscenes import read_labels

RANGE = (-8.0, -8.0, -1.0, 8.0, 8.0, 2.2)
OCC = (20, 20, 4)  # 0.8 m voxels
IMAGE_WH = (32, 18)
INPUT = (18, 32)
CAMS = ("CAM_FRONT", "CAM_BACK")
K = np.array([[20.0, 0.0, 16.0], [0.0, 20.0, 9.0], [0.0, 0.0, 1.0]])
# (scene, token, timestamp, key ego translation, key ego yaw (deg), ego moved by at camera time (m))
FRAMES = [
    ("scene-0002", "tok-b0", 3_000_000, [100.0, 200.0, 0.0], 0.0, 1.0),
    ("scene-0002", "tok-b1", 3_500_000, [105.0, 200.0, 0.0], 30.0, -0.5),
    ("scene-0001", "tok-a0", 1_000_000, [10.0, 20.0, 0.0], -90.0, 0.0),
]


def _quat_wxyz(rot: Rotation) -> list[float]:
    x, y, z, w = rot.as_quat()
    return [float(w), float(x), float(y), float(z)]


def _pose(q_wxyz, t):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_quat([q_wxyz[1], q_wxyz[2], q_wxyz[3], q_wxyz[0]]).as_matrix()
    m[:3, 3] = t
    return m


def _camera(frame_index: int, cam: str):
    """(sensor2ego q, t, cam ego2global q, t) of a camera of a frame."""
    _, _, _, key_t, yaw, moved = FRAMES[frame_index]
    cam_yaw = 0.0 if cam == "CAM_FRONT" else 180.0
    q = _quat_wxyz(
        Rotation.from_euler("z", cam_yaw, degrees=True) * Rotation.from_quat([-0.5, 0.5, -0.5, 0.5])
    )
    t = [1.5, 0.0, 1.5] if cam == "CAM_FRONT" else [-1.0, 0.0, 1.6]
    key_rot = Rotation.from_euler("z", yaw, degrees=True)
    ego_t = list(np.asarray(key_t) + key_rot.apply([moved, 0.0, 0.0]))
    ego_q = _quat_wxyz(key_rot * Rotation.from_euler("z", 2.0 * moved, degrees=True))
    return q, t, ego_q, ego_t


def expected_cam_to_ego(frame_index: int, cam: str) -> np.ndarray:
    _, _, _, key_t, yaw, _ = FRAMES[frame_index]
    q, t, ego_q, ego_t = _camera(frame_index, cam)
    key = _pose(_quat_wxyz(Rotation.from_euler("z", yaw, degrees=True)), key_t)
    return np.linalg.inv(key) @ _pose(ego_q, ego_t) @ _pose(q, t)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An Occ3D trainval folder (imgs/, gts/, annotations.json), a nuScenes root with BEVDet infos
    pointing at the same images and labels, and depth_gt files."""
    root = tmp_path_factory.mktemp("occ3d")
    rng = np.random.default_rng(0)
    scenes: dict = {}
    infos = []
    labels = {}
    for i, (scene, token, stamp, key_t, yaw, _) in enumerate(FRAMES):
        sem = rng.integers(0, 18, OCC).astype(np.uint8)
        mask_lidar = (rng.random(OCC) < 0.7).astype(np.uint8)
        mask_camera = (mask_lidar & (rng.random(OCC) < 0.6)).astype(np.uint8)
        gt_dir = root / "nuscenes" / "gts" / scene / token
        gt_dir.mkdir(parents=True)
        np.savez_compressed(
            gt_dir / "labels.npz", semantics=sem, mask_lidar=mask_lidar, mask_camera=mask_camera
        )
        labels[token] = (sem, mask_lidar, mask_camera)
        sensors, cams = {}, {}
        for cam in CAMS:
            name = f"n000__{cam}__{stamp}.jpg"
            image = root / "nuscenes" / "samples" / cam / name
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8)).save(image)
            depth = root / "depth_gt" / f"{name}.bin"
            depth.parent.mkdir(parents=True, exist_ok=True)
            np.array([[5.0, 4.0, 7.5], [20.0, 10.0, 3.0]], dtype=np.float32).tofile(depth)
            q, t, ego_q, ego_t = _camera(i, cam)
            sensors[cam] = {
                "img_path": f"{cam}/{name}",
                "intrinsic": K.tolist(),
                "extrinsic": {"translation": t, "rotation": q},
                "ego_pose": {"translation": ego_t, "rotation": ego_q, "timestamp": stamp + 10},
            }
            cams[cam] = {
                "data_path": f"./data/nuscenes/samples/{cam}/{name}",
                "type": cam,
                "cam_intrinsic": K.copy(),
                "sensor2ego_translation": t,
                "sensor2ego_rotation": q,
                "ego2global_translation": ego_t,
                "ego2global_rotation": ego_q,
                "timestamp": stamp + 10,
            }
        key_q = _quat_wxyz(Rotation.from_euler("z", yaw, degrees=True))
        scenes.setdefault(scene, {})[token] = {
            "timestamp": str(stamp),
            "camera_sensor": sensors,
            "ego_pose": {"translation": key_t, "rotation": key_q},
            "gt_path": f"gts/{scene}/{token}/labels.npz",
            "prev": "",
            "next": "",
        }
        infos.append(
            {
                "token": token,
                "timestamp": stamp,
                "scene_name": scene,
                "scene_token": f"st-{scene}",
                "occ_path": f"./data/nuscenes/gts/{scene}/{token}",
                "lidar2ego_translation": [0.94, 0.0, 1.84],
                "lidar2ego_rotation": [0.7071068, 0.0, 0.0, -0.7071068],
                "ego2global_translation": key_t,
                "ego2global_rotation": key_q,
                "cams": cams,
            }
        )
    # Occ3D layout: imgs/ mirrors samples/; annotations.json and gts/ beside it.
    occ3d = root / "Occ3D" / "trainval"
    (occ3d / "imgs").mkdir(parents=True)
    for cam in CAMS:
        (occ3d / "imgs" / cam).symlink_to(root / "nuscenes" / "samples" / cam)
    (occ3d / "gts").symlink_to(root / "nuscenes" / "gts")
    annotations = {"train_split": ["scene-0002"], "val_split": ["scene-0001"], "scene_infos": scenes}
    (occ3d / "annotations.json").write_text(json.dumps(annotations))
    # BEVDet infos: one file, out of time order, mmcv-era protocol 2
    pkl = root / "nuscenes" / "bevdetv2-nuscenes_infos_train.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(
            {"infos": [infos[1], infos[2], infos[0]], "metadata": {"version": "v1.0-trainval"}}, f, protocol=2
        )
    return {"root": root, "occ3d": occ3d, "pkl": pkl, "labels": labels}


def _json_dataset(tree, split="train", **kwargs):
    return Occ3DNuScenes(
        tree["occ3d"], tree["occ3d"] / "annotations.json", split=split, cameras=CAMS, input_size=INPUT,
        occ_size=OCC, point_cloud_range=RANGE, **kwargs,
    )  # fmt: skip


def _pkl_dataset(tree, **kwargs):
    return Occ3DNuScenes(
        tree["root"] / "nuscenes", tree["pkl"], cameras=CAMS, input_size=INPUT, occ_size=OCC,
        point_cloud_range=RANGE, **kwargs,
    )  # fmt: skip


def test_class_ids_remap_both_ways():
    assert len(OCC3D_CLASSES) == 18 and OCC3D_CLASSES[0] == "free" and OCC3D_CLASSES[1] == "others"
    assert OCC3D_CLASSES[-1] == "vegetation"
    file_ids = np.arange(18, dtype=np.uint8)
    assert (occ3d_to_model_ids(file_ids) == np.where(file_ids == 17, 0, file_ids + 1)).all()
    assert (model_to_occ3d_ids(occ3d_to_model_ids(file_ids)) == file_ids).all()
    assert occ3d_to_model_ids(np.array([255]))[0] == 255 and model_to_occ3d_ids(torch.tensor([18]))[0] == 255


def test_sample_order_labels_and_masks_from_both_lists(tree):
    train = _json_dataset(tree)
    assert [r.token for r in train.records] == ["tok-b0", "tok-b1"]  # file order within the split
    assert [r.token for r in _json_dataset(tree, "val").records] == ["tok-a0"]
    pkl = _pkl_dataset(tree)
    assert [r.token for r in pkl.records] == ["tok-a0", "tok-b0", "tok-b1"]  # sorted by timestamp
    for dataset in (train, pkl):
        for i in range(len(dataset)):
            sample = dataset[i]
            token = sample["meta"]["sample_id"]
            sem, mask_lidar, mask_camera = tree["labels"][token]
            assert sample["gt_occ"].dtype == torch.uint8 and tuple(sample["gt_occ"].shape) == OCC
            assert (sample["gt_occ"].numpy() == np.where(sem == 17, 0, sem + 1)).all()
            assert (
                sample["mask_lidar"].dtype == torch.bool
                and (sample["mask_lidar"].numpy() == (mask_lidar == 1)).all()
            )
            assert (sample["mask_camera"].numpy() == (mask_camera == 1)).all()
            assert sample["meta"]["dataset"] == "occ3d-nuscenes"
            assert sample["img"].shape == (2, 3, *INPUT)


def test_gt_mask_ignores_unobserved_voxels(tree):
    sample = _json_dataset(tree, gt_mask="camera")[0]
    sem, _, mask_camera = tree["labels"]["tok-b0"]
    expected = np.where(mask_camera == 1, np.where(sem == 17, 0, sem + 1), 255)
    assert (sample["gt_occ"].numpy() == expected).all()
    lidar = _json_dataset(tree, gt_mask="lidar")[0]
    assert ((lidar["gt_occ"].numpy() == 255) == (tree["labels"]["tok-b0"][1] == 0)).all()
    with pytest.raises(ValueError, match="gt_mask"):
        _json_dataset(tree, gt_mask="both")


def test_camera_matrices_map_camera_to_the_key_frame_ego(tree):
    json_ds, pkl_ds = _json_dataset(tree), _pkl_dataset(tree)
    for dataset, tokens in ((json_ds, ["tok-b0", "tok-b1"]), (pkl_ds, ["tok-a0", "tok-b0", "tok-b1"])):
        for i, token in enumerate(tokens):
            sample = dataset[i]
            frame = [f[1] for f in FRAMES].index(token)
            for n, cam in enumerate(CAMS):
                expected = expected_cam_to_ego(frame, cam)
                assert torch.allclose(
                    sample["rots"][n], torch.tensor(expected[:3, :3], dtype=torch.float32), atol=1e-6
                )
                assert torch.allclose(
                    sample["trans"][n], torch.tensor(expected[:3, 3], dtype=torch.float32), atol=1e-5
                )
                assert (sample["intrins"][n][:3, :3].numpy() == K.astype(np.float32)).all()
                assert sample["intrins"][n][3, 3] == 1 and not sample["intrins"][n][:3, 3].any()


def test_a_hand_computed_voxel_projects_where_expected(tree):
    """tok-b0: key ego at yaw 0; at camera time the car is 1 m further and turned by 2 degrees. Undo the
    camera-time pose by hand: the CAM_FRONT centre (1.5, 0, 1.5) in the camera-time ego lies at
    (1 + 1.5 cos 2 deg, 1.5 sin 2 deg, 1.5) in the key ego, looking along yaw 2 deg."""
    sample = _json_dataset(tree)[0]
    c, s = np.cos(np.radians(2.0)), np.sin(np.radians(2.0))
    centre = np.array([1.0 + 1.5 * c, 1.5 * s, 1.5])
    assert np.allclose(sample["trans"][0].numpy(), centre, atol=1e-5)
    # voxel (15, 10, 3) has centre (4.4, 0.4, 1.8); camera right (s, -c, 0), down (0, 0, -1), fwd (c, s, 0)
    p = np.array([-8.0 + 0.8 * 15.5, -8.0 + 0.8 * 10.5, -1.0 + 0.8 * 3.5]) - centre
    x, y, z = p @ np.array([s, -c, 0.0]), -p[2], p @ np.array([c, s, 0.0])
    u, v = 20.0 * x / z + 16.0, 20.0 * y / z + 9.0
    rot, tran = sample["rots"][0].double(), sample["trans"][0].double()
    cam = torch.linalg.solve(rot, torch.tensor([4.4, 0.4, 1.8], dtype=torch.float64) - tran)
    uvd = sample["intrins"][0][:3, :3].double() @ cam
    assert np.allclose([uvd[0] / uvd[2], uvd[1] / uvd[2], uvd[2]], [u, v, z], atol=1e-4)


def test_depth_targets_meta_and_collate(tree):
    dataset = _pkl_dataset(tree, train=True, depth_root=tree["root"] / "depth_gt")
    sample = dataset[1]
    assert sample["gt_depth"].shape == (2, *INPUT) and (sample["gt_depth"] > 0).any()
    meta = sample["meta"]
    assert meta["scene_name"] == "scene-0002" and meta["timestamp"] == 3_000_000
    assert np.allclose(np.asarray(meta["ego_to_global"])[:3, 3], [100.0, 200.0, 0.0])
    assert np.allclose(np.asarray(meta["lidar_to_ego"])[:3, 3], [0.94, 0.0, 1.84])
    batch = collate([dataset[0], dataset[2]])
    assert batch["mask_camera"].shape == (2, *OCC) and batch["mask_lidar"].dtype == torch.bool
    assert _json_dataset(tree)[0]["meta"]["lidar_to_ego"] is None  # annotations.json has no LiDAR pose


def test_bad_files_name_the_file_and_the_problem(tree, tmp_path):
    good = tree["labels"]["tok-b0"]
    cases = {
        "missing key": dict(semantics=good[0], mask_lidar=good[1]),
        "shape": dict(semantics=good[0][:, :, :2], mask_lidar=good[1], mask_camera=good[2]),
        "range": dict(semantics=np.full(OCC, 18, np.uint8), mask_lidar=good[1], mask_camera=good[2]),
        "mask": dict(semantics=good[0], mask_lidar=good[1] * 2, mask_camera=good[2]),
    }
    messages = {"missing key": "lacks", "shape": "shape", "range": "0..17", "mask": "0/1"}
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(DataFileError, match=messages[name]) as err:
            read_labels(path, OCC)
        assert str(path) in str(err.value)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tree["root"] / "nuscenes/gts/scene-0002/tok-b0/labels.npz").read_bytes()[:100])
    with pytest.raises(DataFileError, match="readable"):
        read_labels(truncated, OCC)
    with pytest.raises(MissingFileError):
        read_labels(tmp_path / "absent.npz", OCC)
    annotations = json.loads((tree["occ3d"] / "annotations.json").read_text())
    del annotations["scene_infos"]["scene-0002"]["tok-b1"]["camera_sensor"]["CAM_BACK"]
    bad = tmp_path / "annotations.json"
    bad.write_text(json.dumps(annotations))
    with pytest.raises(DataFileError, match="CAM_BACK") as err:
        Occ3DNuScenes(tree["occ3d"], bad, cameras=CAMS, occ_size=OCC, point_cloud_range=RANGE)
    assert str(bad) in str(err.value) and "tok-b1" in str(err.value)
    with pytest.raises(DataFileError, match="test_split"):
        Occ3DNuScenes(tree["occ3d"], tree["occ3d"] / "annotations.json", split="test", cameras=CAMS)
