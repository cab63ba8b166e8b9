"""The Occ3D presets: the nuScenes model but for the class-dependent layers and the neck's up-convs,
and a small Occ3D model that trains a step on generated Occ3D scenes on a CPU."""

import pytest
import torch

from spotocc.config import apply_overrides, get_config
from spotocc.data import Occ3DNuScenes, build_dataset, collate
from spotocc.data.classes import OCC3D_CLASSES, class_set
from spotocc.data.synthetic import generate, source_image_size
from spotocc.models import build_model
from spotocc.models.summary import build_meta_model

C = 192  # the nuScenes presets' head / neck width


def _counts(preset):
    model = build_meta_model(get_config(preset))
    return {name: p.numel() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("occ3d", "nusc"), [("spotocc_occ3d", "spotocc_nusc_256"), ("sparseocc_occ3d", "sparseocc_nusc_256")]
)
def test_parameters_match_the_nuscenes_preset_but_classes_and_neck_upsampling(occ3d, nusc):
    a, b = _counts(occ3d), _counts(nusc)
    assert a.keys() == b.keys()
    differ = {name for name in a if a[name] != b[name]}
    neck = {name for name in differ if name.startswith("voxel_neck.up_sample.")}
    assert neck == {"voxel_neck.up_sample.0.0.weight", "voxel_neck.up_sample.1.0.weight"}
    assert a["voxel_neck.up_sample.0.0.weight"] == C * C * 3 * 3 * 3  # instead of (2,2,3)
    assert a["voxel_neck.up_sample.1.0.weight"] == C * C * 3 * 3 * 2
    assert all(name.startswith("head.") for name in differ - neck)
    # every head difference is one class more: 18 instead of 17 (a row or a column of a class layer)
    for name in differ - neck:
        assert 0 < a[name] - b[name] <= C + 1, name
    cfg = get_config(occ3d)
    assert cfg.grid.occ_size == (200, 200, 16) and cfg.grid.lss_size == (50, 50, 4)
    assert cfg.model.head.num_classes == len(class_set(cfg.data.class_set)[0]) == 18
    assert OCC3D_CLASSES[0] == "free" and cfg.data.format == "occ3d-nuscenes"
    assert cfg.data.cameras == get_config(nusc).data.cameras and cfg.data.input_size == (256, 704)


@pytest.fixture(scope="module")
def occ3d_batch(tmp_path_factory):
    cfg = get_config("synthetic_tiny_occ3d", ["data.input_size=(64, 96)"])
    out = tmp_path_factory.mktemp("synth_occ3d")
    summary = generate(
        out, "occ3d-nuscenes", num_train=2, num_val=0, seed=2, grid=cfg.grid,
        image_size=source_image_size(cfg.data), lidar_azimuth_steps=256,
    )  # fmt: skip
    cfg = apply_overrides(cfg, summary.data_overrides)
    dataset = build_dataset(cfg, "train", train=True)
    assert isinstance(dataset, Occ3DNuScenes)
    return cfg, collate([dataset[0], dataset[1]])


@pytest.mark.parametrize("head_type", ["spot", "sparseocc"])
def test_small_occ3d_model_trains_a_step_on_generated_scenes(occ3d_batch, head_type):
    cfg, batch = occ3d_batch
    cfg = apply_overrides(cfg, [f"head.type={head_type}"])
    assert batch["gt_occ"].shape == (2, 100, 100, 8) and batch["mask_camera"].shape == (2, 100, 100, 8)
    assert ((batch["gt_occ"] == 255) == ~batch["mask_camera"]).all()  # data.gt_mask=camera
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model.forward_train(batch)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total) and "loss_depth" in losses
    total.backward()
    for name, module in model.named_children():  # every part of the model gets gradient
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert any(bool(g.abs().sum() > 0) for g in grads), name
    model.eval()
    with torch.no_grad():
        labels = model.predict(batch)
    assert labels.shape == (2, 100, 100, 8) and int(labels.max()) < 18
