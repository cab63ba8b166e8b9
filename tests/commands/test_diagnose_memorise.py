"""``spotocc diagnose memorise``: each oracle variant runs and scores on generated scenes, the gt-features
variant trains the head alone, the gt-depth variant lifts one-hot LiDAR depth, and the command's output,
JSON and user errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from spotocc.cli import main
from spotocc.commands.diagnose import MEMORISE_VARIANTS
from spotocc.config import apply_overrides
from spotocc.data.batch import collate
from spotocc.diagnostics.memorise import (
    VARIANTS,
    GroundTruthDepth,
    GroundTruthFeatures,
    head_input_sizes,
    memorise,
)
from spotocc.models import build_model
from spotocc.models.view_transform import depth_targets

# A small synthetic_tiny: 16^3 GT grid (LSS 8^3: the neck's x2 upsampling needs even sizes down to
# 1^3), one 32x64 camera (2x4 feature cells), 24 depth bins, few matching points.
TINY = [
    "grid.occ_size=(16, 16, 16)",
    "data.input_size=(32, 64)",
    "view_transformer.downsample=16",
    "image_neck.upsample_strides=(0.5, 1, 2)",
    "view_transformer.depth_bound=(2.0, 50.0, 2.0)",
    "head.num_points=512",
]


@pytest.fixture(scope="module")
def tiny(generated_scenes):
    """(config, root, scenes): two generated SemanticKITTI-layout scenes read without augmentation."""
    return generated_scenes(TINY, "memorise")


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, load_pretrained=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_scores_the_present_classes(tiny, variant):
    cfg, _, scenes = tiny
    lines: list[str] = []
    result = memorise(cfg, scenes, variant, steps=2, batch_size=2, lr=None, seed=0, log=lines.append)
    assert result.variant == variant and result.steps == 2 and result.num_samples == 2
    assert result.lr == cfg.train.lr
    assert len(result.loss_history) == 2 and all(math.isfinite(v) for v in result.loss_history)
    assert result.last_losses and all(math.isfinite(v) for v in result.last_losses.values())
    assert lines[0].startswith("step 1/2  loss ") and lines[-1].startswith("step 2/2  loss ")
    if variant == "voxel-ce":
        assert set(result.last_losses) == {"loss_ce", "loss_depth"}
    assert ("loss_depth" in result.last_losses) == (variant in ("pipeline", "voxel-ce"))

    # GT voxels per class = the label histogram of the scenes; every present class has an IoU in [0, 100]
    labels = np.concatenate([s["gt_occ"].numpy().ravel() for s in scenes])
    hist = np.bincount(labels[labels != 255], minlength=20)
    assert result.gt_voxels == hist.tolist()
    present = result.present_classes()
    assert present == np.flatnonzero(hist).tolist() and len(present) > 3
    for c in present:
        assert 0.0 <= result.class_iou(c) <= 100.0
    assert 0.0 <= result.metrics["SC_IoU"] <= 100.0 and 0.0 <= result.present_miou <= 100.0


def test_head_inputs_have_the_real_necks_shapes(tiny):
    cfg, _, scenes = tiny
    model = _model(cfg).eval()
    batch = collate(scenes)
    with torch.no_grad():
        real, _ = model.extract_features(batch)
    oracle = GroundTruthFeatures(20, cfg.model.head.embed_dims, lss_downsample=cfg.grid.lss_downsample)(
        batch["gt_occ"]
    )
    sizes = head_input_sizes(cfg.grid)
    assert [tuple(v.shape) for v in real] == [tuple(v.shape) for v in oracle] == [(2, 48, *s) for s in sizes]
    # level 0 of a voxel = the projection of its LSS cell's class shares (ignore counted as class 0)
    gt = batch["gt_occ"].long()
    cell = gt[0, 4:6, 2:4, 6:8].flatten()
    shares = torch.bincount(torch.where(cell == 255, 0, cell), minlength=20).float() / cell.numel()
    torch.testing.assert_close(oracle[0][0, :, 2, 1, 3], shares @ _projection(cfg))


def _projection(cfg):
    return torch.randn(20, cfg.model.head.embed_dims, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("variant", "trained"), [("gt-features", {"head"}), ("voxel-ce", None)])
def test_which_modules_a_variant_trains(tiny, variant, trained):
    cfg, _, scenes = tiny
    model = _model(cfg)
    before = copy.deepcopy(model.state_dict())
    memorise(cfg, scenes, variant, steps=2, batch_size=2, seed=0, log=None, model=model)
    after = model.state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    stages = {"image_backbone", "image_neck", "view_transformer", "voxel_encoder", "voxel_neck", "head"}
    assert changed == (trained or stages - {"head"})
    assert all(p.requires_grad for p in model.parameters())  # voxel-ce's frozen head is unfrozen again


def test_gt_depth_lift_receives_one_hot_lidar_depth(tiny):
    cfg, _, scenes = tiny
    model = _model(cfg)
    vt = model.view_transformer
    pooled: list[torch.Tensor] = []  # depth_prob [B*N, D, fH, fW] of every view-transformer call
    vt.register_forward_hook(lambda module, inputs, out: pooled.append(out[1].detach()))
    memorise(cfg, scenes, "gt-depth", steps=2, batch_size=2, seed=0, log=None, model=model)
    assert len(vt.depth_net._forward_hooks) == 0  # the oracle's hook is taken off again
    assert len(pooled) == 2 + len(scenes)  # 2 training steps, then one scoring call per scene

    def one_hot_at_lidar(prob, scene):
        bins, valid = depth_targets(
            scene["gt_depth"][None], downsample=vt.downsample, depth_bound=vt.depth_bound, fix_bin_offset=True
        )
        rows = prob.permute(1, 2, 0).reshape(-1, vt.num_bins)  # [fH*fW, D], the targets' cell order
        assert valid.any()
        return bool((rows[valid, bins[valid]] > 0.99).all())

    for prob, scene in zip(pooled[2:], scenes):  # scoring: the scenes in order
        assert one_hot_at_lidar(prob[0], scene)
    for prob in pooled[:2]:  # training: each batch entry is one of the scenes
        assert all(any(one_hot_at_lidar(p, s) for s in scenes) for p in prob)


def test_gt_depth_hook_keeps_the_predicted_depth_where_no_lidar_point(tiny):
    cfg, _, scenes = tiny
    cfg = apply_overrides(copy.deepcopy(cfg), ["view_transformer.depth_from_occupancy=false"])  # LiDAR only
    model = _model(cfg).eval()
    vt = model.view_transformer
    batch = collate(scenes[:1])
    gt_depth = batch["gt_depth"].clone()
    gt_depth[..., :, 32:] = 0.0  # no LiDAR in the right half: feature columns 2, 3
    with torch.no_grad():
        feats = model.encode_images(batch["img"])
        _, predicted = model.lift(feats, batch)  # [1, D, 2, 4]
        with GroundTruthDepth(vt) as oracle:
            oracle.set({**batch, "gt_depth": gt_depth})
            _, replaced = model.lift(feats, batch)
        _, again = model.lift(feats, batch)
    bins, valid = depth_targets(
        gt_depth, downsample=vt.downsample, depth_bound=vt.depth_bound, fix_bin_offset=True
    )
    valid, bins = valid.view(2, 4), bins.view(2, 4)
    assert valid[:, :2].any() and not valid[:, 2:].any()
    for i, j in zip(*torch.nonzero(valid, as_tuple=True)):
        assert replaced[0, bins[i, j], i, j] > 0.99
    torch.testing.assert_close(replaced[..., 2:], predicted[..., 2:])
    assert torch.equal(again, predicted)  # hook removed on exit


# --------------------------------------------------------------------------------------------------
# The command


def test_memorise_command_prints_the_table_and_writes_json(tiny, tmp_path, capsys):
    cfg, root, scenes = tiny
    out_json = tmp_path / "mem.json"
    argv = ["diagnose", "memorise", "synthetic_tiny", "--data", str(root), "--variant", "gt-features",
            "--samples", "2", "--steps", "3", "--batch", "1", "--lr", "0.002", "--device", "cpu",
            *TINY, "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == (
        "synthetic_tiny: memorise 2 scenes of split 'train', variant gt-features, 3 steps of batch 1, "
        "lr 0.002, seed 0, cpu"
    )
    assert lines[1].startswith("step 1/3  loss ") and lines[2].startswith("step 3/3  loss ")
    assert any(line.startswith("SC IoU ") and " non-empty classes present " in line for line in lines)
    assert any(line.startswith(("classes with >= 500 GT voxels", "no non-empty class has")) for line in lines)

    saved = json.loads(out_json.read_text())
    assert saved["variant"] == "gt-features" and saved["steps"] == 3 and saved["num_samples"] == 2
    assert saved["lr"] == 0.002 and saved["batch_size"] == 1 and saved["seconds"] > 0
    assert saved["config"] == "synthetic_tiny" and len(saved["loss_history"]) == 3
    labels = np.concatenate([s["gt_occ"].numpy().ravel() for s in scenes])
    assert [c["id"] for c in saved["classes"]] == np.flatnonzero(np.bincount(labels[labels != 255])).tolist()
    for c in saved["classes"]:  # the table row of each present class shows the saved IoU
        assert 0.0 <= c["iou"] <= 100.0
        assert saved["metrics"][f"SSC_{c['name']}_IoU"] == c["iou"]
        row = next(line for line in lines if line.split() and line.split()[0] == c["name"])
        assert float(row.split()[-1]) == c["iou"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variant", "nope"], "--variant must be one of pipeline, gt-depth, gt-features, voxel-ce"),
        (["--variant", "pipeline", "--steps", "0"], "--steps must be >= 1"),
        (["--variant", "pipeline", "--samples", "0"], "--samples must be >= 1"),
        (["--variant", "pipeline"], "data root"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    assert MEMORISE_VARIANTS == VARIANTS
    argv = ["diagnose", "memorise", "synthetic_tiny", "--data", str(tmp_path / "missing"), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spotocc diagnose: error: ") and message in lines[0]
    assert captured.out == ""


def test_pipeline_memorisation_follows_the_depth_teacher_forcing_schedule(tiny):
    cfg, _, scenes = tiny
    cfg = apply_overrides(
        copy.deepcopy(cfg), ["train.depth_teacher_forcing=0.6", "train.depth_teacher_forcing_end=1.0"]
    )
    model = _model(cfg)
    seen: list[float] = []
    forward_train = model.forward_train

    def recording(batch):
        seen.append(model.depth_teacher_weight)
        return forward_train(batch)

    model.forward_train = recording
    memorise(cfg, scenes, "pipeline", steps=3, batch_size=2, seed=0, log=None, model=model)
    assert seen == pytest.approx([0.6, 0.4, 0.2])


@pytest.mark.slow
def test_the_whole_model_memorises_eight_scenes_with_what_stands_on_the_ground(generated_scenes):
    """A smaller form of the memorisation acceptance (1000 steps): the real ``synthetic_tiny`` on 8
    generated scenes for 240 steps (the issue's 60 epochs; ~3.5 minutes on 2 cores). Cars and buildings
    must be learned, and no class with 2000+ GT voxels left out. The preset as it was when the issue was
    filed (96x320 input at stride 16, 0.5 m bins, sum pooling, no occupancy depth targets, no teacher
    forcing) fails it: building 0.8 IoU. The preset now gave building 18.3 to 25.3 and car 17.9 to 18.6,
    the lowest of the big classes 10.7 (runs with other float rounding: thread count, sparse backend)."""
    cfg, _, scenes = generated_scenes([], "memorise8", num_train=8)
    result = memorise(cfg, scenes, "pipeline", steps=240, batch_size=2, log=None)
    checked = {result.class_names[c]: result.class_iou(c) for c in result.present_classes(2000) if c}
    assert {"car", "building", "road", "terrain"} <= set(checked), checked  # the scenes hold them
    assert checked["car"] >= 10.0 and checked["building"] >= 10.0, checked
    assert all(iou >= 5.0 for iou in checked.values()), checked
