"""``spotocc synth``: the preset supplies format, grid and image size; bad arguments are clear errors."""

from __future__ import annotations

import numpy as np
from PIL import Image

from spotocc.cli import main


def test_synth_with_the_synthetic_tiny_preset_writes_its_grid_and_image_size(tmp_path, capsys):
    out = tmp_path / "data"
    rc = main(["synth", "--preset", "synthetic_tiny", "--out", str(out), "--num-train", "0", "--num-val", "1",
               "--lidar-azimuth-steps", "128"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"data.root={out}" in printed and "64x64x16" in printed
    voxels = out / "dataset" / "sequences" / "08" / "voxels"
    assert (voxels / "000000.label").stat().st_size == 64 * 64 * 16 * 2
    assert (voxels / "000000.invalid").stat().st_size == 64 * 64 * 16 // 8
    with Image.open(out / "dataset" / "sequences" / "08" / "image_2" / "000000.png") as img:
        assert img.size == (640, 192)  # the preset's input size


def test_synth_nuscenes_with_explicit_grid_and_image_size_and_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["synth", "--format", "nuscenes-occupancy", "--out", str(out), "--num-train", "1",
            "--num-val", "0", "--grid", "32", "32", "8", "--image-size", "18", "32",
            "--lidar-azimuth-steps", "128"]  # fmt: skip
    assert main(args) == 0
    assert "data.occ_root=" in capsys.readouterr().out
    (npy,) = (out / "nuScenes-Occupancy").rglob("*.npy")
    rows = np.load(npy)
    assert rows.shape[1] == 4 and rows[:, 2].max() < 32 and rows[:, 0].max() < 8
    jpgs = sorted((out / "nuscenes" / "samples").rglob("*.jpg"))
    assert len(jpgs) == 6
    with Image.open(jpgs[0]) as img:
        assert img.size == (32, 18)
    # Running again needs --overwrite, which replaces the dataset (same seed: same files).
    before = npy.read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert npy.read_bytes() == before


def test_synth_reports_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--num-train", "-1", "--num-val", "0"]) == 2
    assert "--num-train" in capsys.readouterr().err
    assert (
        main(["synth", "--out", str(tmp_path), "--num-train", "1", "--num-val", "0", "--preset", "nope"]) == 2
    )
    assert "unknown preset" in capsys.readouterr().err
    assert (
        main(["synth", "--out", str(tmp_path), "--num-train", "1", "--num-val", "0", "--grid", "3", "3", "3"])
        == 2
    )
    assert "divisible by 8" in capsys.readouterr().err


def test_synth_occ3d_writes_labels_with_both_masks_and_both_sample_lists(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["synth", "--format", "occ3d-nuscenes", "--out", str(out), "--num-train", "1", "--num-val", "1",
            "--grid", "40", "40", "8", "--image-size", "18", "32", "--lidar-azimuth-steps", "64"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "data.train_info=" in printed and "bevdetv2-nuscenes_infos_train.pkl" in printed
    root = out / "occ3d-nuscenes"
    (labels, _) = sorted(root.glob("gts/*/*/labels.npz"))
    with np.load(labels) as npz:
        assert sorted(npz.files) == ["mask_camera", "mask_lidar", "semantics"]
        assert all(npz[k].shape == (40, 40, 8) and npz[k].dtype == np.uint8 for k in npz.files)
        assert npz["semantics"].max() == 17 and set(np.unique(npz["mask_camera"])) <= {0, 1}
    assert (root / "annotations.json").is_file() and (root / "bevdetv2-nuscenes_infos_val.pkl").is_file()
    assert len(sorted((root / "imgs").rglob("*.jpg"))) == 12  # the imgs link of the Occ3D layout
