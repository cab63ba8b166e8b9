"""Typed configuration: nested dataclasses, presets, dotted overrides, JSON round trip.

A preset is one module in :mod:`spotocc.configs` with a function ``config() -> Config``. Every run
saves its resolved config (``Config.to_dict()``) next to its outputs and inside every checkpoint, so
``eval`` and ``predict`` need only the checkpoint.

    >>> cfg = get_config("spotocc_nusc_256", ["head.pruning_ratio=0.1", "train.epochs=2"])
    >>> cfg.model.head.pruning_ratio
    0.1
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import pkgutil
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotocc.errors import ConfigError, MissingConfigError

# --------------------------------------------------------------------------------------------------
# Geometry shared by data and model


@dataclass
class GridConfig:
    """The 3D grid: metric range, ground-truth/output size, and the LSS grid (output size / downsample)."""

    point_cloud_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    occ_size: tuple[int, int, int] = (512, 512, 40)  # GT and prediction grid [X, Y, Z]
    lss_downsample: int = 4  # LSS / voxel-encoder grid = occ_size // lss_downsample

    @property
    def lss_size(self) -> tuple[int, int, int]:
        return tuple(s // self.lss_downsample for s in self.occ_size)  # type: ignore[return-value]

    @property
    def occ_voxel_size(self) -> tuple[float, float, float]:
        r = self.point_cloud_range
        return tuple((r[i + 3] - r[i]) / self.occ_size[i] for i in range(3))  # type: ignore[return-value]

    @property
    def lss_voxel_size(self) -> tuple[float, float, float]:
        return tuple(v * self.lss_downsample for v in self.occ_voxel_size)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Model


@dataclass
class ImageBackboneConfig:
    """A timm image backbone returning the feature maps ``out_indices``."""

    name: str = "resnet50"  # timm model name: resnet50, tf_efficientnet_b7, resnet18, ...
    # timm feature indices (resnet50: 1..4 = C2..C5); for EfficientNets the index one past the last stage
    # (5) is the final 1x1 head conv (timm conv_head + bn2): (1, 2, 3, 4, 5) = mmcls layers[2..6]
    out_indices: tuple[int, ...] = (1, 2, 3, 4)
    frozen_stem: bool = True  # mmdet ResNet frozen_stages=0: stem conv + BN frozen, BN in eval mode
    drop_path_rate: float = 0.0
    weights: str | None = None  # local file with ImageNet weights (torchvision/timm/mmcls); never downloaded
    activation_checkpointing: bool = False  # released with_cp=True: per residual block
    # fix: with checkpointing, BN running stats are updated once, not twice (released: twice, momentum 0.19)
    fix_checkpoint_bn_double_update: bool = False


@dataclass
class ImageNeckConfig:
    """SECONDFPN: per level a (transposed) convolution to ``out_channels[i]``, concatenated."""

    in_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    out_channels: tuple[int, ...] = (128, 128, 128, 128)
    upsample_strides: tuple[float, ...] = (0.25, 0.5, 1, 2)


@dataclass
class ViewTransformerConfig:
    """LSS lifting with the camera-aware depth net (BEVDepth style)."""

    in_channels: int = 512  # image feature channels (SECONDFPN output), also the depth net's width
    context_channels: int = 128  # lifted feature channels
    camera_params: int = 27  # 27 (nuScenes layout) or 33 (KITTI layout, with P2 and bda translations)
    downsample: int = 16  # image feature stride
    depth_bound: tuple[float, float, float] = (2.0, 58.0, 0.5)  # (min, max, step): 112 bins
    depth_loss_weight: float = 1.0
    fix_depth_bin_offset: bool = False  # fix of the released one-bin offset of the depth targets
    deform_groups_conv: int = 4  # groups of the DCN main weight
    aspp_mid_channels: int | None = None  # None: in_channels
    activation_checkpointing: bool = False  # not released: depth-net convs checkpointed (numerically neutral)
    pool_chunk_elements: int = 1 << 23  # lift+pool forms the outer product this many values at a time
    pool: str = "sum"  # "sum" as released; "mean": divide by the frustum points per voxel (not released)
    # not released: cells without a LiDAR point (above the top beam) learn the first labelled voxel's depth
    depth_from_occupancy: bool = False
    # not released: > 0 adds a 1x1 classifier on the context features, trained with this weight to give
    # each feature cell the class of the first labelled voxel along its ray (dense 2D supervision of what
    # is lifted)
    semantic_loss_weight: float = 0.0
    # not released: > 0 weighs each feature cell's depth loss by its target depth over this many metres,
    # at least 1 and at most 4 (far cells are rare and the net pulls them near); 0 = every cell alike
    depth_distance_weighting: float = 0.0


@dataclass
class VoxelEncoderConfig:
    """SparseLatentDiffuser."""

    in_channels: int = 128  # channels of the lifted volume; levels have in_channels * (1, 2, 4, 8)
    num_layers: tuple[int, int, int, int] = (3, 2, 2, 1)
    norm: str = "batch"  # the released model really used (Sync)BatchNorm here, not the config's GN


@dataclass
class VoxelNeckConfig:
    """SparseFeaturePyramid."""

    in_channels: tuple[int, ...] = (128, 256, 512, 1024)
    feat_channels: int = 192
    out_channels: int = 192
    num_groups: int = 32
    up_kernel_size: tuple[int, int, int] = (2, 2, 2)
    up_stride: tuple[int, int, int] = (2, 2, 2)
    up_padding: tuple[int, int, int] = (0, 0, 0)
    # the L2 -> L1 transposed conv's kernel / padding where they must differ from L3 -> L2's (None: the same)
    up_kernel_size_l1: tuple[int, int, int] | None = None
    up_padding_l1: tuple[int, int, int] | None = None


@dataclass
class HeadConfig:
    """Mask-classification head: SPOT-Occ (``type="spot"``) or the SparseOcc baseline (``"sparseocc"``)."""

    type: str = "spot"
    num_classes: int = 17  # including the empty class 0
    class_frequencies: tuple[float, ...] = ()  # voxel counts per class; derive CE and sampling weights
    embed_dims: int = 192
    num_heads: int = 6
    num_queries: int = 100
    num_layers: int = 9
    num_levels: int = 3
    ffn_dims: int = 1536
    # SPOT cross-attention
    pruning_ratio: float = 0.08  # rho
    min_k: int = 10
    # denoising (SPOT only)
    dn_enabled: bool = True
    dn_scalar: int = 1
    dn_noise_scale: float = 0.01
    dn_label_noise_ratio: float = 0.01
    dn_loss_layers: int = 1
    dn_consistent: bool = False  # fix: DN masks and DN losses on the same decoder layers
    # matching and losses
    loss_cls_weight: float = 2.0
    loss_mask_weight: float = 5.0
    loss_dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 50176  # 12544 * 4
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    sample_weight_gamma: float = 0.25
    # deliberate fixes of released quirks (all False = faithful)
    fix_interaction_norm: bool = False  # normalise SPOT-CA's interaction term over channels, not queries
    fix_double_residual: bool = False  # single residual around self-attention
    # inference
    label_method: str = "bounded"  # "bounded" (exact, fast) or "direct" (chunked reference formula)
    # SparseOcc baseline only
    topk_ratio: float = 0.6
    softmax_over_batch_bug: bool = False  # released nuScenes head's softmax over dim 0
    coarse_loss_weight: float = 1.0
    coarse_norm_groups: int = 32  # GroupNorm groups in occ_pred_conv (released: 32)


@dataclass
class ModelConfig:
    image_backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    image_neck: ImageNeckConfig = field(default_factory=ImageNeckConfig)
    view_transformer: ViewTransformerConfig = field(default_factory=ViewTransformerConfig)
    voxel_encoder: VoxelEncoderConfig = field(default_factory=VoxelEncoderConfig)
    voxel_neck: VoxelNeckConfig = field(default_factory=VoxelNeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    sparse_backend: str = "auto"  # "auto", "reference", "spconv" or "dense" (see models/sparse/conv.py)


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class AugmentationConfig:
    """Image-view augmentation (resize/crop/flip/rotate) and BEV flips, as released."""

    resize_lim: tuple[float, float] = (-0.06, 0.11)  # added to input_width / source_width
    rot_lim: tuple[float, float] = (-5.4, 5.4)  # degrees
    flip: bool = True
    crop_h: tuple[float, float] = (0.0, 0.0)
    resize_test: float = 0.0
    bda: bool = False  # BEV flips (KITTI: on, about the range centre; nuScenes: off as released)
    flip_dx_ratio: float = 0.5
    flip_dy_ratio: float = 0.5
    flip_dz_ratio: float = 0.5


@dataclass
class DataConfig:
    format: str = "nuscenes-occupancy"  # "nuscenes-occupancy", "semantickitti" or "occ3d-nuscenes"
    class_set: str = "nuscenes"  # "nuscenes", "semantickitti" or "occ3d"
    root: str = "data/nuscenes"  # dataset root (SemanticKITTI: the folder holding dataset/sequences)
    occ_root: str = "data/nuScenes-Occupancy"  # nuScenes-Occupancy GT files (Occ3D: the gts/ folder)
    depth_root: str = "data/depth_gt"  # nuScenes depth targets (<image name>.bin)
    train_info: str = "data/nuscenes/nuscenes_occ_infos_train.pkl"  # Occ3D: info .pkl or annotations.json
    val_info: str = "data/nuscenes/nuscenes_occ_infos_val.pkl"
    train_split: str = "train"
    val_split: str = "val"
    every_5th_scan: bool = False  # SemanticKITTI: only frames whose id is a multiple of 5
    # Occ3D: voxels outside this visibility mask ("camera", "lidar") are ignored (255) in gt_occ; "none"
    gt_mask: str = "none"
    cameras: tuple[str, ...] = (
        "CAM_FRONT_LEFT",
        "CAM_FRONT",
        "CAM_FRONT_RIGHT",
        "CAM_BACK_LEFT",
        "CAM_BACK",
        "CAM_BACK_RIGHT",
    )
    input_size: tuple[int, int] = (256, 704)  # network input (H, W)
    bgr_input: bool = True  # released nuScenes quirk: network sees B,G,R with R,G,B statistics
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    batch_size: int = 1  # per process
    num_workers: int = 4


# --------------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class TrainConfig:
    epochs: int = 24
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 35.0
    lr_steps: tuple[int, ...] = (20, 23)  # epochs after which lr *= lr_gamma
    lr_gamma: float = 0.1
    amp: str = "none"  # "none", "bf16" or "fp16"
    sync_bn: bool = True  # under torchrun, as released
    eval_interval: int = 1  # epochs
    checkpoint_interval: int = 1  # epochs
    log_interval: int = 50  # iterations
    seed: int = 0
    max_iters: int | None = None  # stop after this many iterations (smoke runs)
    checkpoint_iter_interval: int = (
        0  # also save `last` every N iterations inside an epoch (0: epoch ends only)
    )
    keep_last: int = 2  # checkpoint generations kept besides `best` (the newest one that verifies resumes)
    find_unused_parameters: bool = False  # DDP: set if some parameters get no gradient in an iteration
    tensorboard: bool = True  # TensorBoard event files besides the JSON-lines metrics file
    # not released (0 in every paper preset): teacher forcing of the LSS lift. At the first iteration
    # the lift takes this share of the one-hot depth targets (the rest: the predicted depth), decaying
    # linearly to 0 at the fraction `depth_teacher_forcing_end` of the run's iterations; the depth
    # loss always scores the prediction; batches without gt_depth are not forced. See
    # spotocc.models.view_transform.mix_teacher_depth
    depth_teacher_forcing: float = 0.0
    depth_teacher_forcing_end: float = 1.0


@dataclass
class EvalConfig:
    class0_quirk: bool = False  # released: ignored voxels counted as class-0 true positives
    batch_size: int = 1  # samples per process during evaluation / prediction (released: 1)
    # score only labelled voxels inside some camera's field of view (not an occlusion test); off in
    # every preset, since the papers score every labelled voxel. See spotocc.evaluation.field_of_view
    camera_view_only: bool = False


@dataclass
class Config:
    name: str = "custom"
    grid: GridConfig = field(default_factory=GridConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _from_dict(cls, data, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------------
# Presets and overrides

# Shorthands accepted at the start of an override key, e.g. "head.min_k=32".
_SHORTHANDS = {
    "head": "model.head",
    "image_backbone": "model.image_backbone",
    "image_neck": "model.image_neck",
    "view_transformer": "model.view_transformer",
    "voxel_encoder": "model.voxel_encoder",
    "voxel_neck": "model.voxel_neck",
}


def list_presets() -> list[str]:
    """Names of the shipped presets (modules of :mod:`spotocc.configs`)."""
    import spotocc.configs as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def get_config(name: str, overrides: Sequence[str] = ()) -> Config:
    """A preset by name, or a saved config (``.json``), with dotted ``key=value`` overrides applied."""
    path = Path(name)
    if name.endswith(".json"):
        if not path.is_file():
            raise MissingConfigError(f"config file {name} does not exist")
        try:
            cfg = Config.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ConfigError(f"config file {name} is not a valid spotocc config: {err}") from err
    else:
        presets = list_presets()
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(presets)}")
        cfg = importlib.import_module(f"spotocc.configs.{name}").config()
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``a.b.c=value`` overrides in place (values parsed as Python literals) and return ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        head, _, rest = key.partition(".")
        if head in _SHORTHANDS:
            key = _SHORTHANDS[head] + ("." + rest if rest else "")
        *parents, leaf = key.split(".")
        node: Any = cfg
        for part in parents:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise ConfigError(f"override {item!r}: no config section {part!r}")
            node = getattr(node, part)
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if leaf not in fields:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        hints = typing.get_type_hints(type(node))
        setattr(node, leaf, _coerce(_parse_value(raw), hints[leaf], key))
    return cfg


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a parsed JSON/override value to the annotated type, or raise naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError):
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = (value,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for a, v in zip(args, value, strict=True))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)
