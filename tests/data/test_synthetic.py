"""The synthetic generator: exact on-disk formats, GT read-back, renderer/geometry agreement, determinism.

The files are read back with minimal readers written here from the format descriptions (spec 04),
independent of the generator's writers and of the project's dataset readers.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spotocc.config import GridConfig
from spotocc.data.synthetic import KINDS, generate, make_sample, most_frequent_labels, ssc_scores
from spotocc.data.synthetic.kitti_format import pack_bits
from spotocc.data.synthetic.raycast import VoxelRaycaster

KITTI_GRID = GridConfig(point_cloud_range=(0.0, -25.6, -2.0, 51.2, 25.6, 4.4), occ_size=(64, 64, 16))
NUSC_GRID = GridConfig(point_cloud_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), occ_size=(96, 96, 10))
KITTI_IMAGE = (96, 320)
NUSC_IMAGE = (72, 128)
SEED = 3

# semantic-kitti.yaml learning_map, typed in from spec 04 section 1.4 (independent of the generator's copy).
LEARNING_MAP = """0:0 1:0 10:1 11:2 13:5 15:3 16:5 18:4 20:5 30:6 31:7 32:8 40:9 44:10 48:11 49:12 50:13 51:14
52:0 60:9 70:15 71:16 72:17 80:18 81:19 99:0 252:1 253:7 254:6 255:8 256:5 257:5 258:4 259:5"""


def kitti_lut() -> np.ndarray:
    lut = np.zeros(359, dtype=np.int64)
    for item in LEARNING_MAP.split():
        raw, cls = item.split(":")
        lut[int(raw)] = int(cls)
    lut[lut == 0] = 255
    lut[0] = 0
    return lut


def unpack_msb_first(data: bytes) -> np.ndarray:
    """Every byte b -> [(b >> 7) & 1, ..., b & 1]."""
    b = np.frombuffer(data, dtype=np.uint8)
    return np.stack([(b >> (7 - i)) & 1 for i in range(8)], axis=1).reshape(-1)


def read_calib(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break
        key, values = line.split(":", 1)
        m = np.eye(4)
        m[:3] = np.array([float(v) for v in values.split()]).reshape(3, 4)
        out[key] = m
    return out


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti")
    summary = generate(
        root, "semantickitti", num_train=2, num_val=1, seed=SEED, grid=KITTI_GRID, image_size=KITTI_IMAGE
    )
    return root, summary


@pytest.fixture(scope="module")
def kitti_val_sample():
    return make_sample("semantickitti", "val", 0, seed=SEED, grid=KITTI_GRID, image_size=KITTI_IMAGE)


@pytest.fixture(scope="module")
def nusc(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    summary = generate(
        root, "nuscenes-occupancy", num_train=1, num_val=1, seed=SEED, grid=NUSC_GRID, image_size=NUSC_IMAGE
    )
    return root, summary


@pytest.fixture(scope="module")
def nusc_val_sample():
    return make_sample("nuscenes-occupancy", "val", 0, seed=SEED, grid=NUSC_GRID, image_size=NUSC_IMAGE)


# --------------------------------------------------------------------------------------------------
# Visibility oracle and colour classifier shared by the geometry tests


def visible(centre: np.ndarray, targets: np.ndarray, opaque: np.ndarray, grid: GridConfig) -> np.ndarray:
    """bool [N]: the segment from ``centre`` to the centre of voxel ``targets[n]`` crosses no other opaque
    voxel (fine-step marching, 12 samples per voxel length; independent of the generator's ray caster)."""
    r = np.asarray(grid.point_cloud_range)
    vs = np.asarray(grid.occ_voxel_size)
    out = np.zeros(len(targets), dtype=bool)
    for start in range(0, len(targets), 32):
        tgt = targets[start : start + 32]  # [n, 3]
        ends = r[:3] + (tgt + 0.5) * vs
        steps = int(np.linalg.norm((ends - centre) / vs, axis=1).max() * 12) + 2
        frac = np.linspace(0.0, 1.0, steps)
        pts = centre + frac[None, :, None] * (ends - centre)[:, None, :]  # [n, S, 3]
        idx = np.floor((pts - r[:3]) / vs).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(opaque.shape)), axis=2)
        hit = opaque[tuple(np.clip(idx, 0, np.asarray(opaque.shape) - 1).transpose(2, 0, 1))]  # [n, S]
        other = np.any(idx != tgt[:, None, :], axis=2)
        out[start : start + 32] = ~np.any(hit & inside & other, axis=1)
    return out


def first_visible(centre, targets, opaque, grid, count: int, chunk: int = 256) -> np.ndarray:
    """Indices of the first ``count`` visible ``targets`` (in order)."""
    found: list[np.ndarray] = []
    for start in range(0, len(targets), chunk):
        found.append(start + np.nonzero(visible(centre, targets[start : start + chunk], opaque, grid))[0])
        if sum(len(f) for f in found) >= count:
            break
    return np.concatenate(found)[:count] if found else np.zeros(0, dtype=np.int64)


def has_empty_neighbour(occupied: np.ndarray) -> np.ndarray:
    padded = np.pad(occupied, 1, constant_values=False)
    out = np.zeros(occupied.shape, dtype=bool)
    for axis in range(3):
        for shift in (-1, 1):
            out |= ~np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def shows_class_colour(pixel: np.ndarray, cls: int, class_of_kind: np.ndarray, max_deg: float = 10.0) -> bool:
    """True if ``pixel`` is the colour of a kind of class ``cls`` up to brightness (shading, tint, texture
    change brightness only): the angle between the RGB vectors is below ``max_deg``."""
    for kind, c in zip(KINDS, class_of_kind):
        if kind.rendered and c == cls:
            col = np.asarray(kind.colour, dtype=np.float64)
            cos = pixel @ col / (np.linalg.norm(pixel) * np.linalg.norm(col) + 1e-9)
            if np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))) < max_deg:
                return True
    return False


# --------------------------------------------------------------------------------------------------
# SemanticKITTI


def test_kitti_files_have_the_exact_layout_and_sizes(kitti):
    root, summary = kitti
    X, Y, Z = KITTI_GRID.occ_size
    seqs = root / "dataset" / "sequences"
    # Train samples round-robin in the train sequences, val in 08; frame ids are multiples of 5.
    expected = {("00", "000000"), ("01", "000000"), ("08", "000000")}
    found = {(p.parts[-3], p.stem) for p in seqs.glob("*/voxels/*.label")}
    assert found == expected
    for seq in ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10"):
        assert (seqs / seq / "calib.txt").is_file()
    for seq, frame in expected:
        vox = seqs / seq / "voxels"
        assert (vox / f"{frame}.label").stat().st_size == X * Y * Z * 2
        for suffix in ("invalid", "bin", "occluded"):
            assert (vox / f"{frame}.{suffix}").stat().st_size == X * Y * Z // 8
        velo = (seqs / seq / "velodyne" / f"{frame}.bin").read_bytes()
        assert len(velo) % 16 == 0
        pts = np.frombuffer(velo, dtype="<f4").reshape(-1, 4)
        assert len(pts) > 5000 and np.isfinite(pts).all()
        assert 0.0 <= pts[:, 3].min() and pts[:, 3].max() <= 1.0
        # A spinning scan sees all around, the ground about 1.7 m below the sensor.
        assert (pts[:, 0] < 0).any() and (pts[:, 0] > 0).any()
        assert -2.3 < np.percentile(pts[:, 2], 5) < -1.2
        with Image.open(seqs / seq / "image_2" / f"{frame}.png") as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (KITTI_IMAGE[1], KITTI_IMAGE[0])
        npy = np.load(root / "labels" / seq / f"{frame}_1_1.npy")
        assert npy.dtype == np.float32 and npy.shape == (X, Y, Z)
    calib_lines = (seqs / "08" / "calib.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in calib_lines] == ["P0", "P1", "P2", "P3", "Tr"]
    assert all(len(line.split(":")[1].split()) == 12 for line in calib_lines)
    calib = read_calib(seqs / "08" / "calib.txt")
    assert abs(calib["P2"][0, 3]) > 1.0  # the colour camera's stereo offset column
    # Tr maps velodyne x (forward) to camera z (forward), velodyne z (up) to camera -y (down is +y).
    assert calib["Tr"][2, 0] > 0.99 and calib["Tr"][1, 2] < -0.99
    assert (seqs / "08" / "poses.txt").read_text().count("\n") == 1
    assert all(Path(root, f).is_file() for f in summary.files)


def test_pack_bits_is_msb_first_in_c_order():
    mask = np.zeros((2, 2, 4), dtype=bool)
    mask[0, 0, 0] = True  # flat 0 -> bit 7 of byte 0
    mask[1, 1, 3] = True  # flat 15 -> bit 0 of byte 1
    mask[0, 1, 1] = True  # flat 5 -> bit 2 of byte 0
    assert pack_bits(mask) == bytes([0b10000100, 0b00000001])
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(np.zeros(7, dtype=bool))


def test_kitti_ground_truth_reads_back_through_the_learning_map(kitti, kitti_val_sample):
    root, _ = kitti
    X, Y, Z = KITTI_GRID.occ_size
    vox = root / "dataset" / "sequences" / "08" / "voxels"
    raw = np.fromfile(vox / "000000.label", dtype="<u2").reshape(X, Y, Z)
    invalid = unpack_msb_first((vox / "000000.invalid").read_bytes()).reshape(X, Y, Z)
    gt = kitti_lut()[raw]
    gt[invalid == 1] = 255
    sample = kitti_val_sample
    np.testing.assert_array_equal(gt, sample.gt)
    np.testing.assert_array_equal(
        np.load(root / "labels" / "08" / "000000_1_1.npy"), sample.gt.astype(np.float32)
    )
    lidar = unpack_msb_first((vox / "000000.bin").read_bytes()).reshape(X, Y, Z).astype(bool)
    np.testing.assert_array_equal(lidar, sample.lidar_voxels)
    # Official orientation: k = 0 is the bottom slab, the road lies in the lowest slabs below the
    # sensor, and the ego car's own column in front of the sensor is empty.
    road = np.argwhere(gt == 9)
    assert road.size and np.median(road[:, 2]) <= 2
    assert (gt[0:3, Y // 2 - 1 : Y // 2 + 1, 3:] == 0).all()
    # Ignore paths: invalid voxels, raw "outlier" noise (1) and "other-object" ids map to 255.
    assert invalid.any() and (gt == 255).sum() > invalid.sum() - 1
    assert set(np.unique(raw)) <= {k.kitti_raw for k in KINDS}
    assert (raw == 1).any()
    # The raw ids are the SemanticKITTI ones: e.g. road voxels hold 40, not the training class 9.
    assert (raw[gt == 9] == 40).all()


def test_kitti_visible_voxels_project_onto_pixels_of_their_class_colour(kitti, kitti_val_sample):
    root, _ = kitti
    X, Y, Z = KITTI_GRID.occ_size
    seq = root / "dataset" / "sequences" / "08"
    calib = read_calib(seq / "calib.txt")
    P2, Tr = calib["P2"], calib["Tr"]
    image = np.asarray(Image.open(seq / "image_2" / "000000.png"), dtype=np.float64)
    raw = np.fromfile(seq / "voxels" / "000000.label", dtype="<u2").reshape(X, Y, Z)
    lut = kitti_lut()
    opaque = (raw != 0) & (raw != 1)  # label noise (raw "outlier") has no surface
    # Camera centre in the velodyne frame: the null space of P2 @ Tr.
    proj = P2 @ Tr  # velodyne -> pixel
    centre = -np.linalg.solve(proj[:3, :3], proj[:3, 3])
    r = np.asarray(KITTI_GRID.point_cloud_range)
    vs = np.asarray(KITTI_GRID.occ_voxel_size)
    class_of_kind = np.array([lut[k.kitti_raw] for k in KINDS])
    # Candidates: classed voxels with an empty face neighbour whose centre projects into the image.
    candidates = np.argwhere(opaque & (lut[raw] != 255) & has_empty_neighbour(opaque))
    h = (proj[:3] @ np.concatenate([r[:3] + (candidates + 0.5) * vs, np.ones((len(candidates), 1))], 1).T).T
    with np.errstate(divide="ignore", invalid="ignore"):
        col, row = np.rint(h[:, 0] / h[:, 2]), np.rint(h[:, 1] / h[:, 2])
    keep = (h[:, 2] > 0.5) & (col >= 0) & (col < KITTI_IMAGE[1]) & (row >= 0) & (row < KITTI_IMAGE[0])
    pick = np.random.default_rng(0).permutation(np.nonzero(keep)[0])
    pick = pick[first_visible(centre, candidates[pick], opaque, KITTI_GRID, 150)]
    checked = agree = depth_ok = 0
    for ijk, c, rw, d in zip(candidates[pick], col[pick], row[pick], h[pick, 2]):
        checked += 1
        agree += shows_class_colour(image[int(rw), int(c)], lut[raw[tuple(ijk)]], class_of_kind)
        # The rendered depth there is this voxel's surface: within a voxel diagonal of its centre.
        depth_ok += abs(kitti_val_sample.renders[0].depth[int(rw), int(c)] - d) < np.linalg.norm(vs)
    assert checked >= 60
    assert agree >= 0.9 * checked, f"{agree}/{checked} visible voxels show their class colour"
    assert depth_ok >= 0.9 * checked, f"{depth_ok}/{checked} rendered depths at visible voxels"


def test_kitti_rendered_depth_agrees_with_projected_lidar(kitti, kitti_val_sample):
    root, _ = kitti
    seq = root / "dataset" / "sequences" / "08"
    calib = read_calib(seq / "calib.txt")
    pts = np.fromfile(seq / "velodyne" / "000000.bin", dtype="<f4").reshape(-1, 4)[:, :3].astype(np.float64)
    h = (calib["P2"] @ calib["Tr"] @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T)[:3].T
    d = h[:, 2]
    front = d > 1.0
    u, v, d = h[front, 0] / d[front], h[front, 1] / d[front], d[front]
    col, row = np.rint(u).astype(int), np.rint(v).astype(int)
    inside = (col >= 0) & (col < KITTI_IMAGE[1]) & (row >= 0) & (row < KITTI_IMAGE[0])
    rendered = kitti_val_sample.renders[0].depth[row[inside], col[inside]]
    err = np.abs(rendered - d[inside]) / d[inside]
    assert inside.sum() > 1000
    assert np.median(err) < 0.02
    assert np.mean(err < 0.1) > 0.85  # the rest: LiDAR/camera parallax and depth edges


# --------------------------------------------------------------------------------------------------
# nuScenes-Occupancy


def _nusc_info(root: Path, split: str) -> list[dict]:
    with open(root / "nuscenes" / f"nuscenes_occ_infos_{split}.pkl", "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"infos", "metadata"} and "version" in data["metadata"]
    return data["infos"]


def _densify(rows: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    occ = np.zeros(size, dtype=np.uint8)
    labels = rows[:, 3].copy()
    labels[labels == 0] = 255
    occ[rows[:, 2], rows[:, 1], rows[:, 0]] = labels  # columns (z, y, x, label)
    return occ


def test_nuscenes_files_and_info_fields(nusc):
    root, summary = nusc
    H, W = NUSC_IMAGE
    for split in ("train", "val"):
        infos = _nusc_info(root, split)
        assert len(infos) == 1
        info = infos[0]
        for key in ("token", "lidar_path", "lidar_token", "scene_token", "timestamp", "prev", "next",
                    "frame_idx", "can_bus", "sweeps", "lidar2ego_translation", "lidar2ego_rotation",
                    "ego2global_translation", "ego2global_rotation", "cams"):  # fmt: skip
            assert key in info, key
        assert len(info["can_bus"]) == 18 and len(info["lidar2ego_rotation"]) == 4
        assert sorted(info["cams"]) == sorted(
            ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"]
        )
        for name, cam in info["cams"].items():
            assert cam["data_path"].startswith("./data/nuscenes/samples/" + name + "/")
            path = Path(cam["data_path"].replace("./data/nuscenes", str(root / "nuscenes")))
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (W, H)
            R = np.asarray(cam["sensor2lidar_rotation"])
            assert R.shape == (3, 3) and np.allclose(R @ R.T, np.eye(3), atol=1e-9)
            assert np.asarray(cam["sensor2lidar_translation"]).shape == (3,)
            K = np.asarray(cam["cam_intrinsic"])
            assert K.shape == (3, 3) and K[2, 2] == 1 and 0 < K[0, 2] < W and 0 < K[1, 2] < H
            depth = np.fromfile(root / "depth_gt" / f"{path.name}.bin", dtype="<f4").reshape(-1, 3)
            assert len(depth) > 50
            assert (depth[:, 0] > 1).all() and (depth[:, 0] < W - 1).all()
            assert (depth[:, 1] > 1).all() and (depth[:, 1] < H - 1).all() and (depth[:, 2] > 0).all()
        occ = np.load(root / "nuScenes-Occupancy" / f"scene_{info['scene_token']}" / "occupancy"
                      / f"{info['lidar_token']}.npy")  # fmt: skip
        assert occ.dtype == np.int64 and occ.ndim == 2 and occ.shape[1] == 4
        X, Y, Z = NUSC_GRID.occ_size
        assert occ[:, 0].max() < Z and occ[:, 1].max() < Y and occ[:, 2].max() < X and occ.min() >= 0
        assert occ[:, 3].max() <= 16
        lidar = np.fromfile(
            info["lidar_path"].replace("./data/nuscenes", str(root / "nuscenes")), dtype="<f4"
        )
        assert lidar.size % 5 == 0 and lidar.size > 5000
    assert all(Path(root, f).is_file() for f in summary.files)


def test_nuscenes_ground_truth_densifies_to_the_generated_gt(nusc, nusc_val_sample):
    root, _ = nusc
    info = _nusc_info(root, "val")[0]
    rows = np.load(root / "nuScenes-Occupancy" / f"scene_{info['scene_token']}" / "occupancy"
                   / f"{info['lidar_token']}.npy")  # fmt: skip
    gt = _densify(rows, NUSC_GRID.occ_size)
    np.testing.assert_array_equal(gt, nusc_val_sample.gt)
    assert (rows[:, 3] == 0).any()  # noise rows, ignored by the readers
    assert set(np.unique(gt)) >= {0, 4, 11, 13, 15, 255}
    # LIDAR_TOP frame: x right, y forward, z up. The ground lies about 1.84 m below the sensor.
    road = np.argwhere(gt == 11)
    z_road = NUSC_GRID.point_cloud_range[2] + (np.median(road[:, 2]) + 0.5) * NUSC_GRID.occ_voxel_size[2]
    assert -2.8 < z_road < -1.0


def test_nuscenes_visible_voxels_and_depth_agree_with_the_info_geometry(nusc, nusc_val_sample):
    root, _ = nusc
    info = _nusc_info(root, "val")[0]
    rows = np.load(root / "nuScenes-Occupancy" / f"scene_{info['scene_token']}" / "occupancy"
                   / f"{info['lidar_token']}.npy")  # fmt: skip
    gt = _densify(rows, NUSC_GRID.occ_size)
    occupied = np.zeros(NUSC_GRID.occ_size, dtype=bool)
    occupied[rows[:, 2], rows[:, 1], rows[:, 0]] = rows[:, 3] > 0  # noise voxels have no surface
    r = np.asarray(NUSC_GRID.point_cloud_range)
    vs = np.asarray(NUSC_GRID.occ_voxel_size)
    class_of_kind = np.array([k.nuscenes if k.nuscenes else 255 for k in KINDS])
    class_of_kind[0] = 0
    exposed = has_empty_neighbour(occupied)
    rng = np.random.default_rng(1)
    checked = agree = 0
    H, W = NUSC_IMAGE
    cams = [(name, cam) for name, cam in sorted(info["cams"].items())]
    for name, cam in cams:
        R, t = np.asarray(cam["sensor2lidar_rotation"]), np.asarray(cam["sensor2lidar_translation"])
        K = np.asarray(cam["cam_intrinsic"])
        path = Path(cam["data_path"].replace("./data/nuscenes", str(root / "nuscenes")))
        image = np.asarray(Image.open(path), dtype=np.float64)
        candidates = np.argwhere(occupied & exposed)
        p_cam = (r[:3] + (candidates + 0.5) * vs - t) @ R  # lidar -> camera: R^T (p - t)
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = p_cam @ K.T / p_cam[:, 2:3]
        col, row = np.rint(uv[:, 0]), np.rint(uv[:, 1])
        keep = (p_cam[:, 2] > 0.5) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        pick = rng.permutation(np.nonzero(keep)[0])
        pick = pick[first_visible(t, candidates[pick], occupied, NUSC_GRID, 25, chunk=128)]
        for ijk, c, rw in zip(candidates[pick], col[pick], row[pick]):
            checked += 1
            agree += shows_class_colour(image[int(rw), int(c)], gt[tuple(ijk)], class_of_kind)
        # depth_gt rows agree with the rendered depth at their (rounded) pixels.
        depth = np.fromfile(root / "depth_gt" / f"{path.name}.bin", dtype="<f4").reshape(-1, 3)
        render = nusc_val_sample.renders[[c.name for c in nusc_val_sample.cameras].index(name)]
        rendered = render.depth[np.rint(depth[:, 1]).astype(int), np.rint(depth[:, 0]).astype(int)]
        err = np.abs(rendered - depth[:, 2]) / depth[:, 2]
        assert np.median(err) < 0.03, name
    assert checked >= 60

    assert agree >= 0.85 * checked, f"{agree}/{checked} visible voxels show their class colour"


# --------------------------------------------------------------------------------------------------
# Determinism, variety, errors


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small(fmt: str) -> dict:
    return dict(
        num_train=1,
        num_val=1,
        grid=GridConfig(point_cloud_range=KITTI_GRID.point_cloud_range, occ_size=(32, 32, 8))
        if fmt == "semantickitti"
        else GridConfig(point_cloud_range=NUSC_GRID.point_cloud_range, occ_size=(48, 48, 8)),
        image_size=(24, 80) if fmt == "semantickitti" else (18, 32),
        lidar_azimuth_steps=128,
    )


@pytest.mark.parametrize("fmt", ["semantickitti", "nuscenes-occupancy"])
def test_same_seed_gives_byte_identical_files(tmp_path, fmt):
    small = _small(fmt)
    a = _tree_bytes(Path(generate(tmp_path / "a", fmt, seed=7, **small).out_dir))
    b = _tree_bytes(Path(generate(tmp_path / "b", fmt, seed=7, **small).out_dir))
    c = _tree_bytes(Path(generate(tmp_path / "c", fmt, seed=8, **small).out_dir))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    labels_a = sorted(v for k, v in a.items() if k.endswith((".label", ".npy")))
    labels_c = sorted(v for k, v in c.items() if k.endswith((".label", ".npy")))
    assert len(labels_a) >= 2 and labels_a != labels_c


def test_worker_processes_write_the_same_files(tmp_path):
    small = _small("nuscenes-occupancy")
    a = _tree_bytes(Path(generate(tmp_path / "a", "nuscenes-occupancy", seed=7, **small).out_dir))
    b = _tree_bytes(
        Path(generate(tmp_path / "b", "nuscenes-occupancy", seed=7, num_workers=2, **small).out_dir)
    )
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_scenes_vary_between_indices_and_splits():
    grid = GridConfig(point_cloud_range=KITTI_GRID.point_cloud_range, occ_size=(32, 32, 8))
    samples = [
        make_sample("semantickitti", "train", i, seed=0, grid=grid, image_size=(24, 80)) for i in range(3)
    ]
    samples.append(make_sample("semantickitti", "val", 0, seed=0, grid=grid, image_size=(24, 80)))
    for i in range(len(samples)):
        for j in range(i):
            a, b = samples[i].gt, samples[j].gt
            valid = (a != 255) & (b != 255)
            assert np.mean(a[valid] != b[valid]) > 0.02
            assert not np.array_equal(samples[i].renders[0].image, samples[j].renders[0].image)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        generate(tmp_path, "kitti", num_train=1, num_val=0)
    with pytest.raises(ValueError, match="num_train"):
        generate(tmp_path, "semantickitti", num_train=-1, num_val=0)
    with pytest.raises(ValueError, match="divisible by 8"):
        bad = GridConfig(point_cloud_range=KITTI_GRID.point_cloud_range, occ_size=(3, 3, 3))
        generate(tmp_path, "semantickitti", num_train=1, num_val=0, grid=bad)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, "semantickitti", num_train=1, num_val=0, image_size=(0, 10))
    (tmp_path / "dataset").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(tmp_path, "semantickitti", num_train=1, num_val=0)


# --------------------------------------------------------------------------------------------------
# Ray casting and the image-blind baseline


def test_raycaster_matches_fine_marching():
    rng = np.random.default_rng(0)
    shape = (20, 17, 9)
    solid = rng.random(shape) < 0.02
    solid[:, :, 0] = True
    grid_min, vs = np.array([-4.0, -3.0, -1.0]), np.array([0.5, 0.5, 0.25])
    caster = VoxelRaycaster(solid, grid_min, vs)
    # Origins inside and outside the grid, off the voxel lattice so no ray runs exactly along an edge.
    for origin in (np.array([0.3137, 0.2171, 0.1093]), np.array([-9.0123, 0.3311, 0.4177])):
        dirs = rng.normal(size=(60, 3))
        dirs[:10, 2] = 0.0  # rays parallel to a slab
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        hits = caster.cast(origin, dirs)
        ts = np.arange(0.0, 25.0, 0.001)
        for i, d in enumerate(dirs):
            idx = np.floor((origin + ts[:, None] * d - grid_min) / vs).astype(int)
            inside = np.all((idx >= 0) & (idx < shape), axis=1)
            on = inside & solid[tuple(np.clip(idx, 0, np.array(shape) - 1).T)]
            if on.any():
                k = int(np.argmax(on))
                assert hits.voxel[i] == np.ravel_multi_index(idx[k], shape)
                assert abs(hits.t[i] - ts[k]) < 2e-3
            else:
                assert hits.voxel[i] == -1 and np.isinf(hits.t[i])


def test_most_frequent_labels_and_ssc_scores_by_hand():
    vols = [np.array([[[1, 0, 255, 2]]]), np.array([[[1, 2, 255, 3]]]), np.array([[[0, 2, 255, 3]]])]
    np.testing.assert_array_equal(most_frequent_labels(vols, 4), [[[1, 2, 0, 3]]])
    # a tie between 2 and 3 goes to 2
    assert most_frequent_labels([vols[1], np.array([[[0, 0, 0, 2]]])], 4)[0, 0, 3] == 2
    with pytest.raises(ValueError, match="0..3"):
        most_frequent_labels([np.array([4])], 4)
    pred = np.array([0, 1, 1, 2, 0, 2])
    gt = np.array([0, 1, 2, 2, 1, 255])
    s = ssc_scores([(pred, gt)], 3)
    # SC on the 5 valid voxels: tp at indices 1, 2, 3; fn at index 4; no fp
    assert s["sc_iou"] == pytest.approx(3 / 4)
    # class 1: tp 1, fp 1 (idx 2), fn 1 (idx 4) -> 1/3; class 2: tp 1, fp 0, fn 1 (idx 2) -> 1/2
    assert s["class_iou"][1] == pytest.approx(1 / 3, abs=1e-5)
    assert s["class_iou"][2] == pytest.approx(1 / 2, abs=1e-5)
    assert s["ssc_miou"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-5)
