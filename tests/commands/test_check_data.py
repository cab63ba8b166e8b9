import pickle
from pathlib import Path

import numpy as np
import pytest

from spotocc.cli import main as cli_main
from spotocc.config import GridConfig
from spotocc.data.check import check_nuscenes_occupancy, check_semantic_kitti
from spotocc.data.synthetic import generate
from spotocc.data.synthetic.occ3d_format import ROOT


def _kitti_args(root, tiny, *extra):
    occ = [str(v) for v in tiny.KITTI_OCC_SIZE]
    return ["check-data", "--format", "semantickitti", "--root", str(root), "--occ-size", *occ, *extra]


def test_clean_kitti_dataset_passes(tmp_path, tiny, capsys):
    root = tiny.make_kitti_dataset(tmp_path)
    assert cli_main(_kitti_args(root, tiny)) == 0
    out = capsys.readouterr().out
    # 2 calib + 4 frames x (image, label, invalid, voxel .bin) + 2 train velodyne scans
    assert "OK: 20 files checked, 0 problems" in out
    assert "note    split train: sequences 01, 02, 03, 04, 05, 06, 07, 09, 10 are not present" in out


def test_broken_kitti_dataset_reports_every_problem(tmp_path, tiny, capsys):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("00", "08"), frames=("000000", "000005", "000010"))
    seq00, seq08 = root / "dataset/sequences/00", root / "dataset/sequences/08"
    (seq00 / "image_2/000000.png").unlink()  # missing image
    (seq00 / "image_2/000005.png").write_bytes(b"garbage")  # unreadable image
    label = seq00 / "voxels/000010.label"
    label.write_bytes(label.read_bytes()[:100])  # truncated label
    invalid = seq08 / "voxels/000005.invalid"
    invalid.write_bytes(invalid.read_bytes()[:-1])  # wrong-size invalid
    (seq00 / "velodyne/000005.bin").write_bytes(b"\0" * 6)  # truncated velodyne (train split)
    (seq08 / "velodyne/000000.bin").unlink()  # not needed for val: not a problem
    (seq08 / "voxels/000010.label").unlink()  # missing label
    tiny.write_calib(seq08 / "calib.txt", {k: v for k, v in tiny.kitti_calib().items() if k != "P2"})
    (root / "labels/00").mkdir(parents=True)
    np.save(root / "labels/00/000000_1_1.npy", np.zeros((2, 2, 2), np.float32))  # wrong shape
    assert cli_main(_kitti_args(root, tiny, "--workers", "2")) == 1
    out = capsys.readouterr().out
    expected = [
        ("MISSING", "00/image_2/000000.png: image is missing"),
        ("BAD", "00/image_2/000005.png: image does not decode"),
        ("BAD", "00/voxels/000010.label: voxel label file has 100 bytes, expected 4096"),
        ("BAD", "08/voxels/000005.invalid: invalid-voxel file has 255 bytes, expected 256"),
        ("BAD", "00/velodyne/000005.bin: velodyne scan has 6 bytes"),
        ("MISSING", "08/voxels/000010.label: voxel label file is missing"),
        ("BAD", "08/calib.txt: calibration has no P2 matrix"),
        ("BAD", "labels/00/000000_1_1.npy: preprocessed labels have shape (2, 2, 2), expected (16, 16, 8)"),
    ]
    for kind, message in expected:
        assert any(line.startswith(kind) and message in line for line in out.splitlines()), message
    assert "velodyne/000000.bin" not in out
    assert "FAILED:" in out and "8 problems (2 missing, 6 bad)" in out


def test_kitti_check_api_and_split_errors(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("08",), frames=("000000",))
    report = check_semantic_kitti(root, splits=["val", "test"], occ_size=tiny.KITTI_OCC_SIZE, quick=True)
    assert report.ok and report.files_checked == 5  # val and test share sequence 08: counted once
    image = root / "dataset/sequences/08/image_2/000000.png"
    good = image.read_bytes()
    image.write_bytes(b"not an image")
    report = check_semantic_kitti(root, splits=["val"], occ_size=tiny.KITTI_OCC_SIZE, quick=True)
    assert [p.problem[:22] for p in report.problems] == ["image does not decode:"]
    image.write_bytes(good)
    report = check_semantic_kitti(root, splits=["train"], occ_size=tiny.KITTI_OCC_SIZE)
    assert not report.ok and "split train: no frames" in report.problems[0].problem
    # A grid that does not match the files: every voxel file is the wrong size.
    report = check_semantic_kitti(root, splits=["val"], occ_size=(32, 32, 8))
    assert len(report.problems) == 3 and all("expected" in p.problem for p in report.problems)
    with pytest.raises(ValueError, match="unknown SemanticKITTI split"):
        check_semantic_kitti(root, splits=["nope"])
    report = check_semantic_kitti(tmp_path / "nowhere", splits=["val"])
    assert report.problems[0].missing and "sequences folder is missing" in report.problems[0].problem


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-dir/x"),))


def test_broken_nuscenes_dataset_reports_every_problem(tmp_path, tiny, capsys):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=3)
    with open(paths["info_file"], "rb") as f:
        infos = pickle.load(f)["infos"]
    infos.append({k: v for k, v in tiny.nusc_info(9, timestamp=1).items() if k != "scene_token"})
    tiny.write_infos(paths["info_file"], infos)
    val_info = tmp_path / "val.pkl"
    with open(val_info, "wb") as f:
        pickle.dump({"infos": [_Evil()]}, f)
    occ = paths["occ_root"] / "scene_scene0/occupancy"
    np.save(occ / "lidar0.npy", np.zeros((3, 5), np.int64))  # wrong columns
    np.save(occ / "lidar1.npy", np.array([[0, 99, 0, 3]]))  # y index out of range
    (occ / "lidar2.npy").unlink()
    (paths["data_root"] / "samples/CAM_BACK/n000__CAM_BACK__1000.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (paths["depth_root"] / "n000__CAM_FRONT__999.jpg.bin").write_bytes(b"\0" * 7)
    args = [
        "check-data", "--preset", "spotocc_nusc_256",
        "--root", str(paths["data_root"]), "--occ-root", str(paths["occ_root"]),
        "--depth-root", str(paths["depth_root"]), "--train-info", str(paths["info_file"]),
        "--val-info", str(val_info), "--occ-size", *map(str, tiny.NUSC_OCC_SIZE),
        "--cameras", *tiny.NUSC_CAMERAS,
    ]  # fmt: skip
    assert cli_main(args) == 1
    out = capsys.readouterr().out
    expected = [
        "infos[3] (token sample9) is missing keys ['scene_token']",
        "val.pkl: info file is not a plain pickle: refusing to load pathlib",
        "lidar0.npy: occupancy array has shape (3, 5), expected [N, 4]",
        "lidar1.npy: occupancy y indices span 99..99, outside the grid 0..15",
        "lidar2.npy: occupancy file is missing",
        "CAM_BACK__1000.jpg: image does not decode",
        "n000__CAM_FRONT__999.jpg.bin: depth file has 7 bytes",
    ]
    for message in expected:
        assert message in out, message
    assert "7 problems (1 missing, 6 bad)" in out


def test_clean_nuscenes_check_api(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=2)
    report = check_nuscenes_occupancy(
        paths["data_root"], paths["occ_root"], {"train": paths["info_file"]}, depth_root=paths["depth_root"],
        cameras=tiny.NUSC_CAMERAS, occ_size=tiny.NUSC_OCC_SIZE,
    )  # fmt: skip
    assert report.ok and report.files_checked == 1 + 2 * (2 * 2 + 1)
    report = check_nuscenes_occupancy(
        paths["data_root"], paths["occ_root"], {"train": paths["info_file"]},
        cameras=tiny.NUSC_CAMERAS, occ_size=tiny.NUSC_OCC_SIZE,
    )  # fmt: skip
    assert [p.problem for p in report.problems] == ["split train: no depth root given for the depth targets"]


def test_occ3d_tree_in_both_list_forms_and_its_broken_files(tmp_path, capsys):

    grid = GridConfig(point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(40, 40, 8))
    summary = generate(tmp_path, "occ3d-nuscenes", num_train=2, num_val=1, grid=grid, image_size=(18, 32),
                       lidar_azimuth_steps=64)  # fmt: skip
    args = ["check-data", "--preset", "synthetic_tiny_occ3d", "--occ-size", "40", "40", "8"]
    for override in summary.data_overrides:
        args += ["--set", override]
    assert cli_main(args) == 0
    # 2 sample lists, 3 x 6 images, 2 x 6 depth files (train only), 3 labels.npz
    assert "OK: 35 files checked, 0 problems" in capsys.readouterr().out
    root = tmp_path / ROOT
    json_args = [*args, "--val-info", str(root / "annotations.json"), "--split", "val"]
    assert cli_main(json_args) == 0
    assert "split val: 1 samples in" in capsys.readouterr().out
    labels = sorted(root.glob("gts/*/*/labels.npz"))
    labels[0].write_bytes(labels[0].read_bytes()[:50])  # truncated
    zeros = np.zeros((40, 40, 8), np.uint8)
    np.savez(labels[1], semantics=zeros + 18, mask_lidar=zeros, mask_camera=zeros)  # an id beyond free
    image = sorted(root.glob("samples/CAM_FRONT/*.jpg"))[0]
    image.unlink()
    assert cli_main(args) == 1
    out = capsys.readouterr().out
    assert f"BAD     {labels[0]}: labels file is not a readable .npz" in out
    assert f"BAD     {labels[1]}: semantics span 18..18, expected 0..17" in out
    assert f"MISSING {image}" in out
    assert "3 problems (1 missing, 2 bad)" in out
    assert cli_main([*args, "--quick"]) == 1  # the zip directory only: ids are not read
    assert "2 problems (1 missing, 1 bad)" in capsys.readouterr().out
