import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spotocc.data import DataFileError, MissingFileError, NuScenesOccupancy
from spotocc.data.nuscenes_occ import densify_occupancy, load_infos, resolve_data_path


def _dataset(tiny, paths, **kwargs):
    kwargs.setdefault("depth_root", paths["depth_root"])
    return NuScenesOccupancy(
        paths["data_root"],
        kwargs.pop("info_file", paths["info_file"]),
        paths["occ_root"],
        cameras=tiny.NUSC_CAMERAS,
        input_size=tiny.NUSC_INPUT_SIZE,
        occ_size=tiny.NUSC_OCC_SIZE,
        **kwargs,
    )


def test_densify_orientation_noise_and_duplicates():
    rows = np.array(
        [
            [1, 2, 3, 4],  # z=1, y=2, x=3: car
            [0, 0, 0, 0],  # noise -> ignore
            [2, 1, 0, 7],  # two votes for 7, one for 5 -> 7
            [2, 1, 0, 5],
            [2, 1, 0, 7],
            [0, 3, 1, 9],  # tie 9 / 6 -> smallest id 6
            [0, 3, 1, 6],
            [3, 3, 3, 0],  # tie noise(255) / 2 -> 2
            [3, 3, 3, 2],
        ]
    )
    dense = densify_occupancy(rows, (4, 4, 4))
    assert dense.dtype == np.uint8 and dense.shape == (4, 4, 4)
    assert dense[3, 2, 1] == 4 and dense[0, 0, 0] == 255 and dense[0, 1, 2] == 7
    assert dense[1, 3, 0] == 6 and dense[3, 3, 3] == 2
    assert (dense == 0).sum() == 64 - 5
    assert not densify_occupancy(np.zeros((0, 4), dtype=np.int64), (2, 2, 2)).any()


def test_densify_matches_a_brute_force_vote():
    rng = np.random.default_rng(7)
    rows = np.c_[rng.integers(0, 2, (400, 3)), rng.integers(0, 5, 400)]  # 8 voxels, many conflicts
    rows = np.r_[rows, [[1, 1, 1, 3]] * 3]
    dense = densify_occupancy(rows, (2, 2, 2))
    for x, y, z in np.ndindex(2, 2, 2):
        votes = rows[(rows[:, 2] == x) & (rows[:, 1] == y) & (rows[:, 0] == z), 3]
        votes = np.where(votes == 0, 255, votes)
        counts = {label: int((votes == label).sum()) for label in set(votes.tolist())}
        top = max(counts.values())
        assert dense[x, y, z] == min(label for label, c in counts.items() if c == top)


def test_sample_dict_sorting_geometry_and_gt(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=3)
    ds = _dataset(tiny, paths)
    assert [info["timestamp"] for info in ds.infos] == [998, 999, 1000]  # sorted by timestamp
    s = ds[0]
    assert s["meta"]["sample_id"] == "sample2" and s["meta"]["lidar_token"] == "lidar2"
    assert s["img"].shape == (2, 3, *tiny.NUSC_INPUT_SIZE) and s["img"].dtype == torch.float32
    for i, camera in enumerate(tiny.NUSC_CAMERAS):
        rot, tran = tiny.NUSC_SENSOR2LIDAR[camera]
        assert torch.allclose(s["rots"][i], torch.tensor(rot, dtype=torch.float32), atol=1e-6)
        assert torch.allclose(s["trans"][i], torch.tensor(tran, dtype=torch.float32), atol=1e-6)
        expected_k = torch.eye(4)
        expected_k[:3, :3] = torch.tensor(tiny.NUSC_K, dtype=torch.float32)
        assert torch.equal(s["intrins"][i], expected_k)  # padded with a zero 4th column
    # Test transform: scale 64/160 = 0.4 -> 64x36, bottom 32 rows -> crop y 4.
    assert torch.allclose(s["post_rots"][0], torch.diag(torch.tensor([0.4, 0.4, 1.0])))
    assert torch.allclose(s["post_trans"][0], torch.tensor([0.0, -4.0, 0.0]))
    assert torch.equal(s["bda"], torch.eye(4)) and "gt_depth" not in s
    rows = np.load(paths["occ_root"] / "scene_scene0/occupancy/lidar2.npy")
    gt = s["gt_occ"]
    assert gt.dtype == torch.uint8 and gt.shape == tiny.NUSC_OCC_SIZE
    for z, y, x, label in rows:  # independent check of the (z, y, x, label) orientation
        votes = rows[(rows[:, 0] == z) & (rows[:, 1] == y) & (rows[:, 2] == x), 3]
        if len(votes) == 1:
            assert gt[x, y, z] == (255 if label == 0 else label)
    listed = {(x, y, z) for z, y, x, _ in rows}
    assert (gt > 0).sum() == len(listed)
    train = _dataset(tiny, paths, train=True)[0]
    assert train["gt_depth"].shape == (2, *tiny.NUSC_INPUT_SIZE)


def test_bgr_quirk_and_rgb_switch(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=1)
    info = load_infos(paths["info_file"], tiny.NUSC_CAMERAS)[0]
    colour = np.zeros((90, 160, 3), dtype=np.uint8)
    colour[...] = (200, 100, 30)  # R, G, B
    for camera in tiny.NUSC_CAMERAS:  # lossless files so the pixel values are exact
        info["cams"][camera]["data_path"] = f"samples/{camera}/flat.png"
        Image.fromarray(colour).save(paths["data_root"] / f"samples/{camera}/flat.png")
    tiny.write_infos(paths["info_file"], [info])
    for bgr, first in ((True, (30 - 123.675) / 58.395), (False, (200 - 123.675) / 58.395)):
        img = _dataset(tiny, paths, bgr_input=bgr)[0]["img"]
        assert torch.allclose(img[0, 0, 5, 5], torch.tensor(first), atol=1e-5)
        assert torch.allclose(img[0, 1, 5, 5], torch.tensor((100 - 116.28) / 57.12), atol=1e-5)


def test_resolve_data_path():
    assert resolve_data_path("./data/nuscenes/samples/a.jpg", "/d") == Path("/d/samples/a.jpg")
    assert resolve_data_path("data/nuscenes/samples/a.jpg", "/d") == Path("/d/samples/a.jpg")
    assert resolve_data_path("samples/a.jpg", "/d") == Path("/d/samples/a.jpg")
    assert resolve_data_path("/abs/a.jpg", "/d") == Path("/abs/a.jpg")


class _Evil:
    """Unpickling this would create a file (a stand-in for running arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_info_pickle_errors(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=2)
    infos = load_infos(paths["info_file"], tiny.NUSC_CAMERAS)
    bad = tmp_path / "bad.pkl"
    marker = tmp_path / "pwned"
    with open(bad, "wb") as f:
        pickle.dump({"infos": infos, "extra": _Evil(str(marker))}, f)
    with pytest.raises(
        DataFileError, match=r"bad\.pkl: info file is not a plain pickle: refusing to load pathlib"
    ):
        _dataset(tiny, paths, info_file=bad)
    assert not marker.exists()
    # Protocol 4/5 pickles of the same plain content load fine.
    for protocol in (4, 5):
        tiny.write_infos(bad, infos, protocol=protocol)
        assert len(_dataset(tiny, paths, info_file=bad)) == 2
    broken = [dict(infos[0]), infos[1]]
    del broken[0]["lidar_token"]
    tiny.write_infos(bad, broken)
    with pytest.raises(
        DataFileError, match=r"infos\[0\] \(token sample1\) is missing keys \['lidar_token'\]"
    ):
        _dataset(tiny, paths, info_file=bad)
    broken = [infos[0], dict(infos[1], cams={"CAM_FRONT": infos[1]["cams"]["CAM_FRONT"]})]
    tiny.write_infos(bad, broken)
    with pytest.raises(DataFileError, match="has no camera CAM_BACK"):
        _dataset(tiny, paths, info_file=bad)
    cam = dict(infos[0]["cams"]["CAM_FRONT"], cam_intrinsic=np.eye(4))
    tiny.write_infos(bad, [dict(infos[0], cams={**infos[0]["cams"], "CAM_FRONT": cam})])
    with pytest.raises(DataFileError, match=r"CAM_FRONT cam_intrinsic has shape \(4, 4\), expected \(3, 3\)"):
        _dataset(tiny, paths, info_file=bad)
    with open(bad, "wb") as f:
        pickle.dump({"samples": []}, f)
    with pytest.raises(DataFileError, match="info file has no 'infos' entry"):
        _dataset(tiny, paths, info_file=bad)
    bad.write_bytes(paths["info_file"].read_bytes()[:50])
    with pytest.raises(DataFileError, match="not a readable pickle"):
        _dataset(tiny, paths, info_file=bad)
    with pytest.raises(MissingFileError, match="info file is missing"):
        _dataset(tiny, paths, info_file=tmp_path / "none.pkl")


def test_gt_image_and_depth_file_errors(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=2)
    occ = paths["occ_root"] / "scene_scene0/occupancy"
    ds = _dataset(tiny, paths)
    np.save(occ / "lidar1.npy", np.zeros((5, 3), dtype=np.int64))
    with pytest.raises(
        DataFileError, match=r"lidar1\.npy: occupancy array has shape \(5, 3\), expected \[N, 4\]"
    ):
        ds[0]
    np.save(occ / "lidar1.npy", np.array([[0, 0, 16, 1]]))
    with pytest.raises(DataFileError, match=r"occupancy x indices span 16..16, outside the grid 0..15"):
        ds[0]
    np.save(occ / "lidar1.npy", np.array([[0, 0, 0, 17]]))
    with pytest.raises(DataFileError, match="occupancy labels span 17..17, expected 0..16"):
        ds[0]
    (occ / "lidar1.npy").unlink()
    with pytest.raises(MissingFileError, match=r"lidar1\.npy: occupancy file is missing"):
        ds[0]
    image = paths["data_root"] / "samples/CAM_BACK/n000__CAM_BACK__1000.jpg"
    image.write_bytes(image.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataFileError, match=r"CAM_BACK__1000\.jpg: image does not decode"):
        ds[1]
    (paths["depth_root"] / "n000__CAM_FRONT__999.jpg.bin").write_bytes(b"\0" * 8)
    np.save(occ / "lidar1.npy", np.array([[0, 0, 0, 1]]))
    with pytest.raises(
        DataFileError, match=r"depth file has 8 bytes, not a whole number of 3-value float32 rows"
    ):
        _dataset(tiny, paths, train=True)[0]
    with pytest.raises(ValueError, match="needs depth_root"):
        _dataset(tiny, paths, train=True, depth_root=None)
