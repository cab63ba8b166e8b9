"""Released-name mapping: one to one for all four runs, clear errors, and the same numbers as the
released modules (independent transcriptions of the released math, spconv itself)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spotocc.config import get_config
from spotocc.models import build_model
from spotocc.models.heads.sparseocc import MaskedAttentionDecoderLayer
from spotocc.models.heads.spot import SpotDecoderLayer
from spotocc.models.released import (
    ReleasedCheckpointError,
    convert_released_state_dict,
    guess_released_preset,
    released_key_to_spotocc,
    spotocc_geometry,
)
from spotocc.models.sparse.conv import SparseTensor
from spotocc.models.sparse.encoder import SparseLatentDiffuser
from spotocc.models.sparse.pyramid import SparseFeaturePyramid
from spotocc.models.sparse.spconv_backend import load_spconv
from spotocc.models.view_transform import ViewTransformer


def _load_layout():
    name = "spotocc_tests_released_layout"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "data" / "released_parameters" / "released_layout.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


rl = _load_layout()
_META_MODELS: dict[str, torch.nn.Module] = {}


def meta_model(preset: str) -> torch.nn.Module:
    if preset not in _META_MODELS:
        with torch.device("meta"):
            _META_MODELS[preset] = build_model(get_config(preset), load_pretrained=False)
    return _META_MODELS[preset]


def convert(state, preset="spotocc_nusc_256"):
    cfg = get_config(preset)
    return convert_released_state_dict(
        state, meta_model(preset), geometry=spotocc_geometry(cfg), config_name=preset
    )


def error_of(state, preset="spotocc_nusc_256") -> str:
    with pytest.raises(ReleasedCheckpointError) as info:
        convert(state, preset)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# names and shapes, all four runs


@pytest.mark.parametrize("preset", rl.PRESETS)
def test_every_released_tensor_maps_to_exactly_one_spotocc_tensor_of_the_same_shape(preset):
    released = rl.released_state_dict(preset, seed=None)  # stride-0 placeholders: names and shapes only
    own = meta_model(preset).state_dict()
    result = convert(released, preset)
    assert len(released) == len(own)
    assert sorted(result.names) == sorted(released)
    assert sorted(result.names.values()) == sorted(own)  # every parameter and buffer filled, once each
    for name, target in result.names.items():
        assert own[target].shape == released[name].shape, name
    assert guess_released_preset(list(released)) == preset


def test_the_listings_hold_the_released_totals():
    """The copied listings are the released runs' (README of spec/released-parameters)."""
    totals = {
        "spotocc_nusc_256": (607, 105_206_483),
        "spotocc_kitti": (1160, 161_031_026),
        "sparseocc_nusc_256": (532, 105_215_140),
        "sparseocc_kitti": (1085, 161_039_398),
    }
    for preset, (count, total) in totals.items():
        params = rl.released_parameters(preset)
        assert (len(params), sum(math.prod(s) for s in params.values())) == (count, total)


HAND_MAPPED = [  # (released name, head type, spotocc name), written out from the documented rules
    ("img_neck.deblocks.3.1.running_var", "spot", "image_neck.deblocks.3.1.running_var"),
    (
        "img_view_transformer.depth_net.depth_conv.4.conv_offset.bias",
        "spot",
        "view_transformer.depth_net.depth_conv.4.conv_offset.bias",
    ),
    ("img_bev_encoder_backbone.resBlock0.net.3.weight", "spot", "voxel_encoder.res_block.net.3.weight"),
    (
        "img_bev_encoder_backbone.complBlock3.layers1.1.conv.1.num_batches_tracked",
        "spot",
        "voxel_encoder.completion3.layers1.1.conv.1.num_batches_tracked",
    ),
    (
        "img_bev_encoder_backbone.aggreBlock2.conv2.3.weight",
        "spot",
        "voxel_encoder.aggregation2.conv2.3.weight",
    ),
    ("img_bev_encoder_neck.output_convs.0.gn.bias", "spot", "voxel_neck.output_convs.0.gn.bias"),
    (
        "pts_bbox_head.transformer_decoder.layers.7.spot_cross_attn.key_proj.0.bias",
        "spot",
        "head.layers.7.cross_attn.key_proj.0.bias",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.2.pem_cross_attn.alpha",
        "spot",
        "head.layers.2.cross_attn.alpha",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.0.self_attn.attn.out_proj.bias",
        "spot",
        "head.layers.0.self_attn.out_proj.bias",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.5.ffn.layers.0.0.weight",
        "spot",
        "head.layers.5.ffn.fc1.weight",
    ),
    ("pts_bbox_head.transformer_decoder.layers.5.ffn.layers.1.bias", "spot", "head.layers.5.ffn.fc2.bias"),
    (
        "pts_bbox_head.transformer_decoder.layers.8.norms.0.weight",
        "spot",
        "head.layers.8.cross_attn_norm.weight",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.8.norms.1.weight",
        "spot",
        "head.layers.8.self_attn_norm.weight",
    ),
    ("pts_bbox_head.transformer_decoder.layers.8.norms.2.bias", "spot", "head.layers.8.ffn_norm.bias"),
    ("pts_bbox_head.transformer_decoder.post_norm.weight", "spot", "head.post_norm.weight"),
    ("pts_bbox_head.query_feat.weight", "spot", "head.query_content.weight"),
    ("pts_bbox_head.query_embed.weight", "spot", "head.query_pos.weight"),
    ("pts_bbox_head.cls_embed.bias", "spot", "head.class_embed.bias"),
    ("pts_bbox_head.label_enc.weight", "spot", "head.dn_label_embed.weight"),
    ("pts_bbox_head.mask_embed.4.weight", "spot", "head.mask_embed.4.weight"),
    (
        "pts_bbox_head.transformer_decoder.layers.3.attentions.0.attn.in_proj_weight",
        "sparseocc",
        "head.layers.3.cross_attn.in_proj_weight",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.3.attentions.1.attn.out_proj.weight",
        "sparseocc",
        "head.layers.3.self_attn.out_proj.weight",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.6.ffns.0.layers.0.0.bias",
        "sparseocc",
        "head.layers.6.ffn.fc1.bias",
    ),
    (
        "pts_bbox_head.transformer_decoder.layers.6.ffns.0.layers.1.weight",
        "sparseocc",
        "head.layers.6.ffn.fc2.weight",
    ),
    ("pts_bbox_head.empty_token.weight", "sparseocc", "head.empty_token.weight"),
    ("pts_bbox_head.occ_pred_conv.1.bias", "sparseocc", "head.occ_pred_conv.1.bias"),
]


@pytest.mark.parametrize(("released", "head_type", "expected"), HAND_MAPPED)
def test_documented_name_rules(released, head_type, expected):
    assert released_key_to_spotocc(released, head_type=head_type) == expected


@pytest.mark.parametrize(
    ("released", "preset", "expected"),
    [
        ("img_backbone.layer2.3.downsample.1.running_mean", "spotocc_nusc_256", None),  # no downsample in x.3
        (
            "img_backbone.layer2.0.downsample.1.running_mean",
            "spotocc_nusc_256",
            "image_backbone.body.layer2.0.downsample.1.running_mean",
        ),
        ("img_backbone.conv1.weight", "spotocc_nusc_256", "image_backbone.body.conv1.weight"),
        ("img_backbone.layers.0.conv.weight", "spotocc_kitti", "image_backbone.body.conv_stem.weight"),
        ("img_backbone.layers.0.bn.running_var", "spotocc_kitti", "image_backbone.body.bn1.running_var"),
        (
            "img_backbone.layers.1.3.linear_conv.conv.weight",
            "spotocc_kitti",
            "image_backbone.body.blocks.0.3.conv_pw.weight",
        ),
        (
            "img_backbone.layers.2.0.se.conv1.conv.bias",
            "spotocc_kitti",
            "image_backbone.body.blocks.1.0.se.conv_reduce.bias",
        ),
        # mmcls layers.4 = timm stages 3 (10 blocks) and 4: block 12 is stage 4's block 2
        (
            "img_backbone.layers.4.12.expand_conv.bn.weight",
            "spotocc_kitti",
            "image_backbone.body.blocks.4.2.bn1.weight",
        ),
        # mmcls layers.5 = timm stages 5 (13 blocks) and 6: block 14 is stage 6's block 1
        (
            "img_backbone.layers.5.14.depthwise_conv.conv.weight",
            "spotocc_kitti",
            "image_backbone.body.blocks.6.1.conv_dw.weight",
        ),
        ("img_backbone.layers.6.conv.weight", "spotocc_kitti", "image_backbone.conv_head.weight"),
        (
            "img_backbone.layers.6.bn.num_batches_tracked",
            "spotocc_kitti",
            "image_backbone.bn2.num_batches_tracked",
        ),
    ],
)
def test_backbone_names(released, preset, expected):
    backbone = meta_model(preset).image_backbone
    mapped = released_key_to_spotocc(released, head_type="spot", backbone=backbone)
    own = meta_model(preset).state_dict()
    if expected is None:
        assert mapped not in own  # the conversion reports it as a tensor without a spotocc target
    else:
        assert mapped == expected and expected in own


@pytest.mark.parametrize(
    ("released", "message"),
    [
        ("img_bev_encoder_backbone.complBlock9.layers1.0.conv.0.weight", "unknown sparse-encoder block"),
        ("pts_bbox_head.transformer_decoder.layers.0.attentions.0.attn.in_proj_weight", "no rule maps"),
        ("backbone.conv1.weight", "not below a released top-level module"),
        ("img_backbone.layers.0.conv.weight", "needs the model's backbone"),
    ],
)
def test_names_without_a_rule_are_errors(released, message):
    with pytest.raises(ReleasedCheckpointError, match=message):
        released_key_to_spotocc(released, head_type="spot")


# --------------------------------------------------------------------------------------------------
# errors of the whole conversion


def test_missing_tensor_is_listed():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    del released["pts_bbox_head.transformer_decoder.layers.3.norms.2.bias"]
    del released["img_backbone.layer4.1.bn2.num_batches_tracked"]
    message = error_of(released)
    assert "spotocc tensors the released weights do not fill (2)" in message
    assert "head.layers.3.ffn_norm.bias" in message
    assert "image_backbone.body.layer4.1.bn2.num_batches_tracked" in message


def test_extra_tensors_are_listed():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["pts_bbox_head.decoder_input_projs.0.weight"] = torch.zeros(3)
    released["img_neck.extra_conv.weight"] = torch.zeros(3)
    message = error_of(released)
    assert "released tensors no rule maps (1)" in message
    assert "pts_bbox_head.decoder_input_projs.0.weight" in message
    assert "released tensors without a spotocc tensor of that name (1)" in message
    assert "img_neck.extra_conv.weight -> image_neck.extra_conv.weight" in message


def test_two_released_tensors_for_one_spotocc_tensor_is_an_error():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["pts_bbox_head.transformer_decoder.layers.4.pem_cross_attn.alpha"] = torch.zeros(1, 1, 192)
    message = error_of(released)
    assert "spotocc tensors filled twice (1)" in message
    assert "head.layers.4.cross_attn.alpha <- " in message and "spot_cross_attn.alpha" in message


def test_shape_mismatch_names_both_sides():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["pts_bbox_head.cls_embed.weight"] = torch.zeros(21, 192)
    message = error_of(released)
    assert "pts_bbox_head.cls_embed.weight [21, 192] -> head.class_embed.weight [18, 192]" in message


def test_integer_tensor_for_a_float_parameter_is_an_error():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["pts_bbox_head.query_feat.weight"] = torch.zeros(100, 192, dtype=torch.int64)
    assert "pts_bbox_head.query_feat.weight: torch.int64" in error_of(released)


def test_non_tensor_entries_are_errors():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["img_view_transformer.frustum"] = [1.0, 2.0]
    released["pts_bbox_head.level_embed.weight"] = "weights"
    message = error_of(released)
    assert "img_view_transformer.frustum: a list, not a tensor" in message
    assert "pts_bbox_head.level_embed.weight: a str, not a tensor" in message


def test_a_checkpoint_of_another_run_names_the_run_it_looks_like():
    message = error_of(rl.released_state_dict("spotocc_kitti", seed=None), preset="spotocc_nusc_256")
    assert "they look like preset 'spotocc_kitti'" in message
    message = error_of(rl.released_state_dict("sparseocc_nusc_256", seed=None), preset="spotocc_nusc_256")
    assert "they look like preset 'sparseocc_nusc_256'" in message
    assert "attentions.0.attn" in message


def test_frustum_for_another_input_size_fails_clearly():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["img_view_transformer.frustum"] = rl.released_geometry("nusc", input_size=(512, 1408))["frustum"]
    with pytest.raises(ReleasedCheckpointError, match="frustum") as info:
        convert(released)
    message = str(info.value)
    assert "[112, 32, 88, 3] vs spotocc's [112, 16, 44, 3]" in message
    assert "data.input_size" in message


def test_geometry_values_that_differ_fail():
    released = rl.released_state_dict("spotocc_nusc_256", seed=None)
    released["img_view_transformer.dx"] = released["img_view_transformer.dx"] * 2  # another grid
    with pytest.raises(ReleasedCheckpointError, match=r"img_view_transformer\.dx: values differ"):
        convert(released)


def test_geometry_equals_the_released_formulas_and_the_models_own():
    for preset, dataset in (("spotocc_nusc_256", "nusc"), ("sparseocc_kitti", "kitti")):
        cfg = get_config(preset)
        ours = spotocc_geometry(cfg)
        theirs = rl.released_geometry(dataset)
        full = ViewTransformer.from_config(cfg.model.view_transformer, cfg.grid, cfg.data.input_size)
        for name in ("dx", "bx", "nx", "frustum"):
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
            assert torch.equal(ours[name], getattr(full, name))


def test_ddp_prefix_is_stripped_and_half_precision_is_cast():
    released = {"module." + k: v for k, v in rl.released_state_dict("spotocc_nusc_256", seed=None).items()}
    released["module.pts_bbox_head.level_embed.weight"] = torch.ones(3, 192, dtype=torch.float16)
    result = convert(released)
    assert "pts_bbox_head.level_embed.weight" in result.names
    assert result.cast == ["pts_bbox_head.level_embed.weight"]
    assert result.state["head.level_embed.weight"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# numerics: released tensors mean the same in spotocc as in the released modules


def layer_params(preset: str, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 tensors for one released decoder layer, by released name below the layer."""
    prefix = f"pts_bbox_head.transformer_decoder.layers.{layer}."
    gen = torch.Generator().manual_seed(seed)
    return {
        name[len(prefix) :]: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
        for name, shape in rl.released_parameters(preset).items()
        if name.startswith(prefix)
    }


def load_layer(module: torch.nn.Module, params: dict[str, torch.Tensor], head_type: str, layer: int) -> None:
    """Load released-name tensors into a spotocc decoder layer through the conversion rules."""
    prefix = f"head.layers.{layer}."
    state = {}
    for name, tensor in params.items():
        target = released_key_to_spotocc(
            f"pts_bbox_head.transformer_decoder.layers.{layer}.{name}", head_type=head_type
        )
        assert target.startswith(prefix)
        state[target[len(prefix) :]] = tensor
    module.load_state_dict(state, strict=True)


def ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"])


def linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def mmcv_mha(query, key, value, p, prefix, heads, mask=None):
    """mmcv MultiheadAttention (batch_first False) written out: identity + out_proj(attention).

    query [Q, B, C], key/value [K, B, C]; the packed in_proj rows are q, k, v in that order; mask bool
    [B * heads, Q, K], True = blocked. Returns [Q, B, C] WITHOUT the identity (callers add it).
    """
    w, b = p[prefix + "in_proj_weight"], p[prefix + "in_proj_bias"]
    c = query.shape[-1]
    d = c // heads
    q = query @ w[:c].T + b[:c]
    k = key @ w[c : 2 * c].T + b[c : 2 * c]
    v = value @ w[2 * c :].T + b[2 * c :]

    def split(t):  # [L, B, C] -> [B * heads, L, d], batch-major as torch's MHA
        return t.reshape(t.shape[0], t.shape[1] * heads, d).transpose(0, 1)

    scores = split(q) @ split(k).transpose(1, 2) / math.sqrt(d)  # [B*H, Q, K]
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = scores.softmax(-1) @ split(v)  # [B*H, Q, d]
    out = out.transpose(0, 1).reshape(query.shape[0], query.shape[1], c)
    return out @ p[prefix + "out_proj.weight"].T + p[prefix + "out_proj.bias"]


def released_spot_cross_attention(p, x, mem, qpos, kpos, heads, rho, min_k):
    """Spec 03 section 1.2, step by step, seq-first as released, top-k by gather."""
    ca = "spot_cross_attn."
    residual = x  # step 1
    q_in, k_in = x + qpos, mem + kpos  # step 2: the value is k_in itself
    qp = linear(ln(q_in, p, ca + "query_proj.0"), p, ca + "query_proj.1")  # step 3, [Q, B, C]
    kp = linear(ln(k_in, p, ca + "key_proj.0"), p, ca + "key_proj.1")  # [K, B, C]
    nq, b, c = x.shape
    nk, d = mem.shape[0], c // heads
    q = qp.permute(1, 0, 2).reshape(b, nq, heads, d)  # step 4
    k = kp.permute(1, 0, 2).reshape(b, nk, heads, d)
    v = k_in.permute(1, 0, 2).reshape(b, nk, heads, d)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # step 5
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)  # step 6
    kk = max(min_k, min(math.ceil(rho * nk), nk))  # step 8
    top, idx = s.topk(kk, dim=-1)  # step 9, [B, H, Q, kk]
    a = (top * d**-0.5).softmax(-1)  # step 10
    u = torch.zeros(b, heads, nq, d, dtype=x.dtype)
    for bi in range(b):  # step 11: gather the raw value chunk of each selected key
        for h in range(heads):
            for i in range(nq):
                u[bi, h, i] = (a[bi, h, i, :, None] * v[bi, idx[bi, h, i], h]).sum(0)
    u = u.permute(0, 2, 1, 3).reshape(b, nq, c)  # step 12
    inter = linear(u * qp.permute(1, 0, 2), p, ca + "proj")  # step 13
    inter = inter / inter.norm(dim=1, keepdim=True).clamp_min(1e-12)  # step 14: over the query axis
    out = linear(p[ca + "alpha"] * inter + u, p, ca + "final")  # step 15
    return residual + out.permute(1, 0, 2)  # step 16


def test_spot_decoder_layer_matches_the_released_layer_with_released_names():
    """Spec 03 sections 1.2 and 1.5 with the released tensors vs spotocc's layer after conversion:
    checks cross-attention, norms.0/1/2 order, the packed self-attention and the FFN mapping."""
    torch.manual_seed(0)
    heads, rho, min_k, b, nq, nk, c = 6, 0.08, 10, 2, 7, 300, 192
    p = layer_params("spotocc_nusc_256", layer=4, seed=1)
    x, qpos = torch.randn(nq, b, c, dtype=torch.float64), torch.randn(nq, b, c, dtype=torch.float64)
    mem, kpos = torch.randn(nk, b, c, dtype=torch.float64), torch.randn(nk, b, c, dtype=torch.float64)

    x1 = ln(released_spot_cross_attention(p, x, mem, qpos, kpos, heads, rho, min_k), p, "norms.0")
    sa = mmcv_mha(x1 + qpos, x1 + qpos, x1, p, "self_attn.attn.", heads)
    x2 = ln(x1 + (x1 + sa), p, "norms.1")  # mmcv MHA adds the identity, the layer adds it again
    ffn = linear(F.relu(linear(x2, p, "ffn.layers.0.0")), p, "ffn.layers.1")
    expected = ln(x2 + ffn, p, "norms.2").transpose(0, 1)  # [B, Q, C]

    layer = SpotDecoderLayer(embed_dims=c, num_heads=heads, ffn_dims=1536, pruning_ratio=rho, min_k=min_k)
    load_layer(layer.double(), p, "spot", layer=4)
    got = layer(x.transpose(0, 1), mem.transpose(0, 1), qpos.transpose(0, 1), kpos.transpose(0, 1))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_kitti_pem_cross_attention_names_load_the_same_module():
    p = {
        k.replace("spot_cross_attn", "pem_cross_attn"): v
        for k, v in layer_params("spotocc_nusc_256", 0, 2).items()
    }
    assert any("pem_cross_attn" in k for k in p)
    layer = SpotDecoderLayer(embed_dims=192, num_heads=6, ffn_dims=1536).double()
    load_layer(layer, p, "spot", layer=0)
    assert torch.equal(layer.cross_attn.alpha, p["pem_cross_attn.alpha"])


def test_baseline_decoder_layer_matches_the_released_layer_with_released_names():
    """Spec 03 section 5.3: attentions.0 = masked cross-attention, attentions.1 = self-attention,
    single residuals, norms after each block."""
    torch.manual_seed(0)
    heads, b, nq, nk, c = 6, 2, 7, 50, 192
    p = layer_params("sparseocc_kitti", layer=2, seed=3)
    x, qpos = torch.randn(nq, b, c, dtype=torch.float64), torch.randn(nq, b, c, dtype=torch.float64)
    mem, kpos = torch.randn(nk, b, c, dtype=torch.float64), torch.randn(nk, b, c, dtype=torch.float64)
    mask = torch.rand(b * heads, nq, nk) < 0.5
    mask[:, :, 0] = False  # no fully blocked row

    x1 = ln(x + mmcv_mha(x + qpos, mem + kpos, mem, p, "attentions.0.attn.", heads, mask), p, "norms.0")
    x2 = ln(x1 + mmcv_mha(x1 + qpos, x1 + qpos, x1, p, "attentions.1.attn.", heads), p, "norms.1")
    ffn = linear(F.relu(linear(x2, p, "ffns.0.layers.0.0")), p, "ffns.0.layers.1")
    expected = ln(x2 + ffn, p, "norms.2").transpose(0, 1)

    layer = MaskedAttentionDecoderLayer(embed_dims=c, num_heads=heads, ffn_dims=1536)
    load_layer(layer.double(), p, "sparseocc", layer=2)
    got = layer(
        x.transpose(0, 1),
        mem.transpose(0, 1),
        qpos.transpose(0, 1),
        kpos.transpose(0, 1),
        cross_attn_mask=mask,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# sparse convs of the released encoder and neck, with their released geometry (spec 02): spconv class,
# kernel, stride, padding, bias
SPARSE_CONVS = {
    "img_bev_encoder_backbone.aggreBlock4.pool.weight": ("SubMConv3d", 1, 1, 0, False),  # 1x1, 1024 -> 1024
    "img_bev_encoder_backbone.resBlock0.net.0.weight": ("SubMConv3d", 3, 1, 1, False),
    "img_bev_encoder_backbone.complBlock1.layers2.0.conv.0.weight": (
        "SparseConv3d",
        (3, 1, 3),
        1,
        (1, 0, 1),
        False,
    ),
    "img_bev_encoder_backbone.aggreBlock3.conv1.0.weight": ("SubMConv3d", (5, 5, 1), 1, (2, 2, 0), True),
    "img_bev_encoder_backbone.aggreBlock1.pool.weight": ("SparseConv3d", 3, 2, 1, False),
    "img_bev_encoder_neck.input_convs.0.0.weight": ("SubMConv3d", 1, 1, 0, False),  # 1x1, 1024 -> 192
    "img_bev_encoder_neck.lateral_convs.0.0.weight": ("SubMConv3d", 1, 1, 0, True),  # 1x1, 128 -> 192
    "img_bev_encoder_neck.up_sample.0.0.weight": ("SparseConvTranspose3d", (2, 2, 3), 2, (0, 0, 1), False),
}


@pytest.fixture(scope="module")
def voxel_modules():
    cfg = get_config("spotocc_nusc_256", ["model.sparse_backend='reference'"])
    return {
        "voxel_encoder": SparseLatentDiffuser.from_config(cfg.model),
        "voxel_neck": SparseFeaturePyramid.from_config(cfg.model),
    }


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside spconv's dense()
@pytest.mark.parametrize("released", list(SPARSE_CONVS))
def test_sparse_conv_weight_means_in_the_reference_backend_what_it_meant_in_spconv(released, voxel_modules):
    """A released [out, kx, ky, kz, in] weight (1x1 ones not transposed) in spotocc's reference backend
    gives spconv's output with the original weight (spconv CPU, one thread, float64)."""
    spconv = load_spconv()
    assert spconv is not None, "the dev extra installs spconv's CPU wheel"
    kind, kernel, stride, padding, has_bias = SPARSE_CONVS[released]
    shape = rl.released_parameters("spotocc_nusc_256")[released]
    c_out, c_in = shape[0], shape[-1]
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(c_in)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) if has_bias else None

    target = released_key_to_spotocc(released, head_type="spot")
    top, module_path = target.removesuffix(".weight").split(".", 1)
    ours = voxel_modules[top].get_submodule(module_path).double()
    ours.load_state_dict({"weight": weight} | ({"bias": bias} if has_bias else {}), strict=True)

    spatial, batch, n = (6, 7, 5), 2, 40
    cells = torch.randperm(batch * math.prod(spatial), generator=gen)[:n]
    idx = torch.stack(torch.unravel_index(cells, (batch, *spatial)), dim=1).int()  # [N, 4] (b, x, y, z)
    feats = torch.randn(n, c_in, generator=gen, dtype=torch.float64)
    got = ours(SparseTensor(feats, idx, spatial, batch)).dense()

    cls = getattr(spconv, kind)
    kwargs = dict(bias=has_bias) | ({"indice_key": "k"} if kind == "SubMConv3d" else {})
    theirs = cls(c_in, c_out, kernel, stride=stride, padding=padding, **kwargs).double()
    with torch.no_grad():
        theirs.weight.copy_(weight)  # the released tensor as spconv holds it
        if has_bias:
            theirs.bias.copy_(bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spconv's CPU kernels are only exact single-threaded
    try:
        expected = theirs(spconv.SparseConvTensor(feats, idx, list(spatial), batch)).dense()
    finally:
        torch.set_num_threads(threads)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
