"""Synthetic head outputs and the label-formation benchmark helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spotocc.benchmarking.labels import (
    benchmark_labels,
    load_head_outputs,
    save_head_outputs,
    structured_head_outputs,
)
from spotocc.models.labels import occupancy_labels


@pytest.mark.parametrize("preset,num_classes", [("nuscenes", 17), ("kitti", 20)])
def test_structured_outputs_look_like_a_trained_head(preset, num_classes):
    probs, logits = structured_head_outputs(
        preset=preset, grid=(32, 32, 8), num_queries=40, batch_size=2, seed=1
    )
    assert probs.shape == (2, 40, num_classes) and logits.shape == (2, 40, 32, 32, 8)
    assert bool((probs >= 0).all()) and bool((probs.sum(dim=2) < 1).all())  # no-object mass dropped
    confident = probs.amax(dim=2) > 0.5
    assert 5 <= int(confident[0].sum()) <= 25  # a few active queries, the rest no-object dominant
    labels = occupancy_labels(probs, logits, (64, 64, 16), "direct")
    counts = torch.bincount(labels[0].flatten(), minlength=num_classes)
    assert counts[0] > labels[0].numel() // 2  # empty dominates
    assert int((counts > 0).sum()) >= 5  # a street scene, not a single class
    again, _ = structured_head_outputs(preset=preset, grid=(32, 32, 8), num_queries=40, batch_size=2, seed=1)
    assert torch.equal(again, probs)  # seeded
    with pytest.raises(ValueError, match="preset"):
        structured_head_outputs(preset="waymo")


def test_load_head_outputs_accepts_probs_or_logits(tmp_path):
    probs, logits = structured_head_outputs(grid=(8, 8, 4), num_queries=12, seed=2)
    np.savez(
        tmp_path / "probs.npz", class_probs=probs.numpy(), mask_logits=logits.numpy(), out_size=[16, 16, 8]
    )
    loaded_probs, loaded_logits, out_size = load_head_outputs(tmp_path / "probs.npz")
    assert torch.equal(loaded_probs, probs) and torch.equal(loaded_logits, logits) and out_size == (16, 16, 8)

    cls_logits = torch.randn(12, 18)
    np.savez(tmp_path / "logits.npz", cls_logits=cls_logits.numpy(), mask_logits=logits[0].numpy())
    loaded_probs, loaded_logits, out_size = load_head_outputs(tmp_path / "logits.npz")
    assert loaded_probs.shape == (1, 12, 17) and loaded_logits.shape == (1, 12, 8, 8, 4) and out_size is None
    assert torch.allclose(loaded_probs[0], cls_logits.softmax(dim=-1)[:, :-1])

    np.savez(tmp_path / "bad.npz", mask_logits=logits.numpy())
    with pytest.raises(ValueError, match="class_probs"):
        load_head_outputs(tmp_path / "bad.npz")


def test_saved_head_outputs_load_back(tmp_path):
    probs, logits = structured_head_outputs(grid=(6, 6, 4), num_queries=10, batch_size=2, seed=3)
    save_head_outputs(tmp_path / "head.npz", probs.bfloat16(), logits, (12, 12, 8))
    loaded_probs, loaded_logits, out_size = load_head_outputs(tmp_path / "head.npz")
    assert loaded_probs.dtype == torch.float32 and torch.equal(loaded_probs, probs.bfloat16().float())
    assert torch.equal(loaded_logits, logits) and out_size == (12, 12, 8)
    with pytest.raises(ValueError, match="not \\[B, Q, C\\]"):
        save_head_outputs(tmp_path / "bad.npz", probs[0], logits, (12, 12, 8))
    assert not (tmp_path / "bad.npz").exists()


def test_benchmark_reports_times_agreement_work_and_memory():
    probs, logits = structured_head_outputs(grid=(12, 12, 4), num_queries=20, seed=3)
    result = benchmark_labels(probs, logits, (45, 45, 15), repeats=1, measure_memory=False)
    assert result["bounded_s"] > 0 and result["direct_s"] > 0
    assert result["speedup"] == pytest.approx(result["direct_s"] / result["bounded_s"])
    assert result["mismatched_voxels"] == 0
    assert (
        0 <= result["voxels_exact_frac"] <= result["voxels_refined_frac"] + result["voxels_exact_frac"] <= 1
    )
    assert 0 < result["cells_undecided_frac"] < 1
    # peak memory from a fresh process: positive, and far below the dense [Q, X', Y', Z'] volume
    memory = benchmark_labels(probs, logits, (45, 45, 15), methods=("bounded",), repeats=1)
    assert 0 <= memory["bounded_peak_mib"] < 200
