import pytest
import torch
from torch import nn

from spotocc.config import TrainConfig
from spotocc.engine.optim import (
    StepSchedule,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    lr_at_epoch,
    param_groups,
)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_embed = nn.Embedding(4, 8)
        self.query_feat = nn.Embedding(4, 8)
        self.level_embed = nn.Embedding(3, 8)
        self.label_enc = nn.Embedding(5, 8)  # released: not a custom key, so it decays
        self.cls_embed = nn.Linear(8, 6)
        self.post_norm = nn.LayerNorm(8)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
        self.image_backbone[0].weight.requires_grad_(False)  # a frozen stem
        self.voxel_neck = nn.Sequential(nn.Conv3d(8, 8, 1), nn.GroupNorm(2, 8))
        self.view_transformer = nn.Sequential(nn.Linear(8, 8), nn.InstanceNorm1d(8, affine=True))
        self.head = _Head()


def test_param_groups_follow_the_released_paramwise_cfg():
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(_Model(), 0.01)}
    assert groups["no_decay"] == {
        "image_backbone.1.weight",
        "image_backbone.1.bias",
        "voxel_neck.1.weight",
        "voxel_neck.1.bias",
        "view_transformer.1.weight",
        "view_transformer.1.bias",
        "head.query_embed.weight",
        "head.query_feat.weight",
        "head.level_embed.weight",
        "head.post_norm.weight",
        "head.post_norm.bias",
    }
    assert groups["decay"] == {
        "voxel_neck.0.weight",
        "voxel_neck.0.bias",  # biases decay (bias_decay_mult = 1)
        "view_transformer.0.weight",
        "view_transformer.0.bias",
        "head.label_enc.weight",
        "head.cls_embed.weight",
        "head.cls_embed.bias",
    }  # the frozen stem conv is left out


def test_adamw_settings_and_decay_applied():
    model = _Model()
    opt = build_optimizer(model, TrainConfig())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 1e-4 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    decayed, kept = model.head.label_enc.weight, model.head.query_embed.weight
    before_d, before_k = decayed.detach().clone(), kept.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.allclose(decayed, before_d * (1 - 1e-4 * 0.01))  # decoupled decay only
    assert torch.equal(kept, before_k)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ((20, 23), {0: 1e-4, 19: 1e-4, 20: 1e-5, 22: 1e-5, 23: 1e-6}),
        ((20, 25), {24: 1e-5, 25: 1e-6, 29: 1e-6}),
    ],
)
def test_step_schedule_matches_released_epochs(steps, expected):
    cfg = TrainConfig(lr_steps=steps)
    opt = build_optimizer(_Model(), cfg)
    schedule = build_lr_scheduler(opt, cfg)
    seen = {}
    for epoch in range(max(expected) + 1):
        seen[epoch] = opt.param_groups[0]["lr"]
        assert all(g["lr"] == seen[epoch] for g in opt.param_groups)
        schedule.step()
    for epoch, lr in expected.items():
        assert seen[epoch] == pytest.approx(lr) and lr_at_epoch(cfg, epoch) == pytest.approx(lr)
    # resume: a new schedule loading the state continues at the same epoch
    fresh = StepSchedule(build_optimizer(_Model(), cfg), cfg.lr_steps, cfg.lr_gamma)
    fresh.load_state_dict(schedule.state_dict())
    assert fresh.get_last_lr() == schedule.get_last_lr()


def test_clip_gradients_global_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = clip_gradients([a, b], max_norm=1.0)
    total = (9 * 3 + 16 * 4) ** 0.5
    assert norm.item() == pytest.approx(total)
    clipped = torch.cat([a.grad, b.grad]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-4)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    assert clip_gradients([a, b], max_norm=None).item() == pytest.approx(total)
    assert a.grad[0].item() == 3.0  # no clipping requested
