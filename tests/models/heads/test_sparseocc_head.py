import math

import pytest
import torch
from torch import nn

from spotocc.config import HeadConfig, get_config
from spotocc.data.classes import cross_entropy_class_weights
from spotocc.models.heads import sparseocc as sparseocc_module
from spotocc.models.heads.coarse_losses import LOSS_KEYS, coarse_voxel_losses
from spotocc.models.heads.sparseocc import (
    MaskedAttentionDecoderLayer,
    SparseOccHead,
    masked_attention_mask,
)

NUM_CLASSES = 5
FREQUENCIES = (1e6, 3e4, 2e3, 5e4, 7e2)
# finest mask features, then memories from fine to coarse (the neck's order)
FEAT_SIZES = [(8, 8, 4), (4, 4, 2), (2, 2, 2), (2, 2, 1)]
GT_SIZE = (16, 16, 8)


class RecordingCriterion(nn.Module):
    """Stand-in for MaskSetCriterion: records its inputs and returns one surrogate loss."""

    def forward(self, cls_logits, mask_logits, gt_occ, dn_outputs=None, dn_meta=None):
        self.seen = dict(cls_logits=cls_logits, mask_logits=mask_logits, gt_occ=gt_occ, dn=dn_outputs)
        loss = sum(c.square().mean() for c in cls_logits) + sum(m.sigmoid().mean() for m in mask_logits)
        return {"loss_cls": loss}


def tiny_head(**overrides) -> SparseOccHead:
    kwargs = dict(
        num_classes=NUM_CLASSES,
        embed_dims=24,
        num_heads=2,
        num_queries=6,
        num_layers=3,
        num_levels=3,
        ffn_dims=32,
        class_frequencies=FREQUENCIES,
        coarse_norm_groups=4,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SparseOccHead(**kwargs, criterion=RecordingCriterion())


def tiny_feats(batch=2, channels=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *size, generator=gen) for size in FEAT_SIZES]


def tiny_gt(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, NUM_CLASSES, (batch, *GT_SIZE), generator=gen)
    gt[torch.rand(gt.shape, generator=gen) < 0.4] = 0
    gt[torch.rand(gt.shape, generator=gen) < 0.1] = 255
    return gt.to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# attention mask and decoder layer


def test_masked_attention_mask_hand_made():
    # mask logits [B=2, Q=3, 4, 2, 2] pooled to a [2, 1, 1] level: cell 0 = x in {0, 1}, cell 1 = x in {2, 3}
    logits = torch.full((2, 3, 4, 2, 2), -1.0)
    logits[0, 0, 1, 1, 0] = 2.0  # query 0: one positive voxel in cell 0 -> only cell 0 open
    logits[0, 1, 3, 0, 1] = 0.0  # query 1: logit 0 -> sigmoid = 0.5 is not < 0.5 -> cell 1 open
    # query 2 of sample 0: everything negative -> all blocked -> unblocked entirely
    logits[1, 0] = 5.0  # sample 1, query 0: all open
    logits[1, 1, 2:] = 1.0  # query 1: cell 1 open
    logits[1, 2, 0, 0, 0] = 1e-3  # query 2: cell 0 open by a hair
    mask = masked_attention_mask(logits, (2, 1, 1), num_heads=3)
    expected = torch.tensor(
        [
            [[False, True], [True, False], [False, False]],
            [[False, False], [True, False], [False, True]],
        ]
    )  # [B, Q, K], True = blocked
    assert mask.shape == (6, 3, 2) and mask.dtype == torch.bool
    for b in range(2):
        for h in range(3):
            assert torch.equal(mask[b * 3 + h], expected[b]), (b, h)
    assert not mask.requires_grad


def test_masked_attention_mask_uses_adaptive_max_pool_windows():
    # 10 -> 3 along z: adaptive windows [0, 4), [3, 7), [6, 10) overlap
    logits = torch.full((1, 4, 1, 1, 10), -1.0)
    logits[0, 0, 0, 0, 3] = 1.0  # in windows 0 and 1
    logits[0, 1, 0, 0, 6] = 1.0  # windows 1 and 2
    logits[0, 2, 0, 0, 9] = 1.0  # window 2
    logits[0, 3, 0, 0, 4] = 1.0  # window 1 only
    mask = masked_attention_mask(logits, (1, 1, 3), num_heads=1)
    open_cells = (~mask[0]).tolist()
    assert open_cells == [
        [True, True, False],
        [False, True, True],
        [False, False, True],
        [False, True, False],
    ]
    # a brute-force oracle on random logits and an uneven level
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 5, 10, generator=gen) - 1.5
    level = (4, 3, 3)
    mask = masked_attention_mask(logits, level, num_heads=2)
    for b in range(2):
        for q in range(5):
            blocked = []
            for i, j, k in torch.cartesian_prod(*[torch.arange(n) for n in level]).tolist():
                windows = [
                    slice(math.floor(i * 6 / 4), math.ceil((i + 1) * 6 / 4)),
                    slice(math.floor(j * 5 / 3), math.ceil((j + 1) * 5 / 3)),
                    slice(math.floor(k * 10 / 3), math.ceil((k + 1) * 10 / 3)),
                ]
                blocked.append(bool(torch.sigmoid(logits[b, q][tuple(windows)].max()) < 0.5))
            if all(blocked):
                blocked = [False] * len(blocked)
            for h in range(2):
                assert mask[b * 2 + h, q].tolist() == blocked


def test_decoder_layer_single_residuals_and_masked_cross_attention():
    torch.manual_seed(0)
    layer = MaskedAttentionDecoderLayer(embed_dims=8, num_heads=2, ffn_dims=16)
    gen = torch.Generator().manual_seed(1)
    query, query_pos = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    memory, memory_pos = torch.randn(2, 5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    mask = torch.rand(2, 3, 5, generator=gen) < 0.5
    mask[..., 0] = False
    head_mask = mask.repeat_interleave(2, dim=0)

    def attention(module, q, k, v, blocked):
        w, bias = module.in_proj_weight, module.in_proj_bias
        heads = lambda x: x.view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
        qh, kh, vh = (
            heads(q @ w[:8].T + bias[:8]),
            heads(k @ w[8:16].T + bias[8:16]),
            heads(v @ w[16:].T + bias[16:]),
        )
        scores = qh @ kh.transpose(-1, -2) / 2.0  # sqrt(head_dim = 4)
        if blocked is not None:
            scores = scores.masked_fill(blocked[:, None], float("-inf"))
        out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(q.shape)
        return module.out_proj(out)

    x1 = layer.cross_attn_norm(
        query + attention(layer.cross_attn, query + query_pos, memory + memory_pos, memory, mask)
    )
    q = x1 + query_pos
    x2 = layer.self_attn_norm(x1 + attention(layer.self_attn, q, q, x1, None))
    x3 = layer.ffn_norm(x2 + layer.ffn.fc2(torch.relu(layer.ffn.fc1(x2))))
    out = layer(query, memory, query_pos, memory_pos, cross_attn_mask=head_mask)
    torch.testing.assert_close(out, x3, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# head forward


def released_masks(head, queries, mask_feats, selected):
    """The released mask assembly: E . F0 at gathered selected voxels, scattered over E . empty_token."""
    x = head.post_norm(queries)
    embed = head.mask_embed(x)  # [B, Q, C]
    outs = []
    for b in range(len(queries)):
        index = selected[b].nonzero().squeeze(1)
        feats = mask_feats[b].flatten(1)[:, index]  # [C, K]
        full = (embed[b] @ head.empty_token.weight.T).expand(-1, mask_feats[0, 0].numel()).clone()
        full.scatter_(1, index.expand(len(embed[b]), -1), embed[b] @ feats)
        outs.append(full.view(-1, *mask_feats.shape[2:]))
    return head.class_embed(x), torch.stack(outs)


def test_eval_predicts_last_stage_only_and_training_every_stage():
    head = tiny_head().eval()
    with torch.no_grad():
        out = head(tiny_feats(), tiny_gt())
    assert len(out.cls_logits) == len(out.mask_logits) == 1
    assert out.cls_logits[0].shape == (2, 6, NUM_CLASSES + 1)
    assert out.mask_logits[0].shape == (2, 6, *FEAT_SIZES[0])
    assert out.coarse_logits.shape == (2, NUM_CLASSES, *FEAT_SIZES[0])
    assert out.dn_outputs is None and out.dn_meta is None
    train_out = head.train()(tiny_feats())
    assert len(train_out.cls_logits) == len(train_out.mask_logits) == 4  # stage 0 + 3 layers
    torch.testing.assert_close(train_out.mask_logits[-1], out.mask_logits[0])


def test_selection_and_stage_zero_masks_match_the_released_gather_scatter():
    head = tiny_head().train()
    feats = tiny_feats()
    out = head(feats)
    coarse = head.occ_pred_conv(feats[0])
    torch.testing.assert_close(out.coarse_logits, coarse)
    num_voxels = math.prod(FEAT_SIZES[0])
    k = int(num_voxels * 0.6)
    selected = head.select_voxels(out.coarse_logits)
    assert selected.shape == (2, num_voxels) and selected.sum(1).tolist() == [k, k]
    scores = 1 - coarse.flatten(2).softmax(1)[:, 0]  # [B, N0]
    for b in range(2):
        threshold = scores[b].sort(descending=True).values[k - 1]
        assert bool((scores[b][selected[b]] >= threshold).all())
        assert bool((scores[b][~selected[b]] <= threshold).all())
    cls, masks = released_masks(head, head.query_content.weight.expand(2, -1, -1), feats[0], selected)
    torch.testing.assert_close(out.cls_logits[0], cls)
    torch.testing.assert_close(out.mask_logits[0], masks, atol=1e-5, rtol=1e-5)


def test_softmax_over_batch_bug_selects_the_first_voxels():
    head = tiny_head(softmax_over_batch_bug=True)
    feats = tiny_feats()
    coarse = head.coarse_occupancy(feats[0])
    selected = head.select_voxels(coarse)
    k = int(math.prod(FEAT_SIZES[0]) * 0.6)
    assert selected[:, :k].all() and not selected[:, k:].any()
    # what the released nuScenes score is at batch size 1: identically 0
    released_score = 1 - coarse[:1].flatten(2).transpose(1, 2).softmax(dim=0)[..., 0]
    assert torch.equal(released_score, torch.zeros_like(released_score))
    out = head.train()(feats)
    _, masks = released_masks(head, head.query_content.weight.expand(2, -1, -1), feats[0], selected)
    torch.testing.assert_close(out.mask_logits[0], masks, atol=1e-5, rtol=1e-5)


def capture_layer_inputs(head):
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in head.layers]
    return calls, handles


def test_layers_get_memories_positions_and_masks_from_the_previous_stage():
    head = tiny_head(num_layers=4).train()
    feats = tiny_feats()
    calls, handles = capture_layer_inputs(head)
    out = head(feats)
    for h in handles:
        h.remove()
    assert len(calls) == 4 and len(out.mask_logits) == 5
    for i, (args, kwargs) in enumerate(calls):
        query, memory, query_pos, memory_pos = args
        level = i % 3  # level 0 = coarsest = voxel_feats[3]
        size = FEAT_SIZES[3 - level]
        torch.testing.assert_close(
            memory, feats[3 - level].flatten(2).transpose(1, 2) + head.level_embed.weight[level]
        )
        torch.testing.assert_close(memory_pos, head.positional_encoding(size))
        assert torch.equal(query_pos, head.query_pos.weight.expand(2, -1, -1))
        expected = masked_attention_mask(out.mask_logits[i], size, num_heads=2)  # previous stage
        assert torch.equal(kwargs["cross_attn_mask"], expected)
        assert kwargs["cross_attn_mask"].shape == (4, 6, math.prod(size))


def test_eval_uses_the_same_masks_as_training():
    head = tiny_head()
    feats = tiny_feats()
    train_last = head.train()(feats).mask_logits[-1]
    with torch.no_grad():
        eval_last = head.eval()(feats).mask_logits[-1]
    torch.testing.assert_close(eval_last, train_last.detach())


def test_forward_train_losses_and_gradients_of_every_parameter():
    head = tiny_head().train()
    feats = [f.requires_grad_() for f in tiny_feats()]
    gt = tiny_gt()
    losses = head.forward_train(feats, gt)
    assert set(losses) == {"loss_cls", *LOSS_KEYS}
    seen = head.criterion.seen
    assert len(seen["cls_logits"]) == 4 and seen["gt_occ"] is gt and seen["dn"] is None
    expected = coarse_voxel_losses(
        head.occ_pred_conv(feats[0]),
        gt,
        class_weights=torch.tensor(cross_entropy_class_weights(FREQUENCIES)[:NUM_CLASSES]),
    )
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses[key], expected[key])
    sum(losses.values()).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_occ_pred_conv_is_trained_only_by_the_coarse_losses():
    head = tiny_head().train()
    feats = [f.requires_grad_() for f in tiny_feats()]
    out = head(feats)
    matching = sum(c.square().mean() for c in out.cls_logits) + sum(
        m.sigmoid().mean() for m in out.mask_logits
    )
    matching.backward(retain_graph=True)
    assert all(p.grad is None for p in head.occ_pred_conv.parameters())
    grad_from_matching = feats[0].grad.clone()
    coarse = sum(coarse_voxel_losses(out.coarse_logits, tiny_gt()).values())
    coarse.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.occ_pred_conv.parameters())
    assert torch.equal(feats[0].grad, grad_from_matching)  # detached input: no gradient to the features
    # mask features receive gradient only at selected voxels
    selected = head.select_voxels(out.coarse_logits)
    grad = grad_from_matching.flatten(2).abs().sum(1)  # [B, N0]
    assert bool((grad[~selected] == 0).all()) and bool((grad[selected] > 0).all())


def test_checkpointing_does_not_change_the_coarse_gradient():
    feats = tiny_feats()
    grads = []
    for use_checkpoint in (True, False):
        head = tiny_head(checkpoint_coarse=use_checkpoint).train()
        sum(coarse_voxel_losses(head(feats).coarse_logits, tiny_gt()).values()).backward()
        grads.append([p.grad.clone() for p in head.occ_pred_conv.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bug", [False, True])
def test_batch_equals_per_sample(bug):
    head = tiny_head(softmax_over_batch_bug=bug)
    feats = tiny_feats(batch=3)
    for mode in ("train", "eval"):
        getattr(head, mode)()
        with torch.no_grad():
            batched = head(feats)
            singles = [head([f[b : b + 1] for f in feats]) for b in range(3)]
        for b, single in enumerate(singles):
            for got, want in zip(batched.cls_logits, single.cls_logits, strict=True):
                torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
            for got, want in zip(batched.mask_logits, single.mask_logits, strict=True):
                torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                batched.coarse_logits[b : b + 1], single.coarse_logits, atol=1e-5, rtol=1e-5
            )


def test_samples_of_a_batch_select_different_voxels():
    head = tiny_head()
    feats = tiny_feats()
    feats[0][1] = feats[0][1].flip(1)  # second sample's scene mirrored: different coarse scores
    selected = head.select_voxels(head.coarse_occupancy(feats[0]))
    assert not torch.equal(selected[0], selected[1])


def test_predict_logits_and_predict(monkeypatch):
    head = tiny_head().train()
    feats = tiny_feats()
    with torch.no_grad():
        probs, masks = head.predict_logits(feats)
        out = head.eval()(feats)
    torch.testing.assert_close(probs, out.cls_logits[-1].softmax(-1)[..., :-1])
    torch.testing.assert_close(masks, out.mask_logits[-1])
    calls = []
    monkeypatch.setattr(
        sparseocc_module,
        "occupancy_labels",
        lambda p, m, size, method: (
            calls.append((p, m, size, method)) or torch.zeros(2, *size, dtype=torch.long)
        ),
    )
    with torch.no_grad():
        labels = head.predict(feats, (16, 16, 8))
    assert labels.shape == (2, 16, 16, 8) and calls[0][2:] == ((16, 16, 8), "bounded")
    torch.testing.assert_close(calls[0][0], probs)
    torch.testing.assert_close(calls[0][1], masks)


# --------------------------------------------------------------------------------------------------
# presets, parameters, init, errors


@pytest.mark.parametrize(
    ("preset", "expected", "bug"),
    [("sparseocc_nusc_256", 8_176_931, False), ("sparseocc_kitti", 8_177_801, False)],
)
def test_parameter_count_of_preset_heads(preset, expected, bug):
    cfg = get_config(preset).model.head
    head = SparseOccHead.from_config(cfg, criterion=RecordingCriterion())
    assert sum(p.numel() for p in head.parameters()) == expected
    assert sum(p.numel() for p in head.layers[0].parameters()) == 889_152
    assert (
        sum(p.numel() for p in head.occ_pred_conv.parameters()) == 96 * 193 + 192 + (96 + 1) * cfg.num_classes
    )
    assert head.softmax_over_batch_bug is bug and head.topk_ratio == 0.6
    assert list(head.state_dict()) == [n for n, _ in head.named_parameters()]  # no extra persistent state
    torch.testing.assert_close(
        head.coarse_class_weights, torch.tensor(cross_entropy_class_weights(cfg.class_frequencies)[:-1])
    )


def test_state_dict_names_follow_the_documented_mapping():
    names = set(SparseOccHead(num_classes=17).state_dict())
    for name in [
        "layers.8.cross_attn.in_proj_weight",
        "layers.0.self_attn.out_proj.bias",
        "layers.3.ffn.fc1.weight",
        "layers.3.ffn_norm.bias",
        "post_norm.weight",
        "query_content.weight",
        "query_pos.weight",
        "level_embed.weight",
        "class_embed.weight",
        "mask_embed.4.bias",
        "empty_token.weight",
        "occ_pred_conv.0.weight",
        "occ_pred_conv.1.weight",
        "occ_pred_conv.3.bias",
    ]:
        assert name in names, name


def test_released_initialisation():
    head = SparseOccHead(num_classes=17)
    in_proj = torch.cat([layer.cross_attn.in_proj_weight.flatten() for layer in head.layers])
    assert abs(in_proj.std().item() - math.sqrt(2 / (192 + 576))) < 0.002  # xavier-normal, fans 192, 576
    ffn = torch.cat([layer.ffn.fc1.weight.flatten() for layer in head.layers])
    assert abs(ffn.std().item() - math.sqrt(2 / (192 + 1536))) < 0.002
    assert torch.all(head.layers[0].cross_attn.in_proj_bias == 0)
    assert torch.all(head.layers[0].self_attn.out_proj.bias == 0)
    assert abs(head.empty_token.weight.std().item() - 1.0) < 0.2  # embedding default N(0, 1)
    assert torch.all(head.occ_pred_conv[1].weight == 1)


def test_bad_inputs_raise_clear_errors():
    head = tiny_head()
    with pytest.raises(ValueError, match="expected 4 voxel feature volumes"):
        head(tiny_feats()[:3])
    feats = tiny_feats()
    feats[2] = feats[2][:, :8]
    with pytest.raises(ValueError, match=r"voxel_feats\[2\]"):
        head(feats)
    with pytest.raises(ValueError, match="head.type"):
        SparseOccHead.from_config(HeadConfig(type="spot"), criterion=RecordingCriterion())
    with pytest.raises(ValueError, match="class_frequencies"):
        SparseOccHead(num_classes=3, class_frequencies=(1.0, 2.0))
    with pytest.raises(ValueError, match="coarse_norm_groups"):
        SparseOccHead(num_classes=3, embed_dims=24, num_heads=2)
    with pytest.raises(ValueError, match="topk_ratio"):
        SparseOccHead(num_classes=3, topk_ratio=1.5)
    with pytest.raises(RuntimeError, match="criterion"):
        SparseOccHead(num_classes=3).forward_train(tiny_feats(channels=192), tiny_gt())
    with pytest.raises(ValueError, match="integer multiple"):
        head.forward_train(tiny_feats(), torch.zeros(2, 9, 8, 4, dtype=torch.uint8))


def test_forward_train_under_bf16_autocast_keeps_coarse_losses_in_float32():
    head = tiny_head().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = head.forward_train(tiny_feats(), tiny_gt())
    assert all(losses[key].dtype == torch.float32 for key in LOSS_KEYS)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
