"""``spotocc diagnose depth``: hand-counted per-class sums, a perfect score for the one-hot oracle depth,
the command end to end on a saved checkpoint (JSON included), and user errors as one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from spotocc.cli import main
from spotocc.data.batch import collate
from spotocc.diagnostics.depth import DepthAccuracy, cell_depth_references, measure_depth_accuracy
from spotocc.diagnostics.memorise import GroundTruthDepth
from spotocc.engine.checkpoint import save_weights_file
from spotocc.models import build_model
from spotocc.models.occupancy import CAMERA_KEYS

# A small synthetic_tiny: 16^3 GT grid, the preset's 96x320 camera (6x20 feature cells), 24 depth bins.
# depth_from_occupancy makes the oracle's targets the diagnosis's references (LiDAR, else first voxel).
TINY = [
    "grid.occ_size=(16, 16, 16)",
    "view_transformer.depth_bound=(2.0, 50.0, 2.0)",
    "view_transformer.depth_from_occupancy=true",
]


@pytest.fixture(scope="module")
def scenes(generated_scenes):
    """(config, root, scenes): two generated SemanticKITTI-layout scenes read without augmentation."""
    return generated_scenes(TINY, "depth")


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, load_pretrained=False).eval()


def test_sums_by_hand():
    acc = DepthAccuracy(("empty", "a", "b"), tolerance=1, bin_size=0.5, min_depth=2.0, band_width=1.0)
    probs = torch.tensor(
        [
            [0.1, 0.6, 0.2, 0.1, 0.0],  # class a, reference bin 2: argmax 1 is within 1 bin
            [0.7, 0.1, 0.1, 0.0, 0.1],  # class a, reference bin 4: argmax 0 is 4 bins (2 m) off
            [0.0, 0.0, 0.0, 0.2, 0.8],  # class b, reference bin 4: window 3..5 clipped to 3..4
            [0.2, 0.2, 0.2, 0.2, 0.2],  # no class: not counted
        ]
    )
    bins = torch.tensor([2, 4, 4, 0])
    labels = torch.tensor([1, 1, 2, 0])
    acc.add(probs, bins, labels, torch.tensor([True, False, True, True]))
    assert acc.cells == [0, 2, 1] and acc.lidar_cells == [0, 1, 1] and acc.argmax_within == [0, 1, 1]
    assert acc.prob_within == pytest.approx([0.0, (0.6 + 0.2 + 0.1) + (0.0 + 0.1), 1.0])
    assert acc.argmax_error_m == pytest.approx([0.0, 0.5 + 2.0, 0.0])
    assert acc.argmax_signed_m == pytest.approx([0.0, -0.5 - 2.0, 0.0])
    # bands of 1 m from 2 m: bin 2 (3 m) is band 1, bin 4 (4 m) band 2; the unlabelled cell is not counted
    assert acc.band_cells == [0, 1, 2] and acc.band_within == [0, 1, 1]
    assert acc.band_signed_m == pytest.approx([0.0, -0.5, -2.0])
    assert acc.band_rows() == [
        ("3..4 m", {"cells": 1, "argmax_within_pct": 100.0, "bias_m": -0.5}),
        ("4..5 m", {"cells": 2, "argmax_within_pct": 50.0, "bias_m": -1.0}),
    ]
    rows = dict(acc.rows())
    assert list(rows) == ["a", "b", "all"]
    assert rows["a"] == pytest.approx(
        {
            "cells": 2,
            "lidar_pct": 50.0,
            "argmax_within_pct": 50.0,
            "prob_within_pct": 50.0,
            "argmax_error_m": 1.25,
            "bias_m": -1.25,
        }
    )
    assert rows["all"]["cells"] == 3 and rows["all"]["argmax_within_pct"] == pytest.approx(200 / 3)


def test_one_hot_oracle_depth_is_scored_perfect_for_every_class(scenes):
    cfg, _, samples = scenes
    model = _model(cfg)
    counted = 0
    with GroundTruthDepth(model.view_transformer) as oracle:
        for sample in samples:
            oracle.set(collate([sample]))
            acc = measure_depth_accuracy(model, cfg, [sample], 1, tolerance=0)
            rows = dict(acc.rows())
            assert len(rows) > 3  # several classes seen
            for name, row in rows.items():
                assert row["argmax_within_pct"] == 100.0, name
                assert row["prob_within_pct"] == pytest.approx(100.0, abs=1e-4), name
                assert row["argmax_error_m"] == 0.0 and row["bias_m"] == 0.0, name
            assert all(band["bias_m"] == 0.0 for _, band in acc.band_rows())
            counted += rows["all"]["cells"]
    assert counted > 10

    # Without the oracle, a fresh model's depth is far from perfect.
    fresh = dict(measure_depth_accuracy(model, cfg, samples, 2, tolerance=0).rows())["all"]
    assert fresh["argmax_within_pct"] < 50.0 and fresh["cells"] == counted


def test_references_are_lidar_first_then_the_first_labelled_voxel(scenes):
    cfg, _, samples = scenes
    model = _model(cfg)
    vt = model.view_transformer
    kinds = torch.zeros(2, dtype=torch.bool)  # (a LiDAR reference seen, an occupancy reference seen)
    for sample in samples:
        batch = collate([sample])
        bins, valid, labels, from_lidar = cell_depth_references(model, batch)
        points = vt.geometry(*(batch[k] for k in CAMERA_KEYS))
        vt_bins, vt_valid = vt.depth_target_bins(
            batch["gt_depth"], gt_occ=batch["gt_occ"], points=points, fix_bin_offset=True
        )  # the depth_from_occupancy targets: the same rule, written independently
        assert torch.equal(valid, vt_valid) and torch.equal(bins[valid], vt_bins[valid])
        assert (labels[valid & ~from_lidar] > 0).all()  # an occupancy reference always has a class
        kinds |= torch.stack([(valid & from_lidar).any(), (valid & ~from_lidar).any()])
    assert kinds.all()  # both kinds of reference occur


def test_command_on_a_saved_checkpoint(scenes, tmp_path, capsys):
    cfg, root, samples = scenes
    model = _model(cfg)
    weights = tmp_path / "model.safetensors"
    save_weights_file(weights, model.state_dict(), config=cfg.to_dict())
    out_json = tmp_path / "depth.json"
    argv = ["diagnose", "depth", str(weights), "--data", str(root), "--split", "train", "--samples", "5",
            "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("synthetic_tiny: split 'train', 2 samples, depth bins 2..50 m by 2 m")
    report = json.loads(out_json.read_text())
    measured = measure_depth_accuracy(model, cfg, samples, 2)
    expected = dict(measured.rows())
    assert report["num_samples"] == 2 and report["tolerance_bins"] == 1
    assert list(report["classes"]) == list(expected)
    for name, row in expected.items():
        assert report["classes"][name] == pytest.approx(row), name
    bands = dict(measured.band_rows())
    assert list(report["depth_bands"]) == list(bands) and len(bands) > 1
    for name, band in bands.items():
        assert report["depth_bands"][name] == pytest.approx(band), name
    assert sum(band["cells"] for band in bands.values()) == expected["all"]["cells"]
    for name, row in expected.items():
        assert any(line.split()[:2] == [name, str(row["cells"])] for line in printed.splitlines())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--tolerance", "-1"], "--tolerance must be >= 0, got -1"),
    ],
)
def test_bad_arguments_are_one_line_with_exit_2(scenes, tmp_path, capsys, extra, message):
    cfg, root, _ = scenes
    weights = tmp_path / "model.safetensors"
    save_weights_file(weights, _model(cfg).state_dict(), config=cfg.to_dict())
    assert main(["diagnose", "depth", str(weights), "--data", str(root), *extra]) == 2
    assert capsys.readouterr().err == f"spotocc diagnose: error: {message}\n"


def test_missing_checkpoint_and_data_are_user_errors(scenes, tmp_path, capsys):
    cfg, _, _ = scenes
    assert main(["diagnose", "depth", str(tmp_path / "nope")]) == 2
    assert (
        capsys.readouterr().err == f"spotocc diagnose: error: checkpoint {tmp_path / 'nope'} does not exist\n"
    )
    weights = tmp_path / "model.safetensors"
    save_weights_file(weights, _model(cfg).state_dict(), config=cfg.to_dict())
    assert main(["diagnose", "depth", str(weights), "--data", str(tmp_path / "nodata")]) == 2
    assert (
        capsys.readouterr().err
        == f"spotocc diagnose: error: data root {tmp_path / 'nodata'} does not exist\n"
    )
