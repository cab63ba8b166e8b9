"""``spotocc diagnose coverage``: hand-computed coverage counts, the encoder's documented dilation, an
end-to-end run on generated SemanticKITTI-layout scenes, and user errors as one line with exit 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spotocc.cli import main
from spotocc.config import GridConfig, apply_overrides, get_config
from spotocc.data import build_dataset
from spotocc.data.synthetic import generate, source_image_size
from spotocc.diagnostics.coverage import CoverageProbe, measure_coverage, project_points
from spotocc.models.view_transform import image_aug_transform

# --------------------------------------------------------------------------------------------------
# A hand-made rig: one camera at (0, 0.3, 0.3) looking along +x, an 8x8 input at stride 8 (one frustum
# ray, through pixel (0, 0) = the principal point), depths 1.5, 2.5, 3.5. GT grid 16x8x8 of 0.5 m over
# x [0, 8), y [-2, 2), z [-2, 2); LSS grid 8x4x4 of 1 m. The ray's points fall in LSS cells (1..3, 2, 2).


def _hand_config(occ_size=(16, 8, 8), first_layers: int = 1):
    cfg = get_config("synthetic_tiny")
    cfg.grid = GridConfig(
        point_cloud_range=(0.0, -2.0, -2.0, 8.0, 2.0, 2.0), occ_size=occ_size, lss_downsample=2
    )
    return apply_overrides(
        cfg,
        [
            "data.input_size=(8, 8)",
            "view_transformer.in_channels=4",
            "view_transformer.downsample=8",
            "view_transformer.depth_bound=(1.5, 4.5, 1.0)",
            f"voxel_encoder.num_layers=({first_layers}, 1, 1, 1)",
        ],
    )


# camera (x right, y down, z forward) -> grid (x forward, y left, z up)
_CAM_TO_GRID = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _hand_batch(labels: dict[tuple[int, int, int], int]) -> dict:
    k = torch.eye(4)
    k[0, 0] = k[1, 1] = 16.0  # focal 16 px, principal point (0, 0)
    gt = torch.full((1, 16, 8, 8), 255, dtype=torch.uint8)  # [B, X, Y, Z]
    for ijk, label in labels.items():
        gt[(0, *ijk)] = label
    return {
        "rots": _CAM_TO_GRID[None, None],  # [B, N, 3, 3]
        "trans": torch.tensor([[[0.0, 0.3, 0.3]]]),  # [B, N, 3]
        "intrins": k[None, None],  # [B, N, 4, 4]
        "post_rots": torch.eye(3)[None, None],
        "post_trans": torch.zeros(1, 1, 3),
        "bda": torch.eye(4)[None],  # [B, 4, 4]
        "gt_occ": gt,
    }


def test_hand_checked_counts_of_a_one_ray_rig():
    probe = CoverageProbe.from_config(_hand_config())
    # GT voxel (i, j, k) has its centre at (0.25 + 0.5 i, -1.75 + 0.5 j, -1.75 + 0.5 k)
    labels = {
        (5, 4, 4): 1,  # A (2.75, .25, .25): depth 2.75, pixel (0.29, 0.29): in view; LSS (2,2,2) lifted
        (5, 3, 3): 1,  # B (2.75, -.25, -.25): pixel (3.2, 3.2): in view; LSS (2,1,1) not lifted, active
        (5, 5, 5): 1,  # C (2.75, .75, .75): pixel u < 0: not in view; LSS (2,2,2) lifted
        (15, 0, 0): 1,  # D (7.75, ...): depth past 4.5; LSS (7,0,0) neither lifted nor active
        (1, 4, 4): 2,  # E depth 0.75 < 1.5: not in view; LSS (0,2,2) active only
        (7, 4, 4): 2,  # F (3.75, .25, .25): in view; LSS (3,2,2) lifted
        (4, 0, 4): 2,  # G (2.25, -1.75, .25): u = 16 * 2.05 / 2.25 = 14.6 >= 8: not in view; active
        (2, 4, 4): 0,  # H depth 1.25: not in view; LSS (1,2,2) lifted
    }
    counts = probe.measure(_hand_batch(labels))
    assert counts.num_samples == 1
    assert counts.gt_voxels[:3] == [1, 4, 3] and sum(counts.gt_voxels) == 8
    assert counts.in_view[:3] == [0, 2, 1] and sum(counts.in_view) == 3
    assert counts.lifted[:3] == [1, 2, 1] and sum(counts.lifted) == 4
    assert counts.active[:3] == [1, 3, 3] and sum(counts.active) == 7
    # Per LSS height: the ray lifts 3 of the 8 x 4 cells of level z=2; the encoder's first level grows
    # them by +-2 in x, y, z (num_layers[0] = 1): x 0..5, every y and z -> 24 of 32 cells per level.
    assert counts.level_cells == [32] * 4
    assert counts.level_lifted == [0, 0, 3, 0]
    assert counts.level_active == [24] * 4
    shares = {c["name"]: c for c in counts.to_dict()["classes"]}
    assert shares["car"]["in_view_pct"] == 50.0 and shares["car"]["lifted_pct"] == 50.0
    assert shares["car"]["active_pct"] == 75.0 and shares["bicycle"]["active_pct"] == 100.0


@pytest.mark.parametrize(
    ("first_layers", "cell", "box"),
    [
        (1, (5, 5, 3), ((3, 7), (3, 7), (1, 5))),  # +-(1 + 1) in x, y and +-2 in z: 5 x 5 x 5
        (2, (5, 5, 3), ((2, 8), (2, 8), (1, 5))),  # +-(2 + 1) in x, y: 7 x 7 x 5
        (1, (0, 0, 0), ((0, 2), (0, 2), (0, 2))),  # clipped at the grid's corner: 3 x 3 x 3
    ],
)
def test_encoder_active_set_is_the_documented_dilation_of_one_cell(first_layers, cell, box):
    # CompletionBlock docstring: "otherwise +-(n+1) in x, y and +-2 in z"; the subm convs keep the set.
    probe = CoverageProbe.from_config(_hand_config(occ_size=(22, 22, 14), first_layers=first_layers))
    lifted = torch.zeros(1, 11, 11, 7, dtype=torch.bool)  # [B, X, Y, Z]
    lifted[(0, *cell)] = True
    active = probe.active_cells(lifted)
    expected = torch.zeros_like(lifted)
    (x0, x1), (y0, y1), (z0, z1) = box
    expected[0, x0 : x1 + 1, y0 : y1 + 1, z0 : z1 + 1] = True
    assert torch.equal(active, expected)
    assert int(active.sum()) == math.prod(b - a + 1 for a, b in box)


def test_projection_inverts_the_models_frustum_geometry():
    # KITTI-like camera with a P2 4th column, a resize/crop/flip/rotate image augmentation and a BEV
    # rotation + flip + translation: projecting the lifted frustum points gives the frustum back.
    cfg = get_config("synthetic_tiny")
    probe = CoverageProbe.from_config(cfg)
    vt = probe.view_transformer
    k = torch.eye(4)
    k[:3] = torch.tensor([[185.0, 0.0, 156.0, 11.7], [0.0, 185.0, 47.0, -0.024], [0.0, 0.0, 1.0, 0.0038]])
    post_rot, post_tran = image_aug_transform(
        resize=1.1, crop=(12.0, 5.0), flip=True, rotate=3.0, input_size=cfg.data.input_size
    )
    c, s = math.cos(0.3), math.sin(0.3)
    bda = torch.tensor([[c, -s, 0.0, 0.5], [-s, -c, 0.0, -1.0], [0.0, 0.0, 1.0, 0.2], [0.0, 0.0, 0.0, 1.0]])
    cams = [
        _CAM_TO_GRID[None],  # [N, 3, 3]
        torch.tensor([[0.29, -0.01, -0.06]]),
        k[None],
        post_rot[None],
        post_tran[None],
        bda,
    ]
    points = vt.geometry(*(t[None] for t in cams))  # [1, 1, D, fH, fW, 3]
    uvd = project_points(points.reshape(-1, 3), *cams)  # [1, P, 3]
    assert torch.allclose(uvd[0].float(), vt.frustum.reshape(-1, 3), atol=2e-3)


# --------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def tiny_kitti(tmp_path_factory):
    cfg = get_config("synthetic_tiny")
    out = tmp_path_factory.mktemp("diag")
    generate(out, "semantickitti", num_train=2, num_val=0, seed=3, grid=cfg.grid,
             image_size=source_image_size(cfg.data), lidar_azimuth_steps=128)  # fmt: skip
    return out


def _class_rows(printed: str) -> list[list[str]]:
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class")) + 2
    end = lines.index("", start)
    return [line.rsplit(maxsplit=4) for line in lines[start:end]]


def test_coverage_command_on_generated_semantickitti_scenes(tiny_kitti, tmp_path, capsys):
    out_json = tmp_path / "coverage.json"
    argv = ["diagnose", "coverage", "synthetic_tiny", "--data", str(tiny_kitti), "--split", "train",
            "--samples", "5", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("synthetic_tiny: split 'train', 2 samples, GT grid 64x64x16, LSS grid 32x32x8")

    # The GT column is the label histogram of the two samples, counted here independently.
    cfg = apply_overrides(get_config("synthetic_tiny"), [f"data.root={tiny_kitti}"])
    dataset = build_dataset(cfg, "train", train=False)
    labels = np.concatenate([dataset[i]["gt_occ"].numpy().ravel() for i in range(2)])
    hist = np.bincount(labels[labels != 255], minlength=20)
    present = [c for c in range(20) if hist[c] > 0]
    rows = _class_rows(printed)
    assert rows[-1][0].strip() == "occupied (all but 0)"
    names = ("unlabeled", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
             "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
             "vegetation", "trunk", "terrain", "pole", "traffic-sign")  # fmt: skip
    assert [r[0].split() for r in rows[:-1]] == [[str(c), names[c]] for c in present]
    assert [int(r[1]) for r in rows[:-1]] == hist[present].tolist()
    assert int(rows[-1][1]) == int(hist[1:].sum())
    for row in rows:
        in_view, lifted, active = (float(v) for v in row[2:])
        assert 0.0 <= in_view <= 100.0 and 0.0 <= lifted <= 100.0 and 0.0 <= active <= 100.0
        assert active >= lifted  # the encoder only grows the active set
    occupied = [float(v) for v in rows[-1][2:]]
    assert occupied[0] > 50.0 and 0.0 < occupied[1] < occupied[2] < 100.0  # a front camera over x >= 0

    # The JSON holds the same counts, and one level row per LSS height.
    saved = json.loads(out_json.read_text())
    assert saved["num_samples"] == 2 and saved["lss_size"] == [32, 32, 8]
    assert [c["id"] for c in saved["classes"]] == present
    assert [c["gt_voxels"] for c in saved["classes"]] == hist[present].tolist()
    for c, row in zip(saved["classes"], rows):
        assert c["lifted"] <= c["active"] <= c["gt_voxels"] and c["in_view"] <= c["gt_voxels"]
        assert f"{c['in_view_pct']:.1f}" == row[2] and f"{c['active_pct']:.1f}" == row[4]
    assert len(saved["levels"]) == 8 and all(lv["cells"] == 2 * 32 * 32 for lv in saved["levels"])
    assert all(lv["lifted"] <= lv["active"] for lv in saved["levels"])
    assert sum(lv["lifted"] for lv in saved["levels"]) > 0


def _lifted_shares(cfg, root) -> dict[str, tuple[int, float]]:
    cfg = apply_overrides(cfg, [f"data.root={root}"])
    counts = measure_coverage(cfg, build_dataset(cfg, "train", train=False), 2).to_dict()
    return {c["name"]: (c["gt_voxels"], c["lifted_pct"]) for c in counts["classes"]}


def _lifted_below_half(shares: dict[str, tuple[int, float]]) -> dict[str, float]:
    """The classes with at least 200 GT voxels whose LSS cells the lift reaches for less than half of them."""
    return {
        n: pct for n, (voxels, pct) in shares.items() if voxels >= 200 and n != "unlabeled" and pct < 50.0
    }


def test_synthetic_tiny_lifts_most_voxels_of_every_class(tiny_kitti):
    # The preset's rays (192x640 at stride 8) reach most GT voxels of every class, as spotocc_kitti's do
    # (car 85%, building 41% at 370x1226). The former preset (96x320 at stride 16) fails the same check.
    shares = _lifted_shares(get_config("synthetic_tiny"), tiny_kitti)
    assert {"car", "road", "building"} <= {n for n, (voxels, _) in shares.items() if voxels >= 200}
    assert _lifted_below_half(shares) == {}

    former = [
        "data.input_size=(96, 320)",
        "view_transformer.downsample=16",
        "image_neck.upsample_strides=(0.5, 1, 2)",
    ]
    former_below = _lifted_below_half(_lifted_shares(get_config("synthetic_tiny", former), tiny_kitti))
    assert {"car", "building"} <= set(former_below)


def test_overrides_may_follow_options(tiny_kitti, tmp_path, capsys):
    out_json = tmp_path / "coverage.json"
    argv = ["diagnose", "coverage", "synthetic_tiny", "--data", str(tiny_kitti), "--samples", "1",
            "--split", "train", "grid.lss_downsample=4", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    assert "LSS grid 16x16x4 (downsample 4)" in capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert saved["lss_size"] == [16, 16, 4] and len(saved["levels"]) == 4 and saved["num_samples"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data root"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["grid.nonsense=1"], "unknown key"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    argv = ["diagnose", "coverage", "synthetic_tiny", "--data", str(tmp_path / "missing"), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spotocc diagnose: error: ") and message in lines[0]
    assert captured.out == ""


def test_unknown_preset_is_a_user_error(tmp_path, capsys):
    assert main(["diagnose", "coverage", "no_such_preset", "--data", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("spotocc diagnose: error: unknown preset 'no_such_preset'")
