"""``eval.camera_view_only``: the field-of-view mask on a hand-checkable camera, and the evaluator
scoring only what some camera sees."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spotocc.config import GridConfig, apply_overrides, get_config
from spotocc.data import build_dataset
from spotocc.data.classes import IGNORE_INDEX
from spotocc.data.synthetic import generate, source_image_size
from spotocc.engine.evaluator import evaluate_predictions, scored_ground_truth, write_prediction
from spotocc.evaluation.field_of_view import camera_view_mask
from spotocc.models.occupancy import CAMERA_KEYS

# camera frame (x right, y down, z forward) -> grid frame (x forward, y left, z up)
_CAM_TO_GRID = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _pinhole_batch(labels: torch.Tensor) -> dict:
    """One sample, one camera at the origin looking along +x, f = 10 px, principal point (10, 10),
    20x20 network image, no augmentation."""
    k = torch.eye(4)
    k[:3, :3] = torch.tensor([[10.0, 0.0, 10.0], [0.0, 10.0, 10.0], [0.0, 0.0, 1.0]])
    return {
        "rots": _CAM_TO_GRID[None, None],  # [B, N, 3, 3]
        "trans": torch.zeros(1, 1, 3),
        "intrins": k[None, None],
        "post_rots": torch.eye(3)[None, None],
        "post_trans": torch.zeros(1, 1, 3),
        "bda": torch.eye(4)[None],
        "gt_occ": labels[None],
    }


def test_mask_is_the_pinhole_frustum_worked_out_by_hand():
    # 1 m voxels over x in [-2, 8), y in [-5, 5), z in [-3, 3): centres x, y, z = lower + i + 0.5.
    grid = GridConfig(
        point_cloud_range=(-2.0, -5.0, -3.0, 8.0, 5.0, 3.0), occ_size=(10, 10, 6), lss_downsample=1
    )
    labels = torch.randint(0, 20, (10, 10, 6), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    labels[3, 3, 3] = IGNORE_INDEX  # unlabelled: never in the mask
    batch = _pinhole_batch(labels)
    mask = camera_view_mask(batch["gt_occ"], [batch[k] for k in CAMERA_KEYS], grid, (20, 20))[0]  # [X, Y, Z]
    x, y, z = np.meshgrid(np.arange(10) - 1.5, np.arange(10) - 4.5, np.arange(6) - 2.5, indexing="ij")
    # u = 10 - 10 y / x and v = 10 - 10 z / x must lie in [0, 20), in front of the camera (x > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = 10 - 10 * y / x, 10 - 10 * z / x
    expected = (x > 0) & (u >= 0) & (u < 20) & (v >= 0) & (v < 20)
    expected[3, 3, 3] = False
    assert torch.equal(mask, torch.from_numpy(expected))
    assert 0 < int(mask.sum()) < int((labels != IGNORE_INDEX).sum())  # behind, beside, above: not seen
    assert bool(mask[5, 5, 3])  # straight ahead
    assert not bool(mask[0, 5, 3]) and not bool(mask[3, 0, 3])  # behind; beside


def test_option_off_scores_the_labels_as_they_are():
    labels = torch.zeros(10, 10, 6, dtype=torch.uint8)
    batch = _pinhole_batch(labels)
    cfg = get_config("synthetic_tiny")
    assert cfg.eval.camera_view_only is False
    assert scored_ground_truth(batch, cfg) is batch["gt_occ"]


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    cfg = get_config("synthetic_tiny")
    root = tmp_path_factory.mktemp("fov")
    generate(root, "semantickitti", num_train=2, num_val=0, seed=4, grid=cfg.grid,
             image_size=source_image_size(cfg.data), lidar_azimuth_steps=128)  # fmt: skip
    return apply_overrides(cfg, [f"data.root={root}"])


def test_evaluator_scores_only_what_a_camera_sees(two_scenes, tmp_path):
    # Predictions equal the GT inside the cameras' view and are empty (class 0) outside it: every
    # class scores 100 with the option on, and the classes with voxels outside the view less without.
    cfg = two_scenes
    dataset = build_dataset(cfg, "train", train=False)
    outside_total = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        batch = {k: v[None] for k, v in sample.items() if k != "meta"}
        cams = [batch[k] for k in CAMERA_KEYS]
        seen = camera_view_mask(batch["gt_occ"], cams, cfg.grid, tuple(cfg.data.input_size))[0]  # [X, Y, Z]
        gt = sample["gt_occ"]
        labelled_outside = (gt != IGNORE_INDEX) & (gt != 0) & ~seen
        outside_total += int(labelled_outside.sum())
        pred = torch.where(seen, gt, torch.zeros_like(gt))
        pred[gt == IGNORE_INDEX] = 0
        write_prediction(tmp_path, str(sample["meta"]["sample_id"]), pred)
    assert outside_total > 1000  # the generated KITTI-layout scenes label voxels beside the camera

    view_only = apply_overrides(copy.deepcopy(cfg), ["eval.camera_view_only=true"])  # overrides in place
    on = evaluate_predictions(tmp_path, dataset, view_only, num_workers=0)
    off = evaluate_predictions(tmp_path, dataset, cfg, num_workers=0)
    present = [k for k in on.metrics if k.startswith("SSC_") and k.endswith("_IoU") and on.metrics[k] > 0]
    assert len(present) >= 5 and all(on.metrics[k] == pytest.approx(100.0) for k in present)
    assert on.metrics["SC_IoU"] == pytest.approx(100.0)
    assert off.metrics["SC_IoU"] < 95.0 and off.metrics["SSC_building_IoU"] < 95.0
