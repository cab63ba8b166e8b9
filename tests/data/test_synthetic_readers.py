"""Synthetic scenes written in the real layouts read back through the real readers."""

import numpy as np
import pytest
import torch

from spotocc.config import GridConfig, apply_overrides, get_config
from spotocc.data import build_dataset, collate
from spotocc.data.depth import project_points
from spotocc.data.synthetic import generate, source_image_size
from spotocc.data.synthetic.sample import make_sample
from spotocc.data.transforms import denormalize_image


@pytest.fixture(scope="module")
def kitti_root(tmp_path_factory):
    cfg = get_config("synthetic_tiny")
    out = tmp_path_factory.mktemp("synth_kitti")
    summary = generate(
        out,
        "semantickitti",
        num_train=2,
        num_val=1,
        seed=3,
        grid=cfg.grid,
        image_size=source_image_size(cfg.data),
    )
    return apply_overrides(cfg, summary.data_overrides)


def test_semantickitti_reader_returns_the_generated_ground_truth(kitti_root):
    cfg = kitti_root
    for split, train_flag in (("train", False), ("val", False)):
        dataset = build_dataset(cfg, split, train=train_flag)
        generated = {
            make_sample(
                "semantickitti", split, i, seed=3, grid=cfg.grid, image_size=source_image_size(cfg.data)
            ).gt.tobytes()
            for i in range(2 if split == "train" else 1)
        }
        read = {dataset[i]["gt_occ"].numpy().tobytes() for i in range(len(dataset))}
        assert len(dataset) == len(generated)
        assert read == generated


def test_semantickitti_reader_decodes_the_raw_label_and_invalid_files(tmp_path):
    """Without the released ``labels/*_1_1.npy`` the reader unpacks ``voxels/*.label|*.invalid``."""
    cfg = get_config("synthetic_tiny")
    size = source_image_size(cfg.data)
    options = {"grid": cfg.grid, "image_size": size, "write_npy_labels": False}
    summary = generate(tmp_path, "semantickitti", num_train=0, num_val=1, seed=4, **options)
    assert not list(tmp_path.rglob("*.npy")) and list(tmp_path.rglob("*.invalid"))
    cfg = apply_overrides(cfg, summary.data_overrides)
    read = build_dataset(cfg, "val", train=False)[0]["gt_occ"].numpy()
    expected = make_sample("semantickitti", "val", 0, seed=4, grid=cfg.grid, image_size=size).gt
    assert np.array_equal(read, expected) and (expected == 255).any() and (expected > 0).any()


@pytest.fixture(scope="module")
def kitti_native_root(tmp_path_factory):
    """One validation scene rendered at KITTI's native 370x1226, for synthetic_tiny's 192x640 input."""
    cfg = get_config("synthetic_tiny")
    out = tmp_path_factory.mktemp("synth_kitti_native")
    summary = generate(
        out, "semantickitti", num_train=0, num_val=1, seed=3, grid=cfg.grid, image_size=(370, 1226)
    )
    return apply_overrides(cfg, summary.data_overrides)


@pytest.mark.parametrize("root", ["kitti_root", "kitti_native_root"])
def test_semantickitti_sample_is_model_ready_and_geometry_matches_the_render(root, request):
    # At the preset's own source size, and at KITTI's native size resized by the reader (the model is
    # also judged on scenes rendered by other code at 370x1226).
    cfg = request.getfixturevalue(root)
    dataset = build_dataset(cfg, "val", train=False)
    sample = dataset[0]
    size = source_image_size(cfg.data) if root == "kitti_root" else (370, 1226)
    synth = make_sample("semantickitti", "val", 0, seed=3, grid=cfg.grid, image_size=size)
    assert synth.renders[0].depth.shape == size
    h, w = cfg.data.input_size
    assert sample["img"].shape == (1, 3, h, w) and sample["intrins"].shape == (1, 4, 4)
    # a LiDAR hit projected with the reader's geometry lands where the renderer saw the same depth
    points = torch.as_tensor(synth.lidar.points[:, :3], dtype=torch.float32)
    uvd = project_points(
        points, sample["rots"], sample["trans"], sample["intrins"], sample["post_rots"], sample["post_trans"]
    )[:, 0]  # [P, 3]: u, v, depth in the (only) camera
    uv, depth = uvd[:, :2], uvd[:, 2]
    inside = (depth > 1) & (uv[:, 0] >= 0) & (uv[:, 0] < w - 1) & (uv[:, 1] >= 0) & (uv[:, 1] < h - 1)
    assert inside.sum() > 100
    # network pixel -> source pixel: the inverse of the reader's image augmentation (resize, crop)
    src = torch.linalg.solve(sample["post_rots"][0, :2, :2], (uv[inside] - sample["post_trans"][0, :2]).T).T
    src_u, src_v = (
        src[:, 0].round().long().clamp(0, size[1] - 1),
        src[:, 1].round().long().clamp(0, size[0] - 1),
    )
    rendered = torch.as_tensor(synth.renders[0].depth)[src_v, src_u]
    rel = ((rendered - depth[inside]).abs() / depth[inside]).median()
    assert rel < 0.05
    # ... and the network image there shows the rendered colour of that source pixel
    u, v = uv[inside, 0].round().long(), uv[inside, 1].round().long()
    network_rgb = torch.as_tensor(denormalize_image(sample["img"][0], bgr_input=cfg.data.bgr_input))[v, u]
    source_rgb = torch.as_tensor(synth.renders[0].image)[src_v, src_u]
    assert (network_rgb.float() - source_rgb.float()).abs().median() < 12
    batch = collate([dataset[0], dataset[0]])
    assert batch["gt_occ"].shape == (2, *cfg.grid.occ_size)


NUSC_GRID = GridConfig(
    point_cloud_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), occ_size=(64, 64, 8), lss_downsample=4
)


def _nuscenes_config(root, *, num_val, seed, image_size):
    """Generated nuScenes-Occupancy scenes (one train sample) read at 64x112 on a 64x64x8 grid."""
    summary = generate(
        root,
        "nuscenes-occupancy",
        num_train=1,
        num_val=num_val,
        seed=seed,
        grid=NUSC_GRID,
        image_size=image_size,
    )
    cfg = apply_overrides(
        get_config("spotocc_nusc_256"), summary.data_overrides + ["data.input_size=(64, 112)"]
    )
    cfg.grid = NUSC_GRID
    return cfg


def test_nuscenes_reader_returns_the_generated_ground_truth(tmp_path):
    grid = NUSC_GRID
    cfg = _nuscenes_config(tmp_path, num_val=1, seed=5, image_size=(64, 112))
    dataset = build_dataset(cfg, "val", train=False)
    sample = dataset[0]
    expected = make_sample("nuscenes-occupancy", "val", 0, seed=5, grid=grid, image_size=(64, 112)).gt
    assert sample["img"].shape == (6, 3, 64, 112)
    assert np.array_equal(sample["gt_occ"].numpy(), expected)
    train = build_dataset(cfg, "train", train=True)[0]
    assert train["gt_depth"].shape == (6, 64, 112) and (train["gt_depth"] > 0).any()


def _gt_depth_vs_render(sample, renders):
    """Per camera: the median relative difference between the reader's depth targets (augmented
    image frame) and the renderer's depth at the source pixels they come from (the augmentation
    undone), and how many targets were compared."""
    results = []
    for cam, render in enumerate(renders):
        depth = sample["gt_depth"][cam]  # [H, W], 0 = no target
        v, u = depth.nonzero(as_tuple=True)
        aug_uv = torch.stack([u, v], dim=1).double()  # [P, 2]
        rot, tran = sample["post_rots"][cam, :2, :2].double(), sample["post_trans"][cam, :2].double()
        src = (torch.linalg.inv(rot) @ (aug_uv - tran).T).T.round().long()  # [P, 2] source (u, v)
        rendered = torch.as_tensor(render.depth)
        h, w = rendered.shape
        inside = (src[:, 0] >= 0) & (src[:, 0] < w) & (src[:, 1] >= 0) & (src[:, 1] < h)
        target = depth[v[inside], u[inside]].double()
        seen = rendered[src[inside, 1], src[inside, 0]].double()
        results.append((float(((seen - target).abs() / target).median()), int(inside.sum())))
    return results


def test_semantickitti_depth_targets_under_augmentation_agree_with_the_rendered_depth(kitti_root):
    cfg = kitti_root
    dataset = build_dataset(cfg, "train", train=True)
    synth = make_sample(
        "semantickitti", "train", 0, seed=3, grid=cfg.grid, image_size=source_image_size(cfg.data)
    )
    torch.manual_seed(0)  # the reader's augmentation draws from torch's seed
    for _ in range(3):  # three random augmentations of the same frame
        sample = dataset[0]
        assert not torch.equal(sample["post_rots"][0], torch.eye(3))  # resized / rotated / flipped
        [(median, count)] = _gt_depth_vs_render(sample, synth.renders)
        assert count > 100 and median < 0.05


def test_nuscenes_depth_targets_under_augmentation_agree_with_the_rendered_depth(tmp_path):
    grid = NUSC_GRID
    cfg = _nuscenes_config(tmp_path, num_val=0, seed=6, image_size=(90, 160))
    torch.manual_seed(0)  # the reader's augmentation draws from torch's seed
    sample = build_dataset(cfg, "train", train=True)[0]
    synth = make_sample("nuscenes-occupancy", "train", 0, seed=6, grid=grid, image_size=(90, 160))
    render_of = {cam.name: render for cam, render in zip(synth.cameras, synth.renders)}
    renders = [render_of[name] for name in cfg.data.cameras]  # the reader's camera order
    assert sample["gt_depth"].shape == (6, 64, 112)
    assert [bool(rot[0, 0] < 0) for rot in sample["post_rots"]].count(True) > 0  # some cameras flipped
    for name, (median, count) in zip(cfg.data.cameras, _gt_depth_vs_render(sample, renders)):
        assert count > 100 and median < 0.05, name
