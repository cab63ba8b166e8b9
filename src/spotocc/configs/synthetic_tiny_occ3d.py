"""Preset `synthetic_tiny_occ3d`: a small SPOT-Occ on the Occ3D layout that trains on a CPU.

``synthetic_tiny``'s widths (ResNet-18, 32 LSS channels, 48-wide head with 3 decoder layers, image
features at stride 8, 1 m depth bins, mean pooling, depth from occupancy) on the nuScenes rig and
Occ3D's range: six cameras at 96x192, a 100x100x8 output grid (0.8 m, half Occ3D's resolution) and
a 50x50x4 LSS grid (1.6 m). Its encoder levels are 50 -> 25 -> 13 -> 7 in x and y and 4 -> 2 -> 1 -> 1
in z, hence the neck's two transposed convs (3,3,3)/(1,1,1) and (3,3,2)/(1,1,0). Data: generated
scenes (``spotocc synth --preset synthetic_tiny_occ3d``), Occ3D ids remapped (free = 0), trained on
camera-visible voxels only (``data.gt_mask=camera``). Not tuned: a starting point for Occ3D on a CPU.
"""

from spotocc.config import (
    AugmentationConfig,
    Config,
    DataConfig,
    GridConfig,
    HeadConfig,
    ImageBackboneConfig,
    ImageNeckConfig,
    ModelConfig,
    TrainConfig,
    ViewTransformerConfig,
    VoxelEncoderConfig,
    VoxelNeckConfig,
)
from spotocc.data.classes import OCC3D_FREQUENCIES

ROOT = "data/synthetic_tiny_occ3d"


def config() -> Config:
    return Config(
        name="synthetic_tiny_occ3d",
        grid=GridConfig(
            point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(100, 100, 8), lss_downsample=2
        ),
        model=ModelConfig(
            image_backbone=ImageBackboneConfig(
                name="resnet18", out_indices=(2, 3, 4), frozen_stem=False, activation_checkpointing=False
            ),
            image_neck=ImageNeckConfig(
                in_channels=(128, 256, 512), out_channels=(32, 32, 32), upsample_strides=(1, 2, 4)
            ),
            view_transformer=ViewTransformerConfig(
                in_channels=96,
                context_channels=32,
                camera_params=27,
                downsample=8,
                depth_bound=(2.0, 58.0, 1.0),
                pool="mean",
                depth_from_occupancy=True,
                fix_depth_bin_offset=True,
                depth_loss_weight=3.0,
            ),
            voxel_encoder=VoxelEncoderConfig(in_channels=32, num_layers=(1, 1, 1, 1)),
            voxel_neck=VoxelNeckConfig(
                in_channels=(32, 64, 128, 256),
                feat_channels=48,
                out_channels=48,
                num_groups=8,
                up_kernel_size=(3, 3, 3),
                up_padding=(1, 1, 1),
                up_kernel_size_l1=(3, 3, 2),
                up_padding_l1=(1, 1, 0),
            ),
            head=HeadConfig(
                type="spot",
                num_classes=18,
                class_frequencies=OCC3D_FREQUENCIES,
                embed_dims=48,
                num_heads=3,
                num_queries=20,
                num_layers=3,
                ffn_dims=192,
                pruning_ratio=0.1,
                min_k=8,
                num_points=4096,
                coarse_norm_groups=8,  # for head.type=sparseocc
            ),
        ),
        data=DataConfig(
            format="occ3d-nuscenes",
            class_set="occ3d",
            root=f"{ROOT}/occ3d-nuscenes",
            occ_root=f"{ROOT}/occ3d-nuscenes/gts",
            depth_root=f"{ROOT}/occ3d-depth_gt",
            train_info=f"{ROOT}/occ3d-nuscenes/bevdetv2-nuscenes_infos_train.pkl",
            val_info=f"{ROOT}/occ3d-nuscenes/bevdetv2-nuscenes_infos_val.pkl",
            gt_mask="camera",
            input_size=(96, 192),
            bgr_input=False,
            augmentation=AugmentationConfig(bda=False),
            batch_size=2,
            num_workers=0,
        ),
        train=TrainConfig(epochs=9, lr=1e-3, lr_steps=(8,), sync_bn=False, log_interval=10),
    )
