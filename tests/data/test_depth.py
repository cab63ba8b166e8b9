import numpy as np
import torch

from spotocc.config import AugmentationConfig
from spotocc.data import NuScenesOccupancy, SemanticKITTI
from spotocc.data.depth import lidar_depth_targets, nearest_depth_map, pixel_depth_targets
from spotocc.data.transforms import ImageAugmentation


def _kitti_oracle(points, sample, height, width):
    """Brute force in float64: project every point, keep the nearest per rounded pixel."""
    depth = np.zeros((height, width))
    rots, trans = sample["rots"][0].double().numpy(), sample["trans"][0].double().numpy()
    k = sample["intrins"][0].double().numpy()
    a, b = sample["post_rots"][0, :2, :2].double().numpy(), sample["post_trans"][0, :2].double().numpy()
    for p in points[:, :3].astype(np.float64):
        h = k @ np.append(np.linalg.solve(rots, p - trans), 1.0)
        if h[2] <= 0:
            continue
        u, v = a @ (h[:2] / h[2]) + b
        if 0 <= u <= width - 1 and 0 <= v <= height - 1:
            r, c = int(np.round(v)), int(np.round(u))
            if depth[r, c] == 0 or h[2] < depth[r, c]:
                depth[r, c] = h[2]
    return depth


def test_nearest_wins_and_bounds_by_hand():
    uvd = torch.tensor(
        [
            [1.4, 2.6, 9.0],  # -> pixel (row 3, col 1)
            [0.6, 2.6, 4.0],  # same pixel, nearer: wins
            [1.2, 2.9, 6.0],  # same pixel, farther
            [3.0, 0.0, 2.0],  # u = W - 1 is inside
            [3.2, 0.0, 2.0],  # u > W - 1 is outside
            [-0.1, 1.0, 2.0],  # u < 0 is outside
            [2.0, 1.0, -1.0],  # behind the camera
        ]
    )
    depth = nearest_depth_map(uvd, height=4, width=4)
    expected = torch.zeros(4, 4)
    expected[3, 1], expected[0, 3] = 4.0, 2.0
    assert torch.equal(depth, expected)


def test_kitti_sample_depth_matches_brute_force_projection(tmp_path, tiny):
    root = tiny.make_kitti_dataset(tmp_path, sequences=("00",), frames=("000000",))
    ds = SemanticKITTI(
        root,
        "train",
        occ_size=tiny.KITTI_OCC_SIZE,
        input_size=tiny.KITTI_INPUT_SIZE,
        train=True,
        augmentation=AugmentationConfig(bda=True),
    )
    points = np.fromfile(root / "dataset/sequences/00/velodyne/000000.bin", dtype=np.float32).reshape(-1, 4)
    torch.manual_seed(3)
    for _ in range(4):
        s = ds[0]
        oracle = _kitti_oracle(points, s, *tiny.KITTI_INPUT_SIZE)
        assert (oracle > 0).sum() > 20
        assert np.allclose(s["gt_depth"][0].numpy(), oracle, atol=1e-4)
    # The depth is independent of the BEV flip (it is taken before it, in the camera's own frame).
    direct = lidar_depth_targets(
        torch.from_numpy(points), s["rots"], s["trans"], s["intrins"], s["post_rots"], s["post_trans"],
        tiny.KITTI_INPUT_SIZE,
    )  # fmt: skip
    assert torch.equal(direct, s["gt_depth"])


def test_nuscenes_truncation_and_last_write_wins_by_hand():
    identity = ImageAugmentation(resize=1.0, resize_dims=(6, 4), crop=(0, 0, 6, 4), flip=False, rotate=0.0)
    rows = np.array(
        [
            [3.7, 2.2, 5.0],  # -> (row 2, col 3)
            [3.1, 2.9, 9.0],  # same pixel, farther, later: wins (no z-buffer)
            [-0.5, 1.0, 4.0],  # truncation toward zero keeps u in (-1, 0) in column 0
            [5.99, 3.5, 1.5],  # -> (3, 5)
            [6.0, 1.0, 3.0],  # u = W is outside
            [1.0, -1.2, 3.0],  # v < -1 is outside
        ],
        dtype=np.float32,
    )
    depth = pixel_depth_targets(rows, identity, (4, 6))
    expected = torch.zeros(4, 6)
    expected[2, 3], expected[1, 0], expected[3, 5] = 9.0, 4.0, 1.5
    assert torch.equal(depth, expected)


def test_nuscenes_sample_depth_matches_the_projection_of_the_pixel_rows(tmp_path, tiny):
    rng = np.random.default_rng(4)
    rows = np.c_[rng.uniform(0, 160, 400), rng.uniform(0, 90, 400), rng.uniform(1, 50, 400)].astype(
        np.float32
    )
    paths = tiny.make_nusc_dataset(tmp_path, n_samples=1)
    info = tiny.nusc_info(0, timestamp=1000)
    tiny.write_nusc_sample(
        paths["data_root"], paths["occ_root"], paths["depth_root"], info,
        rows=np.array([[0, 0, 0, 1]]), depth_rows={c: rows for c in tiny.NUSC_CAMERAS},
    )  # fmt: skip
    ds = NuScenesOccupancy(
        paths["data_root"], paths["info_file"], paths["occ_root"], depth_root=paths["depth_root"],
        cameras=tiny.NUSC_CAMERAS, input_size=tiny.NUSC_INPUT_SIZE, occ_size=tiny.NUSC_OCC_SIZE, train=True,
    )  # fmt: skip
    height, width = tiny.NUSC_INPUT_SIZE
    torch.manual_seed(5)
    for _ in range(4):
        s = ds[0]
        for cam in range(2):
            a, b = s["post_rots"][cam, :2, :2].double().numpy(), s["post_trans"][cam, :2].double().numpy()
            oracle = np.zeros((height, width))
            for u, v, d in rows.astype(np.float64):  # file order, so later rows overwrite
                uu, vv = np.trunc(a @ np.array([u, v]) + b)
                if 0 <= uu < width and 0 <= vv < height:
                    oracle[int(vv), int(uu)] = d
            got = s["gt_depth"][cam].numpy()
            assert (oracle > 0).sum() > 50
            # Released arithmetic (float32, its own rotation) vs the matrices in float64: a point on a
            # pixel border may fall on either side, so compare all but a handful of pixels.
            assert (np.abs(got - oracle) > 1e-4).sum() <= 3
