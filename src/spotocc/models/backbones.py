"""Image backbones: timm feature extractors with the released models' quirks, and their weight loading.

:class:`ImageBackbone` wraps ``timm.create_model(name, features_only=True)`` (never any network access):

- ``resnet50`` (nuScenes): C2..C5 = timm feature indices 1..4 (256/512/1024/2048 channels, strides 4..32);
  as mmdet ResNet ``frozen_stages=0`` the stem (conv1 + bn1) is frozen and bn1 stays in eval mode.
- ``tf_efficientnet_b7`` (SemanticKITTI): timm feature indices 1..4 (48/80/224/640 channels, strides 4..32)
  plus index 5 = the final 1x1 conv to 2560 channels + BN + Swish (timm's ``conv_head``/``bn2``, which
  ``features_only`` leaves out), i.e. mmcls ``layers[2..6]``. timm's ``tf_`` variant has the TF "SAME"
  padding, BN eps 1e-3 and Swish of the released model; its drop-path rates are reset to mmcls'
  ``linspace(0, rate, n_blocks)`` (timm's own schedule stops at ``rate * (n - 1) / n``).
- any other timm name generically (e.g. ``resnet18`` in ``synthetic_tiny``).

State-dict names: the timm feature net lives in ``body`` (``body.<timm name>``); the EfficientNet head
keeps timm's top-level names ``conv_head`` / ``bn2``. So a torchvision/timm checkpoint key ``k`` is
``body.k`` here (``conv_head.*``/``bn2.*`` of EfficientNet unchanged).

Activation checkpointing (released ``with_cp=True``) runs each residual block under
``torch.utils.checkpoint`` when its input requires grad, exactly like the released code; the recomputation
in backward runs the block's BatchNorms in train mode a second time, so their running statistics are
updated twice per iteration (effective momentum 0.19 instead of 0.1, spec 01 section 1a). This is
reproduced by default because it changes the statistics a released-style training run ends with;
``fix_checkpoint_bn_double_update=True`` freezes the statistics during the recomputation instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath

from spotocc.config import ImageBackboneConfig

# Top-level modules of the timm feature nets that make up the stem (frozen by ``frozen_stem``).
_STEM_MODULES = (("conv1", "bn1"), ("conv_stem", "bn1"))
# Classifier keys of torchvision/timm ImageNet checkpoints, ignored when loading a backbone.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.")


class ImageBackbone(nn.Module):
    """A timm image backbone returning the feature maps ``out_indices`` as a list.

    Args:
        name: timm model name.
        out_indices: timm feature indices; for EfficientNets the index one past the last stage
            (5) is the final 1x1 head conv (``conv_head`` + ``bn2`` + activation).
        frozen_stem: freeze the stem conv and BN (``requires_grad=False``, BN always in eval mode).
        drop_path_rate: stochastic depth; EfficientNets use mmcls' linear schedule from 0 to this rate.
        activation_checkpointing: checkpoint every residual block whose input requires grad.
        fix_checkpoint_bn_double_update: with checkpointing, update the BN statistics once (fix).
        weights: optional local file with ImageNet weights (torchvision, timm or mmcls layout).
    """

    def __init__(
        self,
        *,
        name: str,
        out_indices: tuple[int, ...],
        frozen_stem: bool = False,
        drop_path_rate: float = 0.0,
        activation_checkpointing: bool = False,
        fix_checkpoint_bn_double_update: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if not out_indices or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(
                f"image_backbone.out_indices must be increasing and non-empty, got {out_indices}"
            )
        self.name = name
        self.out_indices = tuple(out_indices)
        self.frozen_stem = frozen_stem
        if not timm.is_model(name):
            raise ValueError(f"image_backbone.name: unknown timm model {name!r}")
        with torch.device("meta"):  # cheap probe of the feature stages
            num_stages = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        self.has_head = self.out_indices[-1] == num_stages
        if self.out_indices[-1] > num_stages or (self.has_head and not _has_conv_head(name)):
            raise ValueError(
                f"image_backbone.out_indices {out_indices}: {name} has feature indices 0..{num_stages - 1}"
                + (f" and {num_stages} (head conv)" if _has_conv_head(name) else "")
            )
        if self.out_indices[0] < 0:
            raise ValueError(f"image_backbone.out_indices must be non-negative, got {out_indices}")
        body_indices = [i for i in self.out_indices if i < num_stages]
        if self.has_head and num_stages - 1 not in body_indices:
            body_indices.append(num_stages - 1)  # the head conv reads the last stage
        self._return_body = [i in self.out_indices for i in body_indices]
        self.body = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            out_indices=tuple(body_indices),
            drop_path_rate=drop_path_rate,
        )
        channels = [c for c, keep in zip(self.body.feature_info.channels(), self._return_body) if keep]
        strides = [s for s, keep in zip(self.body.feature_info.reduction(), self._return_body) if keep]
        if self.has_head:
            self.conv_head, self.bn2 = _build_conv_head(name)
            channels.append(self.conv_head.out_channels)
            strides.append(self.body.feature_info.reduction()[-1])
        self.out_channels: tuple[int, ...] = tuple(channels)
        self.strides: tuple[int, ...] = tuple(strides)

        if drop_path_rate > 0 and hasattr(self.body, "blocks"):
            _set_linear_drop_path(self.body.blocks, drop_path_rate)
        if frozen_stem:
            for module in self._stem_modules():
                for param in module.parameters():
                    param.requires_grad_(False)
        if activation_checkpointing:
            self._enable_checkpointing(bn_update_once=fix_checkpoint_bn_double_update)
        if weights is not None:
            load_backbone_weights(self, weights)
        self.train(self.training)

    @classmethod
    def from_config(cls, cfg: ImageBackboneConfig, *, load_weights: bool = True) -> ImageBackbone:
        """Build from the config; ``load_weights=False`` ignores ``cfg.weights`` (e.g. before loading a
        full spotocc checkpoint)."""
        return cls(
            name=cfg.name,
            out_indices=cfg.out_indices,
            frozen_stem=cfg.frozen_stem,
            drop_path_rate=cfg.drop_path_rate,
            activation_checkpointing=cfg.activation_checkpointing,
            fix_checkpoint_bn_double_update=cfg.fix_checkpoint_bn_double_update,
            weights=cfg.weights if load_weights else None,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> one [B, out_channels[i], H / strides[i], W / strides[i]] map per out index."""
        feats = self.body(x)
        outs = [f for f, keep in zip(feats, self._return_body) if keep]
        if self.has_head:
            outs.append(self.bn2(self.conv_head(feats[-1])))
        return outs

    def train(self, mode: bool = True) -> ImageBackbone:
        """Train/eval mode; a frozen stem's BatchNorm stays in eval mode (mmdet ``frozen_stages``)."""
        super().train(mode)
        if self.frozen_stem:
            for module in self._stem_modules():
                module.eval()
        return self

    def _stem_modules(self) -> list[nn.Module]:
        for names in _STEM_MODULES:
            if all(hasattr(self.body, n) for n in names):
                return [getattr(self.body, n) for n in names]
        raise ValueError(f"image_backbone.frozen_stem is not supported for timm model {self.name!r}")

    def _enable_checkpointing(self, *, bn_update_once: bool) -> None:
        for parent, key, stage in _residual_stages(self.body, self.name):
            wrapped = CheckpointedSequential(*stage, bn_update_once=bn_update_once)
            if isinstance(parent, nn.Sequential):
                parent[int(key)] = wrapped
            else:
                setattr(parent, key, wrapped)


# --------------------------------------------------------------------------------------------------
# Building helpers


def _has_conv_head(name: str) -> bool:
    """Whether ``name`` is a timm EfficientNet-style model whose 1x1 head conv runs on the last feature map
    (not after global pooling, as in MobileNetV3)."""
    from timm.models.efficientnet import EfficientNet

    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False, num_classes=0)
    return isinstance(full, EfficientNet) and hasattr(full, "conv_head") and hasattr(full, "bn2")


def _build_conv_head(name: str) -> tuple[nn.Module, nn.Module]:
    """timm's final 1x1 conv + norm-act of ``name`` (built on the meta device, then materialised)."""
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False, num_classes=0)
    conv_head, bn2 = full.conv_head, full.bn2
    conv_head.to_empty(device="cpu")
    bn2.to_empty(device="cpu")
    nn.init.kaiming_normal_(conv_head.weight, mode="fan_out", nonlinearity="relu")
    if conv_head.bias is not None:
        nn.init.zeros_(conv_head.bias)
    bn2.reset_parameters()  # weight 1, bias 0, running stats reset
    return conv_head, bn2


def _set_linear_drop_path(stages: nn.Sequential, rate: float) -> None:
    """mmcls schedule: block i of n (global order) drops with rate * i / (n - 1)."""
    blocks = [block for stage in stages for block in stage]
    for i, block in enumerate(blocks):
        if hasattr(block, "drop_path"):
            p = rate * i / max(1, len(blocks) - 1)
            block.drop_path = DropPath(p) if p > 0 else nn.Identity()


def _residual_stages(body: nn.Module, name: str) -> list[tuple[nn.Module, str, nn.Sequential]]:
    """(parent, key, stage) for every stage (a Sequential of residual blocks) of a timm feature net."""
    if hasattr(body, "blocks") and isinstance(body.blocks, nn.Sequential):  # EfficientNet family
        return [(body.blocks, str(i), s) for i, s in enumerate(body.blocks) if isinstance(s, nn.Sequential)]
    stages = [(body, n, m) for n, m in body.named_children() if re.fullmatch(r"layer\d", n)]  # ResNet family
    if not stages:
        raise ValueError(f"image_backbone.activation_checkpointing is not supported for timm model {name!r}")
    return stages


# --------------------------------------------------------------------------------------------------
# Activation checkpointing


class CheckpointedSequential(nn.Sequential):
    """A Sequential that checkpoints each child whose input requires grad (released ``with_cp``).

    ``bn_update_once=False`` reproduces the released behaviour: the recomputation in backward updates the
    BatchNorm running statistics a second time. ``True`` freezes them during the recomputation.
    """

    def __init__(self, *modules: nn.Module, bn_update_once: bool = False) -> None:
        super().__init__(*modules)
        self.bn_update_once = bn_update_once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            if torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint_module(module, x, bn_update_once=self.bn_update_once)
            else:
                x = module(x)
        return x


def checkpoint_module(module: nn.Module, *inputs: torch.Tensor, bn_update_once: bool) -> torch.Tensor:
    """``module(*inputs)`` under non-reentrant activation checkpointing.

    The first call is the forward; any later call is the recomputation in backward, during which the
    module's BatchNorm statistics are frozen when ``bn_update_once`` (the RNG state is restored by
    ``torch.utils.checkpoint`` so dropout/drop-path masks are reproduced either way).
    """
    calls = 0

    def run(*args: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1 and bn_update_once:
            with frozen_bn_statistics(module):
                return module(*args)
        return module(*args)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorms in train mode normalise with batch statistics but leave their running
    statistics (and ``num_batches_tracked``) unchanged."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0  # running <- (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# --------------------------------------------------------------------------------------------------
# Pretrained weights

# A key layout converter: (name, detects(keys), converts(state_dict, backbone) -> timm-layout state_dict).
KeyLayout = tuple[str, Callable[[list[str]], bool], Callable[[dict, ImageBackbone], dict]]


def read_state_dict(path: str | Path, *, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a torch file (unwrapping ``state_dict``/``model`` entries) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader error means the same thing to the user
        raise ValueError(
            f"{what}: cannot read weight file {path} (torch files are read with weights_only=True): {err}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{what}: weight file {path} does not hold a dict of tensors")
    return dict(data)


def load_backbone_weights(backbone: ImageBackbone, path: str | Path) -> None:
    """Load ImageNet weights from a local file in torchvision/timm layout (or mmcls EfficientNet layout).

    Classifier weights are ignored; ``num_batches_tracked`` may be absent. Raises ``ValueError`` listing
    the missing, unexpected and shape-mismatched names when the file does not fit the backbone.
    """
    what = f"image_backbone.weights ({backbone.name})"
    state = read_state_dict(path, what=what)
    for _, detects, convert in KEY_LAYOUTS:
        if detects(list(state)):
            state = convert(state, backbone)
            break
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    mapped = {timm_key_to_module_key(backbone, k): v for k, v in state.items()}
    own = backbone.state_dict()
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what}: {path} does not fit the backbone:"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("shape mismatch", mismatched)
        )
    backbone.load_state_dict(mapped, strict=False)


def timm_key_to_module_key(backbone: ImageBackbone, key: str) -> str:
    """A torchvision/timm checkpoint key -> the key in ``backbone.state_dict()``."""
    if backbone.has_head and key.split(".", 1)[0] in ("conv_head", "bn2"):
        return key
    return "body." + key


def _listing(label: str, names: list[str], limit: int = 20) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"\n  {label} ({len(names)}): {shown}"


# mmcls EfficientNet (the released KITTI backbone): layers.{i}.{j}.{part}.{conv|bn} -> timm names.
_MMCLS_IR_PARTS = {
    "expand_conv.conv": "conv_pw",
    "expand_conv.bn": "bn1",
    "depthwise_conv.conv": "conv_dw",
    "depthwise_conv.bn": "bn2",
    "se.conv1.conv": "se.conv_reduce",
    "se.conv2.conv": "se.conv_expand",
    "linear_conv.conv": "conv_pwl",
    "linear_conv.bn": "bn3",
}
_MMCLS_DS_PARTS = {  # expand ratio 1 blocks (mmcls layers[1], timm DepthwiseSeparableConv)
    "depthwise_conv.conv": "conv_dw",
    "depthwise_conv.bn": "bn1",
    "se.conv1.conv": "se.conv_reduce",
    "se.conv2.conv": "se.conv_expand",
    "linear_conv.conv": "conv_pw",
    "linear_conv.bn": "bn2",
}


def mmcls_efficientnet_key_to_timm(key: str, stage_depths: list[int]) -> str:
    """An mmcls EfficientNet key (``backbone.`` prefix stripped) -> the timm EfficientNet key.

    mmcls groups timm's 7 stages into ``layers[1..5]`` = stages (0), (1), (2), (3, 4), (5, 6); ``layers[0]``
    is the stem and ``layers[6]`` the final 1x1 conv (timm ``conv_head``/``bn2``).
    """
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None:
        raise ValueError(f"not an mmcls EfficientNet key: {key!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if layer == 0:
        return rest.replace("conv.", "conv_stem.", 1) if rest.startswith("conv.") else "bn1." + rest[3:]
    if layer == 6:
        return rest.replace("conv.", "conv_head.", 1) if rest.startswith("conv.") else "bn2." + rest[3:]
    groups = {1: [0], 2: [1], 3: [2], 4: [3, 4], 5: [5, 6]}
    if layer not in groups:
        raise ValueError(f"mmcls EfficientNet key {key!r}: layer index {layer} is out of range")
    block_str, part = rest.split(".", 1)
    block = int(block_str)
    for stage in groups[layer]:
        if block < stage_depths[stage]:
            break
        block -= stage_depths[stage]
    else:
        raise ValueError(f"mmcls EfficientNet key {key!r}: block index beyond layer {layer}")
    parts = _MMCLS_DS_PARTS if layer == 1 else _MMCLS_IR_PARTS
    for src, dst in parts.items():
        if part.startswith(src + "."):
            return f"blocks.{stage}.{block}.{dst}.{part[len(src) + 1 :]}"
    raise ValueError(f"mmcls EfficientNet key {key!r}: unknown block part")


def _detect_mmcls_efficientnet(keys: list[str]) -> bool:
    return any(k in ("layers.0.conv.weight", "backbone.layers.0.conv.weight") for k in keys)


def _convert_mmcls_efficientnet(state: dict, backbone: ImageBackbone) -> dict:
    if not hasattr(backbone.body, "blocks"):
        raise ValueError(f"image_backbone.weights: an mmcls EfficientNet file does not fit {backbone.name!r}")
    if any(k.startswith("backbone.") for k in state):  # released init_cfg prefix='backbone'
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    depths = [len(stage) for stage in backbone.body.blocks]
    return {mmcls_efficientnet_key_to_timm(k, depths): v for k, v in state.items()}


KEY_LAYOUTS: list[KeyLayout] = [
    ("mmcls-efficientnet", _detect_mmcls_efficientnet, _convert_mmcls_efficientnet)
]
