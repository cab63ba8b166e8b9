import pytest
import torch
from torch.utils.data import DataLoader

from spotocc.config import get_config
from spotocc.data import NuScenesOccupancy, SemanticKITTI, build_dataset, collate


def _kitti_config(tiny, root, *overrides):
    return get_config(
        "synthetic_tiny",
        [
            f"data.root={str(root)!r}",
            f"grid.occ_size={tiny.KITTI_OCC_SIZE}",
            f"data.input_size={tiny.KITTI_INPUT_SIZE}",
            *overrides,
        ],
    )


def test_build_dataset_semantickitti_from_a_preset(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path)
    cfg = _kitti_config(tiny, root)
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert isinstance(train, SemanticKITTI) and train.train and not val.train
    assert "gt_depth" in train[0] and "gt_depth" not in val[0]
    assert not build_dataset(cfg, "train", train=False).train
    assert train[0]["gt_occ"].shape == tiny.KITTI_OCC_SIZE
    with pytest.raises(ValueError, match="unknown SemanticKITTI split"):
        build_dataset(cfg, "nope")
    with pytest.raises(ValueError, match="unknown data.format"):
        build_dataset(_kitti_config(tiny, root, "data.format='kitti'"), "train")


def _nusc_config(tiny, paths):
    return get_config(
        "spotocc_nusc_256",
        [
            f"data.root={str(paths['data_root'])!r}",
            f"data.occ_root={str(paths['occ_root'])!r}",
            f"data.depth_root={str(paths['depth_root'])!r}",
            f"data.train_info={str(paths['info_file'])!r}",
            f"data.val_info={str(paths['info_file'])!r}",
            f"data.cameras={tiny.NUSC_CAMERAS}",
            f"data.input_size={tiny.NUSC_INPUT_SIZE}",
            f"grid.occ_size={tiny.NUSC_OCC_SIZE}",
        ],
    )


def test_build_dataset_nuscenes_from_a_preset(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path)
    cfg = _nusc_config(tiny, paths)
    train = build_dataset(cfg, "train")
    assert isinstance(train, NuScenesOccupancy) and train.train and train.bgr_input
    assert "gt_depth" in train[0] and "gt_depth" not in build_dataset(cfg, "val")[0]
    assert len(build_dataset(cfg, str(paths["info_file"]))) == 2
    with pytest.raises(ValueError, match="unknown nuScenes-Occupancy split 'test'"):
        build_dataset(cfg, "test")


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_collate_any_batch_size(tmp_path, tiny, batch_size):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("00",), frames=("000000", "000005", "000010"))
    ds = build_dataset(_kitti_config(tiny, root), "train")
    batch = collate([ds[i] for i in range(batch_size)])
    assert batch["img"].shape == (batch_size, 1, 3, *tiny.KITTI_INPUT_SIZE)
    assert batch["intrins"].shape == (batch_size, 1, 4, 4) and batch["bda"].shape == (batch_size, 4, 4)
    assert (
        batch["gt_occ"].shape == (batch_size, *tiny.KITTI_OCC_SIZE) and batch["gt_occ"].dtype == torch.uint8
    )
    assert batch["gt_depth"].shape == (batch_size, 1, *tiny.KITTI_INPUT_SIZE)
    assert [m["sample_id"] for m in batch["meta"]] == ["00_000000", "00_000005", "00_000010"][:batch_size]


def test_dataloader_with_two_workers(tmp_path, tiny):
    root = tiny.make_kitti_dataset(
        tmp_path, sequences=("00",), frames=("000000", "000005", "000010", "000015")
    )
    ds = build_dataset(_kitti_config(tiny, root), "train")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, shuffle=False)
    batches = list(loader)
    assert [len(b["meta"]) for b in batches] == [2, 2]
    ids = [m["sample_id"] for b in batches for m in b["meta"]]
    assert ids == ["00_000000", "00_000005", "00_000010", "00_000015"]
    # Workers draw different augmentations (the per-sample generator comes from torch's seed).
    post = torch.cat([b["post_trans"][:, 0] for b in batches])
    assert len({tuple(p.tolist()) for p in post}) == 4


def test_nuscenes_dataloader_with_two_workers(tmp_path, tiny):
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=4)
    ds = build_dataset(_nusc_config(tiny, paths), "train")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, shuffle=False)
    batches = list(loader)
    assert [len(b["meta"]) for b in batches] == [2, 2]
    assert [m["sample_id"] for b in batches for m in b["meta"]] == [
        "sample3",
        "sample2",
        "sample1",
        "sample0",
    ]
    for b in batches:
        assert b["img"].shape == (2, len(tiny.NUSC_CAMERAS), 3, *tiny.NUSC_INPUT_SIZE)
        assert b["gt_occ"].shape == (2, *tiny.NUSC_OCC_SIZE) and b["gt_depth"].shape[:2] == (
            2,
            len(tiny.NUSC_CAMERAS),
        )
    # the same samples read in the main process give the same ground truth
    assert torch.equal(batches[1]["gt_occ"][0], ds[2]["gt_occ"])
