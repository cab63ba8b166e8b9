import copy
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from spotocc.models.backbones import ImageBackbone, load_backbone_weights, mmcls_efficientnet_key_to_timm


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet50_is_the_released_backbone():
    bb = ImageBackbone(name="resnet50", out_indices=(1, 2, 3, 4), frozen_stem=True)
    assert _num_params(bb) == 23_508_032  # released img_backbone (torchvision ResNet-50 without fc)
    assert bb.out_channels == (256, 512, 1024, 2048) and bb.strides == (4, 8, 16, 32)
    feats = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (2, 256, 16, 24),
        (2, 512, 8, 12),
        (2, 1024, 4, 6),
        (2, 2048, 2, 3),
    ]
    # torchvision (= mmdet ResNet) names and shapes below the body prefix
    tv = torchvision.models.resnet50(weights=None).state_dict()
    expected = {"body." + k: v.shape for k, v in tv.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in bb.state_dict().items()} == expected


def test_efficientnet_b7_is_the_released_backbone():
    bb = ImageBackbone(name="tf_efficientnet_b7", out_indices=(1, 2, 3, 4, 5), drop_path_rate=0.2)
    assert _num_params(bb) == 63_786_960  # incl. the 1x1 conv to 2560 and its BN, without classifier
    assert bb.out_channels == (48, 80, 224, 640, 2560) and bb.strides == (4, 8, 16, 32, 32)
    assert [len(stage) for stage in bb.body.blocks] == [4, 7, 7, 10, 10, 13, 4]
    # BN eps 1e-3 everywhere
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    # mmcls drop-path schedule: linspace(0, 0.2, 55) over all blocks in order
    blocks = [b for stage in bb.body.blocks for b in stage]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert len(blocks) == 55 and rates[0] == 0.0 and isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert rates == pytest.approx([0.2 * i / 54 for i in range(55)])


def test_tf_same_padding_of_strided_convs():
    """TF "SAME": a stride-2 3x3 conv on an even size pads 0 on top/left and 1 on bottom/right."""
    bb = ImageBackbone(name="tf_efficientnet_b0", out_indices=(1,))
    x = torch.randn(1, 3, 8, 10)
    w = bb.body.conv_stem.weight
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2)
    torch.testing.assert_close(bb.body.conv_stem(x), expected)


def test_efficientnet_head_conv_equals_timm_forward_features(tmp_path):
    full = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "b0.pth")  # timm layout incl. the classifier
    bb = ImageBackbone(name="tf_efficientnet_b0", out_indices=(3, 5), weights=str(tmp_path / "b0.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = bb(x)
    assert [f.shape[1] for f in feats] == [112, 1280]
    torch.testing.assert_close(feats[1], full.forward_features(x))


def test_frozen_stem_stays_frozen_and_in_eval_mode():
    bb = ImageBackbone(name="resnet18", out_indices=(1, 2, 3, 4), frozen_stem=True)
    bb.train()
    assert not bb.body.bn1.training and bb.body.layer1[0].bn1.training
    assert not any(p.requires_grad for p in bb.body.conv1.parameters())
    assert not any(p.requires_grad for p in bb.body.bn1.parameters())
    stats = bb.body.bn1.running_mean.clone()
    bb.eval().train()  # train() again must keep the stem BN in eval mode
    sum(f.sum() for f in bb(torch.randn(2, 3, 32, 32))).backward()
    assert torch.equal(bb.body.bn1.running_mean, stats)
    assert bb.body.conv1.weight.grad is None and bb.body.bn1.weight.grad is None
    assert bb.body.layer1[0].conv1.weight.grad is not None


def _train_step(bb: ImageBackbone, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    bb.train()
    feats = bb(x)
    sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in feats).backward()
    return [f.detach() for f in feats], [p.grad.clone() for p in bb.parameters() if p.grad is not None]


def test_checkpointing_reproduces_the_released_double_bn_update_and_the_fix_removes_it():
    torch.manual_seed(0)
    plain = ImageBackbone(name="resnet18", out_indices=(2, 3))
    state = copy.deepcopy(plain.state_dict())
    ckpt = ImageBackbone(name="resnet18", out_indices=(2, 3), activation_checkpointing=True)
    fixed = ImageBackbone(
        name="resnet18",
        out_indices=(2, 3),
        activation_checkpointing=True,
        fix_checkpoint_bn_double_update=True,
    )
    ckpt.load_state_dict(state)
    fixed.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    outs = [_train_step(m, x) for m in (plain, ckpt, fixed)]
    for feats, grads in outs[1:]:  # identical outputs and gradients
        for a, b in zip(feats + grads, outs[0][0] + outs[0][1]):
            torch.testing.assert_close(a, b)
    bn = "layer2.0.bn1"
    r0_mean, r0_var = state[f"body.{bn}.running_mean"], state[f"body.{bn}.running_var"]
    one = dict(plain.named_modules())[f"body.{bn}"]
    two = dict(ckpt.named_modules())[f"body.{bn}"]
    once = dict(fixed.named_modules())[f"body.{bn}"]
    batch_mean = (one.running_mean - 0.9 * r0_mean) / 0.1
    batch_var = (one.running_var - 0.9 * r0_var) / 0.1
    torch.testing.assert_close(two.running_mean, 0.81 * r0_mean + 0.19 * batch_mean)
    torch.testing.assert_close(two.running_var, 0.81 * r0_var + 0.19 * batch_var)
    assert int(two.num_batches_tracked) == 2 and int(once.num_batches_tracked) == 1
    torch.testing.assert_close(once.running_mean, one.running_mean)
    torch.testing.assert_close(once.running_var, one.running_var)


def test_checkpointing_skips_the_block_after_a_frozen_stem():
    """Released with_cp: layer1.0's input comes from the frozen stem, so it is not checkpointed."""
    bb = ImageBackbone(name="resnet18", out_indices=(1, 2), frozen_stem=True, activation_checkpointing=True)
    _train_step(bb, torch.randn(2, 3, 32, 32))
    assert int(bb.body.layer1[0].bn1.num_batches_tracked) == 1
    assert int(bb.body.layer1[1].bn1.num_batches_tracked) == 2
    assert int(bb.body.layer2[0].bn1.num_batches_tracked) == 2


def test_loads_torchvision_weights_and_matches_torchvision_features(tmp_path):
    tv = torchvision.models.resnet18(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    bb = ImageBackbone(
        name="resnet18", out_indices=(4,), frozen_stem=True, weights=str(tmp_path / "resnet18.pth")
    )
    bb.eval()
    x = torch.randn(1, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])
    torch.testing.assert_close(bb(x)[0], trunk(x))


def test_weight_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ImageBackbone(name="resnet18", out_indices=(4,), weights=str(tmp_path / "nope.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        ImageBackbone(name="resnet18", out_indices=(4,), weights=str(tmp_path / "garbage.pth"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    bb = ImageBackbone(name="resnet18", out_indices=(4,))
    with pytest.raises(ValueError) as err:
        load_backbone_weights(bb, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing (1): body.layer4.1.bn2.bias" in msg
    assert "unexpected (1): body.extra.weight" in msg
    assert "body.layer2.0.conv1.weight: file (3, 3, 3, 3) vs model (128, 64, 3, 3)" in msg


def test_mmcls_efficientnet_key_mapping_b7():
    depths = [4, 7, 7, 10, 10, 13, 4]
    cases = {
        "layers.0.conv.weight": "conv_stem.weight",
        "layers.0.bn.running_var": "bn1.running_var",
        "layers.1.0.depthwise_conv.conv.weight": "blocks.0.0.conv_dw.weight",
        "layers.1.3.linear_conv.bn.weight": "blocks.0.3.bn2.weight",
        "layers.1.0.se.conv1.conv.bias": "blocks.0.0.se.conv_reduce.bias",
        "layers.2.0.expand_conv.conv.weight": "blocks.1.0.conv_pw.weight",
        "layers.2.6.depthwise_conv.bn.bias": "blocks.1.6.bn2.bias",
        "layers.4.9.se.conv2.conv.weight": "blocks.3.9.se.conv_expand.weight",
        "layers.4.10.expand_conv.bn.weight": "blocks.4.0.bn1.weight",
        "layers.5.12.linear_conv.conv.weight": "blocks.5.12.conv_pwl.weight",
        "layers.5.13.linear_conv.bn.running_mean": "blocks.6.0.bn3.running_mean",
        "layers.6.conv.weight": "conv_head.weight",
        "layers.6.bn.bias": "bn2.bias",
    }
    for src, dst in cases.items():
        assert mmcls_efficientnet_key_to_timm(src, depths) == dst
    with pytest.raises(ValueError, match="beyond"):
        mmcls_efficientnet_key_to_timm("layers.5.17.linear_conv.bn.bias", depths)


def _timm_to_mmcls(key: str, depths: list[int]) -> str:
    """Independent inverse of the mapping, written for this test."""
    if key.startswith("conv_stem."):
        return "layers.0.conv." + key[len("conv_stem.") :]
    if key.startswith("bn1."):
        return "layers.0.bn." + key[4:]
    if key.startswith("conv_head."):
        return "layers.6.conv." + key[len("conv_head.") :]
    if key.startswith("bn2."):
        return "layers.6.bn." + key[4:]
    stage, block, part, rest = re.fullmatch(r"blocks\.(\d)\.(\d+)\.(se\.conv_\w+|\w+)\.(.+)", key).groups()
    stage, block = int(stage), int(block)
    layer = {0: 1, 1: 2, 2: 3, 3: 4, 4: 4, 5: 5, 6: 5}[stage]
    block += {4: depths[3], 6: depths[5]}.get(stage, 0)
    if stage == 0:
        names = {"conv_dw": "depthwise_conv.conv", "bn1": "depthwise_conv.bn", "conv_pw": "linear_conv.conv"}
        names.update({"bn2": "linear_conv.bn"})
    else:
        names = {"conv_pw": "expand_conv.conv", "bn1": "expand_conv.bn", "conv_dw": "depthwise_conv.conv"}
        names.update({"bn2": "depthwise_conv.bn", "conv_pwl": "linear_conv.conv", "bn3": "linear_conv.bn"})
    names.update({"se.conv_reduce": "se.conv1.conv", "se.conv_expand": "se.conv2.conv"})
    return f"layers.{layer}.{block}.{names[part]}.{rest}"


def test_loads_an_mmcls_efficientnet_checkpoint(tmp_path):
    full = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    depths = [len(s) for s in full.blocks]
    state = {
        "backbone." + _timm_to_mmcls(k, depths): v
        for k, v in full.state_dict().items()
        if "classifier" not in k
    }
    state["head.fc.weight"] = torch.zeros(1000, 1280)  # mmcls classifier, dropped by prefix='backbone'
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "mmcls_b0.pth")
    bb = ImageBackbone(
        name="tf_efficientnet_b0", out_indices=(5,), weights=str(tmp_path / "mmcls_b0.pth")
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bb(x)[0], full.forward_features(x))


def test_bad_names_and_indices_are_rejected():
    with pytest.raises(ValueError, match="unknown timm model"):
        ImageBackbone(name="not_a_model", out_indices=(1,))
    with pytest.raises(ValueError, match="out_indices"):
        ImageBackbone(name="resnet18", out_indices=(1, 5))
    with pytest.raises(ValueError, match="out_indices"):
        ImageBackbone(name="resnet18", out_indices=(3, 2))
    with pytest.raises(ValueError, match="out_indices"):  # MobileNetV3's head conv runs after pooling
        ImageBackbone(name="mobilenetv3_small_100", out_indices=(2, 5))
