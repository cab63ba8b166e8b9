"""Released SPOT-Occ / SparseOcc weights (mmcv-era names) -> spotocc state dicts, strictly.

The released checkpoints name tensors by the released module paths; every one of them maps to exactly
one spotocc tensor of the same shape (no layout change is needed anywhere):

==========================  =================  =====================================================
released prefix             spotocc prefix     below the prefix
==========================  =================  =====================================================
``img_backbone``            ``image_backbone`` ResNet (torchvision names): ``body.<same>``; EfficientNet
                                               (mmcls names): :func:`mmcls_efficientnet_key_to_timm`,
                                               ``layers.6`` -> ``conv_head`` / ``bn2``
``img_neck``                ``image_neck``     unchanged
``img_view_transformer``    ``view_transformer`` unchanged; ``dx``/``bx``/``nx``/``frustum`` (released
                                               Parameters, buffers here) must equal spotocc's own
``img_bev_encoder_backbone`` ``voxel_encoder`` block names by ``RELEASED_NAME_MAP``, rest unchanged
                                               (sparse conv weights ``[out, kx, ky, kz, in]`` in both;
                                               1x1 weights are *not* transposed, spec 02 section 5.3)
``img_bev_encoder_neck``    ``voxel_neck``     unchanged
``pts_bbox_head``           ``head``           explicit rules per head type (``HEAD_RULES``)
==========================  =================  =====================================================

:func:`convert_released_state_dict` applies the rules and refuses, listing the names, anything that is
not a one-to-one, same-shape match: released tensors without a rule or without a spotocc target, two
released tensors for one target, spotocc tensors nothing fills, shape mismatches, and geometry buffers
that differ from the ones spotocc computes from the config (e.g. a frustum for another input size).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from spotocc.config import Config
from spotocc.errors import SpotoccError
from spotocc.models.backbones import ImageBackbone, mmcls_efficientnet_key_to_timm, timm_key_to_module_key
from spotocc.models.heads.sparseocc import SparseOccHead
from spotocc.models.heads.spot import SpotOccHead
from spotocc.models.sparse.encoder import RELEASED_NAME_MAP
from spotocc.models.view_transform import ViewTransformer

__all__ = [
    "GEOMETRY_BUFFERS",
    "HEAD_RULES",
    "RELEASED_MODULES",
    "ReleasedCheckpointError",
    "ReleasedConversion",
    "convert_released_state_dict",
    "guess_released_preset",
    "released_key_to_spotocc",
    "spotocc_geometry",
]

# released top-level module -> spotocc attribute of OccupancyModel
RELEASED_MODULES: dict[str, str] = {
    "img_backbone": "image_backbone",
    "img_neck": "image_neck",
    "img_view_transformer": "view_transformer",
    "img_bev_encoder_backbone": "voxel_encoder",
    "img_bev_encoder_neck": "voxel_neck",
    "pts_bbox_head": "head",
}

# view-transformer tensors that the release saved as (frozen) Parameters and spotocc derives from the
# config; they are mapped like every other tensor and must equal spotocc's own values.
GEOMETRY_BUFFERS = ("dx", "bx", "nx", "frustum")
# float32 ulps of the largest frustum coordinate (a pixel position ~1279) are ~1e-4; a real mismatch
# (another input size, depth range or grid) is off by whole pixels, metres or bins.
_GEOMETRY_RTOL = 1e-6
_GEOMETRY_ATOL = 1e-6

_LAYER = r"transformer_decoder\.layers\.(\d+)\."
_PARAM = r"(weight|bias)"
_NORMS = [
    (_LAYER + r"norms\.0\." + _PARAM, r"layers.\1.cross_attn_norm.\2"),
    (_LAYER + r"norms\.1\." + _PARAM, r"layers.\1.self_attn_norm.\2"),
    (_LAYER + r"norms\.2\." + _PARAM, r"layers.\1.ffn_norm.\2"),
]
_SHARED_HEAD = [
    (r"transformer_decoder\.post_norm\." + _PARAM, r"post_norm.\1"),
    (r"query_feat\.weight", "query_content.weight"),
    (r"query_embed\.weight", "query_pos.weight"),
    (r"level_embed\.weight", "level_embed.weight"),
    (r"cls_embed\." + _PARAM, r"class_embed.\1"),
    (r"mask_embed\.([024])\." + _PARAM, r"mask_embed.\1.\2"),
]
_MHA = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"

# head type -> (released name below ``pts_bbox_head.``, spotocc name below ``head.``) rules, full match
HEAD_RULES: dict[str, list[tuple[str, str]]] = {
    "spot": [
        # nuScenes layers call the SPOT cross-attention ``spot_cross_attn``, KITTI layers ``pem_cross_attn``
        (
            _LAYER + r"(?:spot|pem)_cross_attn\.(alpha|(?:query_proj|key_proj)\.[01]\.(?:weight|bias)|"
            r"(?:proj|final)\.(?:weight|bias))",
            r"layers.\1.cross_attn.\2",
        ),
        (_LAYER + r"self_attn\.attn\." + _MHA, r"layers.\1.self_attn.\2"),
        (_LAYER + r"ffn\.layers\.0\.0\." + _PARAM, r"layers.\1.ffn.fc1.\2"),
        (_LAYER + r"ffn\.layers\.1\." + _PARAM, r"layers.\1.ffn.fc2.\2"),
        *_NORMS,
        *_SHARED_HEAD,
        (r"label_enc\.weight", "dn_label_embed.weight"),
    ],
    "sparseocc": [
        # mmcv BaseTransformerLayer, operation order (cross_attn, norm, self_attn, norm, ffn, norm)
        (_LAYER + r"attentions\.0\.attn\." + _MHA, r"layers.\1.cross_attn.\2"),
        (_LAYER + r"attentions\.1\.attn\." + _MHA, r"layers.\1.self_attn.\2"),
        (_LAYER + r"ffns\.0\.layers\.0\.0\." + _PARAM, r"layers.\1.ffn.fc1.\2"),
        (_LAYER + r"ffns\.0\.layers\.1\." + _PARAM, r"layers.\1.ffn.fc2.\2"),
        *_NORMS,
        *_SHARED_HEAD,
        (r"empty_token\.weight", "empty_token.weight"),
        (r"occ_pred_conv\.([013])\." + _PARAM, r"occ_pred_conv.\1.\2"),
    ],
}
_HEAD_TYPES: dict[type[nn.Module], str] = {SpotOccHead: "spot", SparseOccHead: "sparseocc"}


class ReleasedCheckpointError(SpotoccError, ValueError):
    """Released weights that do not fit the spotocc model one to one (the message lists the names)."""


@dataclass
class ReleasedConversion:
    """Result of :func:`convert_released_state_dict`.

    Attributes:
        state: spotocc name -> tensor (every parameter and persistent buffer of the model).
        names: released name -> spotocc name, for every released tensor.
        geometry_max_diff: geometry buffer -> max |released - spotocc's own| (all within tolerance).
        cast: released names whose floating dtype was converted to the model's (e.g. fp16 -> fp32).
    """

    state: dict[str, torch.Tensor]
    names: dict[str, str]
    geometry_max_diff: dict[str, float] = field(default_factory=dict)
    cast: list[str] = field(default_factory=list)


class _Unmapped(Exception):
    """A released name that no rule maps (the message says why)."""


# --------------------------------------------------------------------------------------------------
# names


def released_key_to_spotocc(key: str, *, head_type: str, backbone: ImageBackbone | None = None) -> str:
    """The spotocc state-dict name of a released tensor name (``module.`` prefix already stripped).

    ``head_type``: ``"spot"`` or ``"sparseocc"``. ``backbone`` (built on any device, ``meta`` is fine)
    tells the ResNet/EfficientNet naming apart; needed only for ``img_backbone.*`` names.
    Raises :class:`ReleasedCheckpointError` for a name no rule covers; whether the result exists in the
    model is checked by :func:`convert_released_state_dict`.
    """
    try:
        return _map_key(key, head_type=head_type, backbone=backbone)
    except _Unmapped as err:
        raise ReleasedCheckpointError(f"released tensor {key!r}: {err}") from None


def _map_key(key: str, *, head_type: str, backbone: ImageBackbone | None) -> str:
    top, _, rest = key.partition(".")
    if top not in RELEASED_MODULES or not rest:
        raise _Unmapped(f"not below a released top-level module ({', '.join(RELEASED_MODULES)})")
    target = RELEASED_MODULES[top]
    if top == "img_backbone":
        if backbone is None:
            raise _Unmapped("mapping image-backbone names needs the model's backbone")
        return f"{target}.{_backbone_key(rest, backbone)}"
    if top == "img_bev_encoder_backbone":
        block, _, below = rest.partition(".")
        if block not in RELEASED_NAME_MAP or not below:
            raise _Unmapped(f"unknown sparse-encoder block {block!r} (known: {', '.join(RELEASED_NAME_MAP)})")
        return f"{target}.{RELEASED_NAME_MAP[block]}.{below}"
    if top == "pts_bbox_head":
        if head_type not in HEAD_RULES:
            raise _Unmapped(f"head type {head_type!r} has no released names")
        for pattern, replacement in HEAD_RULES[head_type]:
            if re.fullmatch(pattern, rest):
                return f"{target}.{re.sub(pattern, replacement, rest)}"
        raise _Unmapped(f"no rule maps it to the {head_type!r} head")
    return f"{target}.{rest}"  # img_neck, img_view_transformer, img_bev_encoder_neck: same names


def _backbone_key(rest: str, backbone: ImageBackbone) -> str:
    if re.match(r"layers\.\d+\.", rest):  # mmcls EfficientNet
        blocks = getattr(backbone.body, "blocks", None)
        if blocks is None:
            raise _Unmapped(f"an mmcls EfficientNet name, but the preset's backbone is {backbone.name}")
        try:
            timm_key = mmcls_efficientnet_key_to_timm(rest, [len(stage) for stage in blocks])
        except ValueError as err:
            raise _Unmapped(str(err)) from None
        return timm_key_to_module_key(backbone, timm_key)
    return timm_key_to_module_key(backbone, rest)  # mmdet ResNet names are torchvision's = timm's


def guess_released_preset(names: list[str]) -> str | None:
    """The spotocc preset a released state dict looks like (by backbone and head names), or None."""
    names = [n.removeprefix("module.") for n in names]
    kitti = any(n.startswith("img_backbone.layers.") for n in names)
    nusc = any(n.startswith("img_backbone.layer1.") for n in names)
    spot = any(re.search(r"\.(spot|pem)_cross_attn\.", n) for n in names)
    baseline = any(".attentions.0.attn." in n for n in names)
    if kitti == nusc or spot == baseline:
        return None
    return f"{'spotocc' if spot else 'sparseocc'}_{'kitti' if kitti else 'nusc_256'}"


# --------------------------------------------------------------------------------------------------
# geometry


def spotocc_geometry(cfg: Config) -> dict[str, torch.Tensor]:
    """The view transformer's ``dx``, ``bx``, ``nx`` and ``frustum`` for ``cfg``, computed by spotocc's
    own :class:`ViewTransformer` (built narrow: the geometry does not depend on the channel widths)."""
    vt_cfg = dataclasses.replace(
        cfg.model.view_transformer,
        in_channels=8,
        context_channels=8,
        deform_groups_conv=1,
        aspp_mid_channels=8,
    )
    with torch.device("cpu"):
        vt = ViewTransformer.from_config(vt_cfg, cfg.grid, cfg.data.input_size)
    return {name: getattr(vt, name).clone() for name in GEOMETRY_BUFFERS}


def _check_geometry(
    released: Mapping[str, torch.Tensor], geometry: Mapping[str, torch.Tensor], names: dict[str, str]
) -> tuple[dict[str, float], list[str]]:
    """(max |diff| per geometry buffer, problems) of the released geometry against spotocc's own."""
    max_diff: dict[str, float] = {}
    problems: list[str] = []
    for source, target in names.items():
        buffer = _geometry_buffer(target)
        if buffer is None or not isinstance(released[source], torch.Tensor):
            continue  # not geometry, or already reported as not a tensor
        theirs, ours = released[source].float(), geometry[buffer].float()
        if theirs.shape != ours.shape:
            hint = ""
            if buffer == "frustum" and theirs.dim() == 4 and ours.dim() == 4:
                hint = (
                    f": built for {theirs.shape[0]} depth bins on a {theirs.shape[1]}x{theirs.shape[2]} "
                    f"feature map, the config gives {ours.shape[0]} bins on {ours.shape[1]}x{ours.shape[2]}; "
                    "set data.input_size, view_transformer.downsample and view_transformer.depth_bound to "
                    "the values the weights were trained with"
                )
            problems.append(f"{source}: shape {list(theirs.shape)} vs spotocc's {list(ours.shape)}{hint}")
            continue
        diff = float((theirs - ours).abs().max()) if theirs.numel() else 0.0
        max_diff[buffer] = diff
        if not torch.allclose(theirs, ours, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL):
            shown = f"released {theirs.flatten()[:6].tolist()} vs spotocc {ours.flatten()[:6].tolist()}"
            problems.append(
                f"{source}: values differ from spotocc's own (max |diff| {diff:.6g}; {shown}); the config's "
                "grid (grid.point_cloud_range, occ_size, lss_downsample), input size or depth range differs"
            )
    return max_diff, problems


def _geometry_buffer(target: str) -> str | None:
    buffer = target.removeprefix("view_transformer.")
    return buffer if target.startswith("view_transformer.") and buffer in GEOMETRY_BUFFERS else None


# --------------------------------------------------------------------------------------------------
# conversion


def convert_released_state_dict(
    released: Mapping[str, torch.Tensor],
    model: nn.Module,
    geometry: Mapping[str, torch.Tensor] | None = None,
    *,
    config_name: str | None = None,
) -> ReleasedConversion:
    """Map a released state dict onto ``model`` (an :class:`OccupancyModel`, on any device incl. meta).

    ``geometry``: spotocc's own ``dx``/``bx``/``nx``/``frustum`` to check the released ones against
    (:func:`spotocc_geometry`); default: the model's buffers (then the model must not be on ``meta``).
    A ``module.`` prefix (DDP) on every name is stripped. Floating tensors are cast to the model's dtype.
    ``config_name`` (the preset) only improves the error message. Raises :class:`ReleasedCheckpointError`
    listing every name that does not map one to one.
    """
    names = list(released)
    if names and all(n.startswith("module.") for n in names):
        released = {n.removeprefix("module."): t for n, t in released.items()}
    head_type = _head_type(model)
    backbone = model.image_backbone
    own = model.state_dict()
    if geometry is None:
        geometry = {b: getattr(model.view_transformer, b) for b in GEOMETRY_BUFFERS}
        if any(t.is_meta for t in geometry.values()):
            raise ValueError(
                "convert_released_state_dict: a meta-device model needs geometry=spotocc_geometry(cfg)"
            )

    mapping: dict[str, str] = {}
    sources: dict[str, list[str]] = {}
    unmapped: list[str] = []
    no_target: list[str] = []
    for name in released:
        try:
            target = _map_key(name, head_type=head_type, backbone=backbone)
        except _Unmapped as err:
            unmapped.append(f"{name} ({err})")
            continue
        if target not in own:
            no_target.append(f"{name} -> {target}")
            continue
        mapping[name] = target
        sources.setdefault(target, []).append(name)
    duplicates = [f"{t} <- {', '.join(s)}" for t, s in sources.items() if len(s) > 1]
    missing = [t for t in own if t not in sources]
    mismatched, bad_dtype = [], []
    for name, target in mapping.items():
        theirs, ours = released[name], own[target]
        if not isinstance(theirs, torch.Tensor):
            bad_dtype.append(f"{name}: a {type(theirs).__name__}, not a tensor")
        elif _geometry_buffer(target) is not None:
            continue  # compared with spotocc's own values below
        elif theirs.shape != ours.shape:
            mismatched.append(f"{name} {list(theirs.shape)} -> {target} {list(ours.shape)}")
        elif theirs.dtype != ours.dtype and not (theirs.is_floating_point() and ours.is_floating_point()):
            bad_dtype.append(f"{name}: {theirs.dtype}, spotocc {target} is {ours.dtype}")
    max_diff, geometry_problems = _check_geometry(released, geometry, mapping)
    if unmapped or no_target or duplicates or missing or mismatched or bad_dtype or geometry_problems:
        guess = guess_released_preset(list(released))
        model_name = repr(config_name) if config_name else f"{head_type!r}"
        raise ReleasedCheckpointError(
            f"the released weights do not fit the {model_name} model one to one"
            + (f" (they look like preset {guess!r})" if guess and guess != config_name else "")
            + ":"
            + _listing("released tensors no rule maps", unmapped)
            + _listing("released tensors without a spotocc tensor of that name", no_target)
            + _listing("spotocc tensors filled twice", duplicates)
            + _listing("spotocc tensors the released weights do not fill", missing)
            + _listing("shape mismatches (released -> spotocc)", mismatched)
            + _listing("dtype mismatches", bad_dtype)
            + _listing("view-transformer geometry that differs from spotocc's own", geometry_problems)
        )

    state: dict[str, torch.Tensor] = {}
    cast: list[str] = []
    for name, target in mapping.items():
        tensor = released[name]
        if tensor.dtype != own[target].dtype:
            tensor = tensor.to(own[target].dtype)
            cast.append(name)
        state[target] = tensor
    return ReleasedConversion(state=state, names=mapping, geometry_max_diff=max_diff, cast=cast)


def _head_type(model: nn.Module) -> str:
    head = getattr(model, "head", None)
    for cls, name in _HEAD_TYPES.items():
        if isinstance(head, cls):
            return name
    raise ValueError(
        f"released weights exist only for the SPOT and SparseOcc heads, not {type(head).__name__}"
    )


def _listing(label: str, names: list[str], limit: int = 50) -> str:
    if not names:
        return ""
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {label} ({len(names)}):\n    {shown}{more}"
