"""``spotocc prepare nuscenes`` / ``occ3d`` against a fake of the small devkit surface it uses.

The fake replaces the modules ``nuscenes.nuscenes`` and ``nuscenes.utils.splits`` in ``sys.modules``,
so the tool's real import statements and calls run unchanged (and the test does not need the devkit).
"""

import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from spotocc.cli import main as cli_main
from spotocc.data import NuScenesOccupancy, Occ3DNuScenes
from spotocc.data.nuscenes_infos import CAMERAS, quaternion_matrix
from spotocc.data.nuscenes_occ import load_infos


def _quat(rng):
    """A random unit quaternion (w, x, y, z)."""
    x, y, z, w = Rotation.random(random_state=rng.integers(1 << 31)).as_quat()
    return [float(w), float(x), float(y), float(z)]


def _matrix(quat, translation):
    """4x4 pose with scipy as the independent quaternion oracle."""
    w, x, y, z = quat
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_quat([x, y, z, w]).as_matrix()
    pose[:3, 3] = translation
    return pose


class FakeNuScenes:
    """The devkit calls the tool makes: the constructor, ``scene``, ``sample``, ``get``,
    ``get_sample_data_path``."""

    instances = []

    def __init__(self, version, dataroot, verbose):
        self.version, self.dataroot, self.verbose = version, dataroot, verbose
        FakeNuScenes.instances.append(self)
        rng = np.random.default_rng(0)
        self.tables = {k: {} for k in ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose")}
        self.scene, self.sample = [], []
        for s, name in enumerate(["scene-0001", "scene-0002", "scene-0003"]):
            samples = [f"s{s}_{i}" for i in range(2)]
            self._add("scene", {"token": f"sc{s}", "name": name, "first_sample_token": samples[0]})
            self.scene.append(self.tables["scene"][f"sc{s}"])
            for i, token in enumerate(samples):
                data = {}
                for sensor in ("LIDAR_TOP", *CAMERAS):
                    sd = f"{token}_{sensor}"
                    folder = "LIDAR_TOP" if sensor == "LIDAR_TOP" else sensor
                    ext = "pcd.bin" if sensor == "LIDAR_TOP" else "jpg"
                    cs = {
                        "token": f"cs_{sd}",
                        "rotation": _quat(rng),
                        "translation": rng.normal(size=3).tolist(),
                    }
                    if sensor != "LIDAR_TOP":
                        cs["camera_intrinsic"] = [[500.0 + s, 0, 320], [0, 500.0, 240], [0, 0, 1]]
                    pose = {
                        "token": f"ep_{sd}",
                        "rotation": _quat(rng),
                        "translation": rng.normal(size=3).tolist(),
                    }
                    self._add("calibrated_sensor", cs)
                    self._add("ego_pose", pose)
                    self._add(
                        "sample_data",
                        {
                            "token": sd,
                            "filename": f"samples/{folder}/{sd}.{ext}",
                            "calibrated_sensor_token": cs["token"],
                            "ego_pose_token": pose["token"],
                            "timestamp": 1000 * s + 10 * i + len(data),
                        },
                    )
                    data[sensor] = sd
                sample = {
                    "token": token,
                    "timestamp": 1000 * s + 10 * i,
                    "scene_token": f"sc{s}",
                    "prev": samples[i - 1] if i else "",
                    "next": samples[i + 1] if i + 1 < len(samples) else "",
                    "data": data,
                }
                self._add("sample", sample)
                self.sample.append(sample)

    def _add(self, table, record):
        self.tables[table][record["token"]] = record

    def get(self, table, token):
        return self.tables[table][token]

    def get_sample_data_path(self, token):
        return f"{self.dataroot}/{self.tables['sample_data'][token]['filename']}"


@pytest.fixture
def fake_devkit(monkeypatch):
    FakeNuScenes.instances = []
    package = types.ModuleType("nuscenes")
    nuscenes_module = types.ModuleType("nuscenes.nuscenes")
    nuscenes_module.NuScenes = FakeNuScenes
    utils = types.ModuleType("nuscenes.utils")
    splits = types.ModuleType("nuscenes.utils.splits")
    splits.train, splits.val = ["scene-0001", "scene-0003"], ["scene-0002"]
    splits.mini_train, splits.mini_val, splits.test = ["scene-0001"], ["scene-0002"], ["scene-0003"]
    package.nuscenes, package.utils, utils.splits = nuscenes_module, utils, splits
    for name, module in {
        "nuscenes": package,
        "nuscenes.nuscenes": nuscenes_module,
        "nuscenes.utils": utils,
        "nuscenes.utils.splits": splits,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return FakeNuScenes


def _touch_lidar(root, nusc_scenes=("sc0", "sc1")):
    for s in nusc_scenes:
        path = root / f"samples/LIDAR_TOP/s{s[2:]}_0_LIDAR_TOP.pcd.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_quaternion_matrix_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = _quat(rng)
        assert np.allclose(quaternion_matrix(q), _matrix(q, np.zeros(3))[:3, :3], atol=1e-12)


def test_prepare_writes_infos_the_reader_loads(tmp_path, fake_devkit, capsys):
    root = tmp_path / "nuscenes"
    _touch_lidar(root)  # scene-0003's LiDAR files are absent: skipped, as released
    code = cli_main(["prepare", "nuscenes", "--data-root", str(root), "--version", "v1.0-trainval",
                     "--out-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    nusc = fake_devkit.instances[0]
    assert (nusc.version, nusc.dataroot) == ("v1.0-trainval", str(root))
    assert "skipping 1 scenes whose LiDAR files are absent: scene-0003" in capsys.readouterr().out
    train = load_infos(tmp_path / "out/nuscenes_occ_infos_train.pkl", CAMERAS)
    val = load_infos(tmp_path / "out/nuscenes_occ_infos_val.pkl", CAMERAS)
    assert [i["token"] for i in train] == ["s0_0", "s0_1"] and [i["token"] for i in val] == ["s1_0", "s1_1"]
    assert [i["frame_idx"] for i in train + val] == [0, 1, 0, 1]
    info = val[1]
    assert info["lidar_token"] == "s1_1_LIDAR_TOP" and info["scene_token"] == "sc1"
    assert info["lidar_path"] == "./data/nuscenes/samples/LIDAR_TOP/s1_1_LIDAR_TOP.pcd.bin"
    lidar_sd = nusc.get("sample_data", "s1_1_LIDAR_TOP")
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    global_from_lidar = _matrix(lidar_pose["rotation"], lidar_pose["translation"]) @ _matrix(
        lidar_cs["rotation"], lidar_cs["translation"]
    )
    for camera in CAMERAS:
        cam = info["cams"][camera]
        sd = nusc.get("sample_data", cam["sample_data_token"])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        global_from_cam = _matrix(pose["rotation"], pose["translation"]) @ _matrix(
            cs["rotation"], cs["translation"]
        )
        # A camera point reaches the same global position through the camera's own chain and
        # through sensor2lidar followed by the LiDAR chain.
        p_cam = np.array([1.5, -0.7, 12.0, 1.0])
        p_lidar = np.append(cam["sensor2lidar_rotation"] @ p_cam[:3] + cam["sensor2lidar_translation"], 1.0)
        assert np.allclose(global_from_cam @ p_cam, global_from_lidar @ p_lidar, atol=1e-9)
        assert np.allclose(cam["cam_intrinsic"], cs["camera_intrinsic"])
        assert cam["data_path"] == f"./data/nuscenes/samples/{camera}/s1_1_{camera}.jpg"


def test_prepared_infos_feed_the_dataset(tmp_path, fake_devkit, tiny):
    root = tmp_path / "nuscenes"
    _touch_lidar(root, ("sc0", "sc1", "sc2"))
    cli_main(
        ["prepare", "nuscenes", "--data-root", str(root), "--version", "v1.0-mini", "--out-dir", str(root)]
    )
    infos = load_infos(root / "nuscenes_occ_infos_train.pkl", CAMERAS)
    for info in infos:
        tiny.write_nusc_sample(
            root, tmp_path / "occ", tmp_path / "depth", info, rows=np.array([[1, 2, 3, 4]])
        )
    ds = NuScenesOccupancy(
        root, root / "nuscenes_occ_infos_train.pkl", tmp_path / "occ", input_size=(32, 64), occ_size=(8, 8, 4)
    )
    s = ds[0]
    assert s["img"].shape == (6, 3, 32, 64) and s["gt_occ"][3, 2, 1] == 4
    # The reader orders cameras FRONT_LEFT, FRONT, FRONT_RIGHT, ...: index 2 is CAM_FRONT_RIGHT.
    expected = torch.from_numpy(ds.infos[0]["cams"]["CAM_FRONT_RIGHT"]["sensor2lidar_rotation"])
    assert torch.allclose(s["rots"][2].double(), expected, atol=1e-6)
    assert s["meta"]["sample_id"] == "s0_0" and len(ds) == 2  # mini_train = scene-0001


def test_missing_devkit_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nuscenes", None)
    monkeypatch.setitem(sys.modules, "nuscenes.nuscenes", None)
    (tmp_path / "root").mkdir()
    code = cli_main(
        ["prepare", "nuscenes", "--data-root", str(tmp_path / "root"), "--out-dir", str(tmp_path)]
    )
    assert code == 2
    out = capsys.readouterr().out
    assert "needs nuscenes-devkit" in out and "pip install 'spotocc[nuscenes]'" in out
    assert (
        cli_main(["prepare", "nuscenes", "--data-root", str(tmp_path / "nope"), "--out-dir", str(tmp_path)])
        == 2
    )


def test_prepare_occ3d_writes_bevdet_infos_the_occ3d_reader_loads(tmp_path, fake_devkit):
    root = tmp_path / "nuscenes"
    _touch_lidar(root, ("sc0", "sc1", "sc2"))
    args = ["prepare", "occ3d", "--data-root", str(root), "--version", "v1.0-mini", "--out-dir", str(root)]
    assert cli_main(args) == 0
    infos = pickle.loads((root / "bevdetv2-nuscenes_infos_train.pkl").read_bytes())["infos"]
    assert [i["occ_path"] for i in infos] == [f"./data/nuscenes/gts/scene-0001/s0_{i}" for i in range(2)]
    for info in infos:  # images and labels where the infos say
        for cam in info["cams"].values():
            path = root / cam["data_path"][len("./data/nuscenes/") :]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((18, 32, 3), np.uint8)).save(path, format="JPEG")
        gt = root / "gts" / info["scene_name"] / info["token"]
        gt.mkdir(parents=True)
        zeros = np.zeros((8, 8, 4), np.uint8)
        np.savez(gt / "labels.npz", semantics=zeros + 17, mask_lidar=zeros + 1, mask_camera=zeros)
    ds = Occ3DNuScenes(
        root, root / "bevdetv2-nuscenes_infos_train.pkl", input_size=(32, 64), occ_size=(8, 8, 4)
    )
    sample = ds[1]
    assert sample["meta"]["sample_id"] == "s0_1" and not sample["gt_occ"].any() and sample["mask_lidar"].all()
    # camera -> ego at the LiDAR's timestamp: the camera's chain to global equals the LiDAR ego's chain
    nusc = fake_devkit.instances[0]
    info = infos[1]
    ego_to_global = _matrix(info["ego2global_rotation"], info["ego2global_translation"])
    cam = info["cams"]["CAM_FRONT_LEFT"]
    global_from_cam = _matrix(cam["ego2global_rotation"], cam["ego2global_translation"]) @ _matrix(
        cam["sensor2ego_rotation"], cam["sensor2ego_translation"]
    )
    cam_to_ego = torch.eye(4, dtype=torch.float64)
    cam_to_ego[:3, :3], cam_to_ego[:3, 3] = sample["rots"][0].double(), sample["trans"][0].double()
    p_cam = np.array([1.5, -0.7, 12.0, 1.0])
    assert np.allclose(global_from_cam @ p_cam, ego_to_global @ cam_to_ego.numpy() @ p_cam, atol=1e-4)
    assert nusc.version == "v1.0-mini"
