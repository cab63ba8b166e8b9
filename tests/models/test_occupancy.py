"""The whole model on tiny synthetic scenes: losses, gradients, labels, batch size 2."""

import copy
import importlib

import pytest
import torch
from torch import nn

from spotocc.config import apply_overrides, get_config
from spotocc.data import build_dataset, collate
from spotocc.data.synthetic import generate, source_image_size
from spotocc.models import OccupancyModel, build_model


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    # the preset at half its input size (96x320, 12x40 feature cells at stride 8): fp16 autocast on a CPU
    # is slow, and every op still runs
    cfg = get_config("synthetic_tiny", ["data.input_size=(96, 320)"])
    out = tmp_path_factory.mktemp("synth")
    summary = generate(
        out,
        "semantickitti",
        num_train=2,
        num_val=0,
        seed=1,
        grid=cfg.grid,
        image_size=source_image_size(cfg.data),
    )
    cfg = apply_overrides(cfg, summary.data_overrides)
    dataset = build_dataset(cfg, "train", train=True)
    return cfg, collate([dataset[0], dataset[1]])


def _untouched_init_(model: nn.Module) -> None:
    """timm zero-initialises the last BN of each residual branch; undo it so every weight gets gradient."""
    for module in model.image_backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)


@pytest.mark.parametrize("head_type", ["spot", "sparseocc"])
def test_forward_train_backward_and_predict_batch_2(tiny_batch, head_type):
    cfg, batch = tiny_batch
    cfg = apply_overrides(copy.deepcopy(cfg), [f"head.type={head_type}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, OccupancyModel)
    assert [name for name, _ in model.named_children()] == [
        "image_backbone",
        "image_neck",
        "view_transformer",
        "voxel_encoder",
        "voxel_neck",
        "head",
    ]
    _untouched_init_(model)
    model.train()
    losses = model.forward_train(batch)
    assert "loss_depth" in losses and "loss_cls" in losses and "d0.loss_dice" in losses
    if head_type == "spot":
        assert "d0.loss_cls_dn" in losses
    else:
        assert "loss_voxel_lovasz_coarse" in losses
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    # Biases directly followed by a training-mode BatchNorm get an exactly cancelling gradient (spec 02
    # section 7.8); everything else must be reached.
    pre_bn_biases = {"voxel_encoder.aggregation3.conv1.0.bias", "voxel_encoder.aggregation3.conv1.3.bias"}
    pre_bn_biases |= {n.replace("aggregation3", "aggregation4") for n in pre_bn_biases}
    unreached = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or (p.grad.abs().sum() == 0 and name not in pre_bn_biases))
    ]
    assert unreached == []
    model.eval()
    labels = model.predict(batch)
    assert labels.shape == (2, *cfg.grid.occ_size) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < cfg.model.head.num_classes


def test_image_semantic_loss_trains_the_context_classifier_and_the_image_side(tiny_batch):
    cfg, batch = tiny_batch
    cfg = apply_overrides(copy.deepcopy(cfg), ["view_transformer.semantic_loss_weight=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model.forward_train(batch)
    semantic = losses["loss_image_semantic"]
    assert torch.isfinite(semantic) and semantic.item() > 0
    semantic.backward()
    classifier = model.view_transformer.context_classifier
    assert classifier.out_channels == cfg.model.head.num_classes
    assert classifier.weight.grad.abs().sum() > 0
    assert model.image_backbone.body.conv1.weight.grad.abs().sum() > 0  # reaches the image backbone
    assert all(p.grad is None for p in model.head.parameters())  # a 2D loss: the 3D side takes no part


def test_predict_of_a_batch_equals_per_sample_predictions(tiny_batch):
    cfg, batch = tiny_batch
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    together = model.predict(batch)
    one = {k: (v[:1] if torch.is_tensor(v) else v[:1]) for k, v in batch.items()}
    two = {k: (v[1:] if torch.is_tensor(v) else v[1:]) for k, v in batch.items()}
    assert torch.equal(together, torch.cat([model.predict(one), model.predict(two)]))


def test_unknown_head_type_is_a_clear_error():
    with pytest.raises(ValueError, match="head.type"):
        build_model(get_config("synthetic_tiny", ["head.type=nope"]))


@pytest.mark.parametrize("head_type", ["spot", "sparseocc"])
def test_head_label_method_selects_the_label_formation(tiny_batch, head_type, monkeypatch):
    cfg, batch = tiny_batch
    cfg = apply_overrides(copy.deepcopy(cfg), [f"head.type={head_type}", "head.label_method=direct"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.head.label_method == "direct"
    from spotocc.models import labels

    calls = []
    module = importlib.import_module(type(model.head).__module__)

    def recording(*args, **kwargs):
        calls.append(args[3])
        return labels.occupancy_labels(*args, **kwargs)

    monkeypatch.setattr(module, "occupancy_labels", recording)
    direct = model.predict(batch)
    model.head.label_method = "bounded"
    bounded = model.predict(batch)
    assert calls == ["direct", "bounded"]
    assert torch.equal(direct, bounded)  # the bounded method is exact
    with pytest.raises(ValueError, match="label_method"):
        build_model(apply_overrides(copy.deepcopy(cfg), ["head.label_method=fast"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_type", ["spot", "sparseocc"])
def test_whole_model_trains_and_predicts_under_cpu_autocast(tiny_batch, head_type, dtype):
    """``--amp bf16|fp16`` on a CPU: every op of the real model runs, losses and gradients are finite."""
    cfg, batch = tiny_batch
    cfg = apply_overrides(copy.deepcopy(cfg), [f"head.type={head_type}"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.autocast("cpu", dtype=dtype):
        losses = model.forward_train(batch)
    assert all(v.dtype == torch.float32 for k, v in losses.items() if "loss" in k)  # losses in fp32
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.autocast("cpu", dtype=dtype):
        labels = model.predict(batch)
    assert labels.shape == (2, *cfg.grid.occ_size) and labels.dtype == torch.int64


def test_depth_teacher_forcing_changes_the_lift_not_the_depth_loss(tiny_batch):
    cfg, batch = tiny_batch
    torch.manual_seed(0)
    model = build_model(cfg).train()
    _untouched_init_(model)
    torch.manual_seed(1)  # the same drop-path draws in both passes
    free = model.forward_train(batch)
    model.depth_teacher_weight = 0.5
    torch.manual_seed(1)
    forced = model.forward_train(batch)
    torch.testing.assert_close(forced["loss_depth"], free["loss_depth"])  # it scores the prediction
    assert not torch.allclose(forced["loss_mask"], free["loss_mask"])
    head_losses = sum(v for k, v in forced.items() if k != "loss_depth")
    head_losses.backward()  # the (1 - weight) share of the prediction still reaches the depth net
    assert model.view_transformer.depth_net.depth_conv[-1].weight.grad.abs().sum() > 0
