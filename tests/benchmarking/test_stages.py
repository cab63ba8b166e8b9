"""spotocc benchmark: its inputs match the readers, its staged passes equal the model's, its output."""

import json
from pathlib import Path

import pytest
import torch

from spotocc import cli
from spotocc.benchmarking.inputs import benchmark_batch
from spotocc.benchmarking.memory import MemoryPeak, measure_peak
from spotocc.benchmarking.stages import INFER_STAGES, TRAIN_STAGES, _StageLog, benchmark, infer_stages
from spotocc.config import apply_overrides, get_config
from spotocc.data import build_dataset
from spotocc.data.synthetic import generate, source_image_size
from spotocc.data.synthetic.sample import make_sample
from spotocc.models import build_model

GEOMETRY_KEYS = ("rots", "trans", "intrins", "post_rots", "post_trans", "bda")
# a tiny SPOT model: the synthetic_tiny preset with a 32x32x16 grid and a 2-layer head
TINY = ["grid.occ_size=[32,32,16]", "head.num_layers=2", "head.num_points=512", "data.input_size=[64,192]"]


@pytest.mark.parametrize(
    "preset, fmt, overrides",
    [
        ("synthetic_tiny", "semantickitti", []),
        # the nuScenes rig and resize; small images and grid so that generating the dataset is quick
        ("spotocc_nusc_256", "nuscenes-occupancy", ["data.input_size=[64,176]", "grid.occ_size=[64,64,8]"]),
    ],
)
def test_inputs_have_the_readers_geometry_and_the_scene_ground_truth(tmp_path, preset, fmt, overrides):
    cfg = get_config(preset, overrides)
    summary = generate(
        tmp_path, fmt, num_train=1, num_val=0, seed=4, grid=cfg.grid, image_size=source_image_size(cfg.data)
    )
    sample = build_dataset(apply_overrides(cfg, summary.data_overrides), "train", train=False)[0]
    batch = benchmark_batch(cfg, 2, seed=4)
    n, (h, w) = len(cfg.data.cameras), cfg.data.input_size
    assert batch["img"].shape == (2, n, 3, h, w)
    for key in GEOMETRY_KEYS:
        for b in range(2):
            torch.testing.assert_close(batch[key][b], sample[key], rtol=0, atol=1e-5, msg=key)
    # The same procedural scene as the generator's, with every voxel labelled: the generator marks
    # the voxels no sensor observes as ignored (SemanticKITTI) or empty (nuScenes-Occupancy).
    generated = make_sample(fmt, "train", 0, seed=4, grid=cfg.grid, image_size=source_image_size(cfg.data))
    gt = batch["gt_occ"][0].numpy()
    assert gt.shape == tuple(cfg.grid.occ_size)
    known = (generated.gt != 255) & (generated.gt != 0)
    assert known.sum() > 100 and (gt[known] == generated.gt[known]).all()
    assert len(set(gt.ravel().tolist()) - {0, 255}) >= 3  # a street scene, not an empty grid
    assert not torch.equal(batch["gt_occ"][0], batch["gt_occ"][1])  # one scene per sample
    depth = batch["gt_depth"]
    assert depth.shape == (2, n, h, w)
    hit = depth > 0
    assert 0.01 < hit.float().mean() < 0.05
    lo, hi, _ = cfg.model.view_transformer.depth_bound
    assert depth[hit].min() >= lo and depth[hit].max() <= hi


def test_staged_inference_equals_predict():
    cfg = get_config("synthetic_tiny", TINY)
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False).eval()
    batch = benchmark_batch(cfg, 2)
    log = _StageLog(torch.device("cpu"), phase="time")
    labels = infer_stages(model, batch, log)
    assert torch.equal(labels, model.predict(batch))
    assert list(log.times) == list(INFER_STAGES)


def _check_stats(stats, stages):
    assert list(stats) == [*stages, "total"]
    for stage in stages:
        assert stats[stage]["median_s"] > 0 and len(stats[stage]["times_s"]) == 2
        assert stats[stage]["min_s"] <= stats[stage]["median_s"]
        assert stats[stage]["peak_mib"] >= stats[stage]["growth_mib"] >= 0
    per_run = [sum(stats[s]["times_s"][r] for s in stages) for r in range(2)]
    assert stats["total"]["median_s"] == pytest.approx(sum(per_run) / 2)


def test_compare_times_both_models_in_both_modes_and_reports_ratios():
    spot = get_config("synthetic_tiny", TINY)
    baseline = get_config("synthetic_tiny", [*TINY, "head.type=sparseocc"])
    baseline.name = "sparseocc_tiny"
    result = benchmark([spot, baseline], repeats=2, warmup=0)
    json.dumps(result)  # JSON-able as it is
    assert result["setup"]["presets"] == ["synthetic_tiny", "sparseocc_tiny"]
    assert result["setup"]["sparse_backend"] == {"synthetic_tiny": "dense", "sparseocc_tiny": "dense"}
    for name in ("synthetic_tiny", "sparseocc_tiny"):
        _check_stats(result["runs"][name]["infer"], INFER_STAGES)
        _check_stats(result["runs"][name]["train"], TRAIN_STAGES)
    runs = result["runs"]
    for mode, stages in (("infer", INFER_STAGES), ("train", TRAIN_STAGES)):
        for stage in (*stages, "total"):
            expected = (
                runs["sparseocc_tiny"][mode][stage]["median_s"]
                / runs["synthetic_tiny"][mode][stage]["median_s"]
            )
            assert result["ratios"][mode][stage]["time"] == pytest.approx(expected)


def test_cli_writes_json_with_every_stage(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["benchmark", "synthetic_tiny", *TINY, "--repeats", "1", "--warmup", "0", "--mode", "infer"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inference (eval, no_grad)" in text and "labels" in text and "one training step" not in text
    result = json.loads(out.read_text())
    assert result["setup"]["modes"] == ["infer"] and result["setup"]["batch_size"] == 1
    assert set(result["runs"]["synthetic_tiny"]["infer"]) == {*INFER_STAGES, "total"}


def test_cli_compare_of_two_saved_configs_at_batch_2(tmp_path, capsys):
    paths = []
    for name, extra in (("spot_tiny", []), ("sparseocc_tiny", ["head.type=sparseocc"])):
        cfg = get_config("synthetic_tiny", [*TINY, *extra])
        cfg.name = name
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(cfg.to_json())
    out = tmp_path / "compare.json"
    argv = ["benchmark", "--compare", *map(str, paths), "--batch", "2", "--repeats", "1", "--warmup", "0"]
    assert cli.main([*argv, "--mode", "infer", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "spot_tiny" in text and "sparseocc_tiny" in text and "B/A time" in text
    result = json.loads(out.read_text())
    assert (
        result["setup"]["presets"] == ["spot_tiny", "sparseocc_tiny"] and result["setup"]["batch_size"] == 2
    )
    assert set(result["ratios"]["infer"]) == {*INFER_STAGES, "total"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmark"], "give one PRESET"),
        (["benchmark", "synthetic_tiny", "--compare", "a", "b"], "give one PRESET"),
        (["benchmark", "synthetic_tiny", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peaks need Linux /proc")
def test_cpu_peak_sees_an_allocation_that_reuses_freed_memory():
    freed = [torch.ones(16 * 2**20 // 4) for _ in range(8)]  # 128 MiB, freed back to the C allocator
    del freed
    peak = MemoryPeak()
    with measure_peak(torch.device("cpu"), peak):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert 60 <= peak.growth_mib < 200 and peak.peak_mib >= peak.growth_mib
