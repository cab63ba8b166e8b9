import numpy as np
import pytest
import torch

from spotocc.config import AugmentationConfig
from spotocc.data import DataFileError, MissingFileError, SemanticKITTI
from spotocc.data.semantic_kitti import (
    LEARNING_MAP,
    learning_map_lut,
    read_calib,
    read_preprocessed_gt,
    read_voxel_gt,
    remap_labels,
    unpack_bits,
)


def _dataset(tiny, root, split="train", **kwargs):
    return SemanticKITTI(
        root, split, occ_size=tiny.KITTI_OCC_SIZE, input_size=tiny.KITTI_INPUT_SIZE, **kwargs
    )


def test_unpack_bits_is_msb_first():
    bits = unpack_bits(np.array([0b10000000, 0b00000011, 0xFF], dtype=np.uint8))
    assert bits.tolist() == [1, 0, 0, 0, 0, 0, 0, 0] + [0, 0, 0, 0, 0, 0, 1, 1] + [1] * 8


def test_learning_map_lut_matches_the_release_rules():
    lut = learning_map_lut()
    assert len(lut) == 359  # max raw id 259 + 100
    expected = {0: 0, 1: 255, 10: 1, 11: 2, 40: 9, 44: 10, 52: 255, 60: 9, 99: 255, 252: 1, 258: 4, 259: 5}
    for raw, cls in expected.items():
        assert lut[raw] == cls, raw
    assert lut[300] == 255 and lut[2] == 255  # ids absent from the yaml are ignored
    # Ids beyond the table (the release would index out of range) are ignored too.
    assert remap_labels(np.array([10, 500, 65535, 0], dtype=np.uint16)).tolist() == [1, 255, 255, 0]


def test_voxel_gt_bits_labels_and_orientation(tmp_path, tiny):
    occ_size = (4, 2, 8)  # 64 voxels, flat index (i * 2 + j) * 8 + k
    raw = np.zeros(64, dtype=np.uint16)
    raw[(3 * 2 + 1) * 8 + 5] = 10  # car at [3, 1, 5]
    raw[(0 * 2 + 1) * 8 + 0] = 40  # road at [0, 1, 0]
    raw[(2 * 2 + 0) * 8 + 7] = 52  # other-structure -> ignore
    raw[(1 * 2 + 0) * 8 + 2] = 70  # vegetation, but invalid below
    invalid = np.zeros(64, dtype=np.uint8)
    invalid[(1 * 2 + 0) * 8 + 2] = 1
    invalid[63] = 1
    (tmp_path / "f.label").write_bytes(raw.astype("<u2").tobytes())
    (tmp_path / "f.invalid").write_bytes(tiny.pack_bits(invalid))
    gt = read_voxel_gt(tmp_path / "f.label", tmp_path / "f.invalid", occ_size)
    assert gt.dtype == np.uint8 and gt.shape == occ_size
    assert gt[3, 1, 5] == 1 and gt[0, 1, 0] == 9 and gt[2, 0, 7] == 255
    assert gt[1, 0, 2] == 255 and gt[3, 1, 7] == 255
    assert (gt == 0).sum() == 64 - 5


def test_calib_gives_p2_and_tr_as_4x4(tmp_path, tiny):
    path = tmp_path / "calib.txt"
    tiny.write_calib(path, tiny.kitti_calib())
    calib = read_calib(path)
    assert calib["P2"].shape == (4, 4) and np.allclose(calib["P2"][:3], tiny.KITTI_P2)
    assert np.allclose(calib["P2"][3], [0, 0, 0, 1]) and np.allclose(calib["Tr"][:3], tiny.KITTI_TR)


def test_sample_dict_geometry_and_gt(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path)
    ds = _dataset(tiny, root, "val")
    assert ds.frames == [("08", "000000"), ("08", "000005")]
    s = ds[1]
    assert s["img"].shape == (1, 3, *tiny.KITTI_INPUT_SIZE) and s["img"].dtype == torch.float32
    assert s["intrins"].shape == (1, 4, 4) and s["bda"].shape == (4, 4)
    assert torch.equal(s["bda"], torch.eye(4)) and "gt_depth" not in s
    assert torch.allclose(s["intrins"][0, :3].double(), torch.from_numpy(tiny.KITTI_P2), atol=1e-6)
    cam2lidar = np.linalg.inv(np.vstack([tiny.KITTI_TR, [0, 0, 0, 1]]))
    assert np.allclose(s["rots"][0].numpy(), cam2lidar[:3, :3], atol=1e-6)
    assert np.allclose(s["trans"][0].numpy(), cam2lidar[:3, 3], atol=1e-6)
    # Test transform: scale 128/160 = 0.8, resized 128x38, bottom 32 rows kept -> crop y 6.
    assert torch.allclose(s["post_rots"][0], torch.diag(torch.tensor([0.8, 0.8, 1.0])))
    assert torch.allclose(s["post_trans"][0], torch.tensor([0.0, -6.0, 0.0]))
    # GT: independent remap of the raw files with the yaml dict.
    voxels = root / "dataset/sequences/08/voxels"
    raw = np.fromfile(voxels / "000005.label", dtype="<u2")
    invalid = np.unpackbits(np.fromfile(voxels / "000005.invalid", dtype=np.uint8))
    expected = np.array([LEARNING_MAP.get(int(r), 0) or (255 if r else 0) for r in raw], dtype=np.uint8)
    expected[invalid == 1] = 255
    assert s["gt_occ"].dtype == torch.uint8
    assert np.array_equal(s["gt_occ"].numpy().reshape(-1), expected)
    assert s["meta"]["sample_id"] == "08_000005"


def test_splits_every_5th_test_submit_and_preprocessed_labels(tmp_path, tiny):
    root = tiny.make_kitti_dataset(
        tmp_path, sequences=("00", "01", "08", "11"), frames=("000000", "000003", "000010")
    )
    train = _dataset(tiny, root, "train")
    assert [f"{s}_{f}" for s, f in train.frames] == [
        "00_000000", "00_000003", "00_000010", "01_000000", "01_000003", "01_000010"
    ]  # fmt: skip
    assert len({train[i]["meta"]["sample_id"] for i in range(len(train))}) == 6
    assert len(_dataset(tiny, root, "trainval")) == 9
    assert [f for _, f in _dataset(tiny, root, "val", every_5th_scan=True).frames] == ["000000", "000010"]
    submit = _dataset(tiny, root, "test-submit")
    assert len(submit) == 3 and "gt_occ" not in submit[0]
    # A released preprocessed label file takes precedence over the raw voxels.
    labels = np.full(tiny.KITTI_OCC_SIZE, 13, dtype=np.float32)
    labels[0, 0, 0] = 255
    (root / "labels/08").mkdir(parents=True)
    np.save(root / "labels/08/000003_1_1.npy", labels)
    gt = _dataset(tiny, root, "val")[1]["gt_occ"]
    assert gt[0, 0, 0] == 255 and (gt == 13).sum() == gt.numel() - 1
    with pytest.raises(ValueError, match="unknown SemanticKITTI split 'valid'"):
        _dataset(tiny, root, "valid")
    empty = tmp_path / "empty"
    (empty / "dataset/sequences/08").mkdir(parents=True)
    with pytest.raises(ValueError, match="no frames found"):
        _dataset(tiny, empty, "val")
    with pytest.raises(MissingFileError, match="sequences folder is missing"):
        _dataset(tiny, tmp_path / "nowhere", "val")


def test_train_sample_has_depth_and_bev_flips_change_gt_consistently(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path)
    plain = _dataset(tiny, root, "train")[0]["gt_occ"].numpy()
    ds = _dataset(tiny, root, "train", train=True, augmentation=AugmentationConfig(bda=True))
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        s = ds[0]
        flips = s["meta"]["bev_flips"]
        seen.add(flips)
        axes = tuple(a for a in range(3) if flips[a])
        assert np.array_equal(s["gt_occ"].numpy(), np.flip(plain, axes) if axes else plain)
        assert s["gt_depth"].shape == (1, *tiny.KITTI_INPUT_SIZE) and (s["gt_depth"] > 0).any()
        # bda = mirror about the range centre (25.6, 0, 1.2).
        expected = torch.eye(4)
        for a, centre in zip(range(3), (25.6, 0.0, 1.2)):
            if flips[a]:
                expected[a, a], expected[a, 3] = -1.0, 2 * centre
        assert torch.allclose(s["bda"], expected, atol=1e-5)
    assert len(seen) > 3  # flips are drawn independently per sample


def test_bad_inputs_give_clear_errors(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("08",), frames=("000000", "000005", "000010"))
    voxels = root / "dataset/sequences/08/voxels"
    (root / "dataset/sequences/08/image_2/000000.png").unlink()
    label = (voxels / "000005.label").read_bytes()
    (voxels / "000005.label").write_bytes(label[:-10])
    invalid = (voxels / "000010.invalid").read_bytes()
    (voxels / "000010.invalid").write_bytes(invalid + b"\0")
    ds = _dataset(tiny, root, "val")
    with pytest.raises(MissingFileError, match=r"image_2/000000\.png: image is missing"):
        ds[0]
    with pytest.raises(
        DataFileError, match=r"000005\.label: voxel label file has 4086 bytes, expected 4096.*truncated"
    ):
        ds[1]
    with pytest.raises(
        DataFileError, match=r"000010\.invalid: invalid-voxel file has 257 bytes, expected 256"
    ):
        ds[2]
    # An image that does not decode.
    (root / "dataset/sequences/08/image_2/000000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataFileError, match=r"000000\.png: image does not decode"):
        ds[0]
    # Missing ground truth of a split that needs it.
    (voxels / "000010.label").unlink()
    with pytest.raises(MissingFileError, match=r"000010\.label: voxel label file is missing"):
        ds[2]
    # A velodyne scan of the wrong size (training needs it).
    (root / "dataset/sequences/08/velodyne/000005.bin").write_bytes(b"\0" * 10)
    (voxels / "000005.label").write_bytes(label)
    with pytest.raises(DataFileError, match=r"000005\.bin: velodyne scan has 10 bytes"):
        _dataset(tiny, root, "val", train=True)[1]


@pytest.mark.parametrize("drop", ["P2", "Tr"])
def test_calib_without_p2_or_tr(tmp_path, tiny, drop):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("08",), frames=("000000",))
    calib = {k: v for k, v in tiny.kitti_calib().items() if k != drop}
    tiny.write_calib(root / "dataset/sequences/08/calib.txt", calib)
    with pytest.raises(DataFileError, match=f"calib.txt: calibration has no {drop} matrix"):
        _dataset(tiny, root, "val")
    (root / "dataset/sequences/08/calib.txt").write_text("P2: 1 2 3\nTr: " + " ".join(["1"] * 12) + "\n")
    with pytest.raises(DataFileError, match="P2 has 3 finite values, expected 12"):
        _dataset(tiny, root, "val")


def test_preprocessed_label_checks(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4, 2), dtype=np.float32))
    with pytest.raises(DataFileError, match=r"shape \(4, 4, 2\), expected \(4, 4, 8\)"):
        read_preprocessed_gt(tmp_path / "a.npy", (4, 4, 8))
    np.save(tmp_path / "b.npy", np.full((4, 4, 8), 20, dtype=np.float32))
    with pytest.raises(DataFileError, match="outside 0..19 and 255"):
        read_preprocessed_gt(tmp_path / "b.npy", (4, 4, 8))
    assert read_preprocessed_gt(tmp_path / "b.npy", (4, 4, 8), header_only=True) is None  # values unread
    with pytest.raises(DataFileError, match=r"shape \(4, 4, 2\)"):
        read_preprocessed_gt(tmp_path / "a.npy", (4, 4, 8), header_only=True)


def test_grid_size_must_allow_bit_packing(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("08",), frames=("000000",))
    with pytest.raises(ValueError, match="multiple of 8"):
        SemanticKITTI(root, "val", occ_size=(3, 3, 3))
