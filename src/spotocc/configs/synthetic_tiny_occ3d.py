"""Preset `synthetic_tiny_occ3d`: a small SPOT-Occ on the Occ3D layout that trains on a CPU.

Built from ``synthetic_tiny`` (its model, switches and schedule: ResNet-18, 32 LSS channels, 48-wide
head with 3 decoder layers, image features at stride 8, 1 m depth bins, mean pooling, depth from
occupancy) on the nuScenes rig and Occ3D's range: six cameras at 96x192, a 100x100x8 output grid
(0.8 m, half Occ3D's resolution) and a 50x50x4 LSS grid (1.6 m). Its encoder levels are 50 -> 25 ->
13 -> 7 in x and y and 4 -> 2 -> 1 -> 1 in z, hence the neck's two transposed convs (3,3,3)/(1,1,1)
and (3,3,2)/(1,1,0). Data: generated scenes (``spotocc synth --preset synthetic_tiny_occ3d``), Occ3D
ids remapped (free = 0), trained on camera-visible voxels only (``data.gt_mask=camera``). Not tuned:
a starting point for Occ3D on a CPU.
"""

from spotocc.config import AugmentationConfig, Config, DataConfig, GridConfig
from spotocc.configs import synthetic_tiny
from spotocc.data.classes import OCC3D_FREQUENCIES

ROOT = "data/synthetic_tiny_occ3d"


def config() -> Config:
    cfg = synthetic_tiny.config()  # the model's widths and switches, and the training schedule
    cfg.name = "synthetic_tiny_occ3d"
    # its README numbers were measured with synthetic_tiny's former schedule: 9 epochs, no depth teacher
    # forcing; kept so (not re-measured with the new one)
    cfg.train.depth_teacher_forcing = 0.0
    cfg.train.epochs, cfg.train.lr_steps = 9, (8,)
    cfg.model.sparse_backend = "auto"  # and the reference sparse backend on the CPU
    cfg.grid = GridConfig(
        point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(100, 100, 8), lss_downsample=2
    )
    model = cfg.model
    model.view_transformer.camera_params = 27  # the nuScenes layout (33: KITTI, with P2 and bda translations)
    neck = model.voxel_neck
    neck.up_kernel_size, neck.up_padding = (3, 3, 3), (1, 1, 1)
    neck.up_kernel_size_l1, neck.up_padding_l1 = (3, 3, 2), (1, 1, 0)
    model.head.num_classes = 18
    model.head.class_frequencies = OCC3D_FREQUENCIES
    cfg.data = DataConfig(
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
    )
    return cfg
