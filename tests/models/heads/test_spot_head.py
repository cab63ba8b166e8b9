import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spotocc.config import HeadConfig, get_config
from spotocc.models.heads import spot as spot_module
from spotocc.models.heads.spot import SpotDecoderLayer, SpotOccHead
from spotocc.models.heads.targets import occupancy_to_class_masks

NUM_CLASSES = 5
# finest mask features, then memories from fine to coarse (the neck's order)
FEAT_SIZES = [(8, 8, 4), (4, 4, 2), (2, 2, 2), (2, 2, 1)]
GT_SIZE = (16, 16, 8)


class RecordingCriterion(nn.Module):
    """Stand-in for MaskSetCriterion: records its inputs and returns one surrogate loss."""

    def forward(self, cls_logits, mask_logits, gt_occ, dn_outputs=None, dn_meta=None):
        self.seen = dict(
            cls_logits=cls_logits, mask_logits=mask_logits, gt_occ=gt_occ, dn=dn_outputs, meta=dn_meta
        )
        return {"loss_cls": sum(c.sum() for c in cls_logits)}


def tiny_head(**overrides) -> SpotOccHead:
    kwargs = dict(
        num_classes=NUM_CLASSES,
        embed_dims=24,
        num_heads=2,
        num_queries=6,
        num_layers=3,
        num_levels=3,
        ffn_dims=32,
        pruning_ratio=0.3,
        min_k=2,
        dn_noise_scale=0.0,
        dn_label_noise_ratio=0.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SpotOccHead(**kwargs, criterion=RecordingCriterion())


def tiny_feats(batch=2, channels=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *size, generator=gen) for size in FEAT_SIZES]


def tiny_gt(batch=2, seed=0):
    """Samples with different class counts: sample b uses classes {0, .., 3 - b} plus ignored voxels."""
    gen = torch.Generator().manual_seed(seed)
    gts = []
    for b in range(batch):
        gt = torch.randint(0, 4 - b, GT_SIZE, generator=gen)
        gt[torch.rand(GT_SIZE, generator=gen) < 0.1] = 255
        gts.append(gt)
    return torch.stack(gts).to(torch.uint8)


def test_eval_predicts_last_stage_only():
    head = tiny_head().eval()
    with torch.no_grad():
        out = head(tiny_feats(), tiny_gt())  # GT ignored in eval: no DN
    assert len(out.cls_logits) == len(out.mask_logits) == 1
    assert out.cls_logits[0].shape == (2, 6, NUM_CLASSES + 1)
    assert out.mask_logits[0].shape == (2, 6, *FEAT_SIZES[0])
    assert out.dn_outputs is None and out.dn_meta is None


def test_train_predicts_every_stage_with_denoising():
    head = tiny_head().train()
    out = head(tiny_feats(), tiny_gt())
    assert len(out.cls_logits) == len(out.mask_logits) == 4  # stage 0 + 3 layers
    assert all(c.shape == (2, 6, NUM_CLASSES + 1) for c in out.cls_logits)
    assert all(m.shape == (2, 6, *FEAT_SIZES[0]) for m in out.mask_logits)
    assert out.dn_meta == {"pad_size": 4, "scalar": 1, "max_num_gts": 4, "num_gts_list": [4, 3]}
    assert [stage for stage, _, _ in out.dn_outputs] == [0]  # released: DN loss on stage 0 only
    _, dn_cls, dn_masks = out.dn_outputs[0]
    assert dn_cls.shape == (2, 4, NUM_CLASSES + 1) and dn_masks.shape == (2, 4, *FEAT_SIZES[0])
    # without GT, training still predicts every stage, without DN
    out = head(tiny_feats())
    assert len(out.cls_logits) == 4 and out.dn_outputs is None


def test_stage_zero_is_the_query_content_before_any_layer():
    head = tiny_head().train()
    feats = tiny_feats()
    out = head(feats)
    x = head.post_norm(head.query_content.weight)
    torch.testing.assert_close(out.cls_logits[0][0], head.class_embed(x))
    expected_masks = torch.einsum("qc,cn->qn", head.mask_embed(x), feats[0][1].flatten(1))
    torch.testing.assert_close(out.mask_logits[0][1].flatten(1), expected_masks, atol=1e-5, rtol=1e-5)


def capture_layer_inputs(head):
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in head.layers]
    return calls, handles


@pytest.mark.parametrize(("consistent", "loss_layers"), [(False, 1), (True, 1), (True, 2), (False, 2)])
def test_denoising_masks_and_supervised_stages(consistent, loss_layers):
    head = tiny_head(dn_consistent=consistent, dn_loss_layers=loss_layers).train()
    gt, feats = tiny_gt(), tiny_feats()
    calls, handles = capture_layer_inputs(head)
    out = head(feats, gt)
    for h in handles:
        h.remove()
    expected_stages = [1 + i for i in range(loss_layers)] if consistent else list(range(loss_layers))
    assert [stage for stage, _, _ in out.dn_outputs] == expected_stages
    pad = out.dn_meta["pad_size"]
    dn_content = calls[0][0][0][:, :pad]
    for i, (args, kwargs) in enumerate(calls):
        query, memory, query_pos = args
        level = i % 3  # level 0 = coarsest = voxel_feats[3]
        pos = head.positional_encoding(FEAT_SIZES[3 - level])
        expected_memory = feats[3 - level].flatten(2).transpose(1, 2) + head.level_embed.weight[level] + pos
        torch.testing.assert_close(memory, expected_memory)
        assert torch.equal(query_pos[:, :pad], dn_content)  # DN positions = the initial DN content
        mask = kwargs["cross_attn_mask"]
        if i >= loss_layers:
            assert mask is None
            continue
        level_size = FEAT_SIZES[3 - i % 3]
        assert mask.shape == (2, pad + 6, math.prod(level_size))
        assert not mask[:, pad:].any()
        for b in range(2):
            _, masks = occupancy_to_class_masks(gt[b], NUM_CLASSES)
            strides = [g // s for g, s in zip(GT_SIZE, level_size)]
            pooled = F.max_pool3d(masks[None].float(), strides, strides)[0] > 0.5
            n_b = masks.shape[0]
            assert torch.equal(~mask[b, :n_b], pooled.flatten(1))
            assert mask[b, n_b:pad].all()  # padded DN slots blocked everywhere
        padding = kwargs["query_padding_mask"]
        assert padding[1, 3] and not padding[0].any()


def test_gradient_reaches_every_parameter():
    head = tiny_head(dn_noise_scale=0.1, dn_label_noise_ratio=0.2).train()
    feats = [f.requires_grad_() for f in tiny_feats()]
    out = head(feats, tiny_gt())
    loss = sum(c.square().mean() for c in out.cls_logits) + sum(m.sigmoid().mean() for m in out.mask_logits)
    loss = loss + sum(c.square().mean() + m.sigmoid().mean() for _, c, m in out.dn_outputs)
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_batch_equals_per_sample_in_eval():
    head = tiny_head().eval()
    feats = tiny_feats(batch=3)
    with torch.no_grad():
        batched = head(feats)
        for b in range(3):
            single = head([f[b : b + 1] for f in feats])
            torch.testing.assert_close(
                batched.cls_logits[0][b : b + 1], single.cls_logits[0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                batched.mask_logits[0][b : b + 1], single.mask_logits[0], atol=1e-5, rtol=1e-5
            )


def test_batch_equals_per_sample_in_training_with_denoising():
    # noise on: the DN draws are made sample after sample, so the same seed gives the same noise
    head = tiny_head(
        dn_noise_scale=0.2, dn_label_noise_ratio=0.5, dn_consistent=True, dn_loss_layers=3
    ).train()
    feats, gt = tiny_feats(), tiny_gt()
    torch.manual_seed(123)
    batched = head(feats, gt)
    torch.manual_seed(123)
    singles = [head([f[b : b + 1] for f in feats], gt[b : b + 1]) for b in range(2)]
    assert batched.dn_meta["num_gts_list"] == [4, 3]
    for b, single in enumerate(singles):
        for got, want in zip(batched.cls_logits, single.cls_logits):
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
        for got, want in zip(batched.mask_logits, single.mask_logits):
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
        n_b = single.dn_meta["pad_size"]
        for (stage, cls, masks), (stage1, cls1, masks1) in zip(batched.dn_outputs, single.dn_outputs):
            assert stage == stage1
            torch.testing.assert_close(cls[b : b + 1, :n_b], cls1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(masks[b : b + 1, :n_b], masks1, atol=1e-5, rtol=1e-5)


def test_denoising_queries_change_matching_outputs_only_in_training():
    # released quirk kept: DN queries enter SPOT-CA's query-axis normalisation
    head = tiny_head().train()
    feats, gt = tiny_feats(), tiny_gt()
    with_dn = head(feats, gt)
    without_dn = head(feats)
    torch.testing.assert_close(with_dn.cls_logits[0], without_dn.cls_logits[0])  # before any layer
    assert not torch.allclose(with_dn.cls_logits[-1], without_dn.cls_logits[-1], atol=1e-5)
    fixed = tiny_head(fix_interaction_norm=True).train()
    torch.testing.assert_close(
        fixed(feats, gt).cls_logits[-1], fixed(feats).cls_logits[-1], atol=1e-5, rtol=1e-5
    )


def test_forward_train_passes_outputs_to_the_criterion():
    head = tiny_head().train()
    gt = tiny_gt()
    losses = head.forward_train(tiny_feats(), gt)
    seen = head.criterion.seen
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].requires_grad
    assert len(seen["cls_logits"]) == 4 and seen["gt_occ"] is gt
    assert seen["meta"]["pad_size"] == 4 and [s for s, _, _ in seen["dn"]] == [0]


def test_predict_logits_and_predict(monkeypatch):
    head = tiny_head().train()  # predict_logits never uses DN or intermediate stages
    feats = tiny_feats()
    with torch.no_grad():
        probs, masks = head.predict_logits(feats)
        head.eval()
        out = head(feats)
    torch.testing.assert_close(probs, out.cls_logits[-1].softmax(-1)[..., :-1])
    torch.testing.assert_close(masks, out.mask_logits[-1])
    assert probs.shape == (2, 6, NUM_CLASSES) and bool((probs.sum(-1) < 1).all())

    calls = []
    monkeypatch.setattr(
        spot_module,
        "occupancy_labels",
        lambda p, m, size, method: (
            calls.append((p, m, size, method)) or torch.zeros(2, *size, dtype=torch.long)
        ),
    )
    with torch.no_grad():
        labels = head.predict(feats, (16, 16, 8))
    assert labels.shape == (2, 16, 16, 8)
    torch.testing.assert_close(calls[0][0], probs)
    assert calls[0][2:] == ((16, 16, 8), "bounded")


def test_decoder_layer_order_and_double_residual():
    torch.manual_seed(0)
    layer = SpotDecoderLayer(embed_dims=24, num_heads=2, ffn_dims=32, pruning_ratio=0.3, min_k=2)
    fixed = SpotDecoderLayer(
        embed_dims=24, num_heads=2, ffn_dims=32, pruning_ratio=0.3, min_k=2, fix_double_residual=True
    )
    fixed.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(1)
    query, query_pos = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    memory = torch.randn(2, 11, 24, generator=gen)
    sa_mask = torch.zeros(5, 5, dtype=torch.bool)
    sa_mask[3:, :2] = True

    x1 = layer.cross_attn_norm(layer.cross_attn(query, memory, query_pos))
    q = x1 + query_pos
    attn_weights = torch.softmax(
        (q @ layer.self_attn.in_proj_weight[:24].T + layer.self_attn.in_proj_bias[:24])
        .view(2, 5, 2, 12)
        .transpose(1, 2)
        @ (q @ layer.self_attn.in_proj_weight[24:48].T + layer.self_attn.in_proj_bias[24:48])
        .view(2, 5, 2, 12)
        .permute(0, 2, 3, 1)
        / math.sqrt(12)
        + torch.zeros(5, 5).masked_fill(sa_mask, float("-inf")),
        dim=-1,
    )  # [B, H, Q, Q]
    v = (x1 @ layer.self_attn.in_proj_weight[48:].T + layer.self_attn.in_proj_bias[48:]).view(2, 5, 2, 12)
    sa = layer.self_attn.out_proj((attn_weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 5, 24))

    for module, x2 in [(layer, x1 + (x1 + sa)), (fixed, x1 + sa)]:
        x2 = module.self_attn_norm(x2)
        x3 = module.ffn_norm(x2 + module.ffn.fc2(torch.relu(module.ffn.fc1(x2))))
        out = module(query, memory, query_pos, self_attn_mask=sa_mask)
        torch.testing.assert_close(out, x3, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("preset", "expected"), [("spotocc_nusc_256", 8_168_274), ("spotocc_kitti", 8_169_429)]
)
def test_parameter_count_of_preset_heads(preset, expected):
    head = SpotOccHead.from_config(get_config(preset).model.head, criterion=RecordingCriterion())
    assert sum(p.numel() for p in head.parameters()) == expected
    assert sum(p.numel() for p in head.layers[0].parameters()) == 890_112
    assert sum(p.numel() for p in head.criterion.parameters()) == 0


def test_released_initialisation():
    head = SpotOccHead(num_classes=17)
    alphas = torch.cat([layer.cross_attn.alpha.flatten() for layer in head.layers])
    assert not torch.any(alphas == 0.1)  # the module's own 0.1 is overwritten
    assert abs(alphas.std().item() - math.sqrt(2 / 384)) < 0.01  # xavier-normal, fan 192 + 192
    ffn = torch.cat([layer.ffn.fc1.weight.flatten() for layer in head.layers])
    assert abs(ffn.std().item() - math.sqrt(2 / (192 + 1536))) < 0.002
    assert torch.all(head.layers[0].self_attn.in_proj_bias == 0)
    assert torch.all(head.post_norm.weight == 1)


def test_bad_inputs_raise_clear_errors():
    head = tiny_head()
    with pytest.raises(ValueError, match="expected 4 voxel feature volumes"):
        head(tiny_feats()[:3])
    with pytest.raises(ValueError, match=r"voxel_feats\[2\]"):
        feats = tiny_feats()
        feats[2] = feats[2][:, :8]
        head(feats)
    with pytest.raises(ValueError, match="gt_occ"):
        head.train()(tiny_feats(), tiny_gt()[0])
    with pytest.raises(ValueError, match="head.type"):
        SpotOccHead.from_config(HeadConfig(type="sparseocc"), criterion=RecordingCriterion())
    with pytest.raises(RuntimeError, match="criterion"):
        SpotOccHead(num_classes=3, embed_dims=12, num_heads=2, num_layers=1, ffn_dims=8).forward_train(
            [torch.zeros(1, 12, 2, 2, 2)] * 4, torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
        )
