"""Preset `synthetic_tiny`: a small SPOT-Occ that trains on synthetic scenes on a CPU in minutes.

Same architecture as the paper presets with every width and size scaled down: one front camera at
192x640 (KITTI's aspect ratio), image features at stride 8, a 64x64x16 output grid (LSS grid 32x32x8,
0.8 m cells), ResNet-18, 32 LSS channels, 48-wide head with 3 decoder layers. Data: synthetic scenes
in the SemanticKITTI layout (``spotocc synth``), SemanticKITTI class ids. Tuned for ``spotocc
quickstart`` (a from-scratch backbone, 64 scenes, at most 10 minutes on 2 CPU cores).

Evidence (``spotocc diagnose coverage|memorise|depth``, 8 generated training scenes unless said):

- Rays. At 96x320 and stride 16 (6x20 rays) the lift reached the LSS cell of 14% of the car voxels
  and 11% of the building voxels; at 192x640 and stride 8 (24x80 rays), 77% and 65% (``spotocc_kitti``
  at 370x1226: 85% and 41%). Every class is at 60% or more.
- Depth bins of 1 m (56 bins) instead of 0.5 m: a 0.8 m cell holds about one bin, and the depth net is
  half the size; memorisation was no worse.
- ``view_transformer.pool="mean"``: with ground-truth depth in the lift, memorisation mIoU 32.8
  against 23.8 for the released sum (far cells crossed by one ray were ~100x weaker than near ones).
- ``view_transformer.depth_from_occupancy``: the top third of the image, where facades and tree crowns
  are, lies above the LiDAR's top beam and had no depth target at all.
- ``depth_loss_weight=3.0`` (BEVDepth's factor) with ``fix_depth_bin_offset``: buildings are placed
  within 1 m in 72% of their cells against 58% at weight 1, and memorisation (240 steps) reached
  building 7.3, vegetation 24.2 and car 15.9 IoU against 0.0, 20.3 and 6.3. Buildings are learned only
  once their depth is found: ``spotocc diagnose depth`` on a quickstart run shows it is not yet.
- Held-out quickstart (64 scenes, 12 epochs): SC IoU 41.0 / mIoU 6.51 / car 5.4 with all of the
  above, against 39.2 / 5.48 / 0.3 for the former 96x320 stride-16 preset; the same switches at
  96x320 gave 39.7 / 5.58 / 0.0. Buildings and vegetation stay at 0 in that budget.
- ``train.depth_teacher_forcing=1.0`` (the lift takes the depth targets at the first step, a share
  decaying linearly to 0 by the last): in the quickstart's budget the 3D stages learn the scene only
  once the lift puts features where they belong. Trained with the targets in the lift throughout and
  scored with them, the quickstart model reaches car 24.6, truck 30.4, building 17.5 and vegetation
  9.3 held-out IoU; the model without teacher forcing, scored with its own depth, car 2.5 and truck 0.
  With the decaying share, held-out car / truck / mIoU went from 2.5 / 0.0 / 5.69 to 11.1 / 16.2 /
  7.53 (scenes of seed 0) and from 2.5 / 0.5 / 4.52 to 10.7 / 9.1 / 5.55 (seed 1). Ending the share
  at half the run gave 12.1 / 21.6 / 7.36 and 5.7 / 8.5 / 5.33. Buildings stay near 0: their
  predicted depth (within 1 m in ~22% of the cells) is what is still missing.
- 12 epochs instead of 9 (``lr_steps=(11,)``), with teacher forcing: held-out mIoU 8.50 against 7.53
  (seed 0; building 5.6 and vegetation 4.7 against 1.9 and 0.4) and 6.26 against 5.55 (seed 1), and
  SC IoU 36.7 / 33.2 against 38.1 / 31.9. Without teacher forcing, 12 epochs had given nothing over 9.
  Ending the share at half of the 12 epochs kept SC IoU (41.5 / 32.5) and mIoU (8.03 / 6.64) but lost
  the buildings (0.5 / 0.0), so it ends with the run.
- Speed on the CPU: ``sparse_backend="dense"`` (after the encoder's completion layers its first level
  is more than 99% active; encoder + neck 2.0x faster forward + backward, a training step 1.16x) and
  the depth net's DCN by bilinear sampling (torchvision's CPU backward had been a quarter of a step).
  A quickstart epoch went from 35 s to 23 s (idle 2-core machine).
- 18 epochs (``lr_steps=(17,)``) in the time the 12 took before: held-out SC IoU / mIoU / car /
  building 39.4 / 8.58 / 13.5 / 7.7 against 35.8 / 8.98 / 13.8 / 7.4 for 12 epochs (seed 0; inside the
  run-to-run spread); on the scenes of seed 1, SC IoU / mIoU 32.1 / 8.13 against 33.2 / 6.26 for 12
  epochs (prior 19.2 / 3.11); 27 epochs had given mIoU 10.15 and building 11.7. Tried at 18 epochs without
  a clear gain: ``depth_loss_weight=10`` (38.1 / 8.59 / 11.9 / 10.4); batch 1 at 12 epochs (37.7 /
  8.77 / 12.4 / 9.6), with ``depth_loss_weight=10`` (36.5 / 8.27 / 12.9 / 7.7).
- Tried at 18 epochs without a gain that held on both seeds (SC IoU / mIoU / car / building, seed 0
  then seed 1): ``view_transformer.semantic_loss_weight=1.0`` 36.9 / 10.16 / 12.4 / 11.0 and 32.4 /
  8.16 / 10.1 / 2.7 (weight 3: 38.5 / 9.93 / 13.4 / 10.5 and 32.6 / 8.18 / 9.8 / 4.2), against 39.4 /
  8.58 / 13.5 / 7.7 and 32.1 / 8.13 / 9.5 / 3.9; it predicts more building, much of it in front of
  the facades. ``train.lr=2e-3``: 37.6 / 8.61 / 11.7 / 4.3. No image rotation (``rot_lim=(0, 0)``,
  with the semantic loss): 39.8 / 9.45 / 11.9 / 8.6. Faster steps that learned less per step:
  ``train.amp=bf16`` (a step 0.88x on an AVX512-BF16 CPU, ``benchmarks/bench_train_step.py``) with
  ``head.num_points=2048`` (0.87x; the released KITTI preset samples 2.4% of its GT voxels, this one
  6.3%), together 0.76x, at 27 epochs in about the time of 20: 33.8 / 8.57 / 13.3 / 6.1 against
  38.3 / 10.15 / 13.1 / 11.7 for 27 fp32 epochs (seed 0).
- What still limits it (``spotocc diagnose depth``, the bias table): the depth net places what is
  within 12 m right (74% of the cells within 1 m, bias 0), but pulls farther surfaces near: bias -3 m
  at 12-22 m, -9 m at 22-32 m, -15 m at 32-42 m on held-out scenes, -7 to -8 m at 22-42 m on the
  training scenes, similar after 12 or 27 epochs and after 400 depth-only steps: more training does
  not fix it. A facade at 25 m lands in the street: 22% of the voxels the model calls building are
  building.
- ``view_transformer.depth_distance_weighting=12`` (a cell's depth loss weighs its target depth over
  12 m, in [1, 4]) cuts that bias (held-out, seed 0 / seed 1: -2.5 / -7.4 m at 32-42 m
  against -14.7 / -14.1; building cells within 1 m 32% / 19% against 26% / 14%), and held-out
  building, truck and mIoU rose on both seeds (9.1 / 17.8 / 9.22 against 7.7 / 14.4 / 8.58; 6.9 /
  10.0 / 8.30 against 3.9 / 7.2 / 8.13), but SC IoU fell (36.6 against 39.4; 31.4 against 32.1):
  the model now calls more voxels building, and more of them wrongly. With
  ``train.depth_teacher_forcing_end=0.5`` as well: SC IoU 41.7 / 33.9, mIoU 9.91 / 7.82, building
  11.7 / 0.0, vegetation 0 on both seeds. Left off until that is understood.

Kept from the earlier tuning: 32 LSS channels (16 gave held-out mIoU 4.7, 64 no better than 32) and
no BEV flips (eight orientations of the world to learn from 64 scenes).
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
from spotocc.data.classes import SEMANTIC_KITTI_FREQUENCIES


def config() -> Config:
    return Config(
        name="synthetic_tiny",
        grid=GridConfig(
            point_cloud_range=(0.0, -25.6, -2.0, 51.2, 25.6, 4.4), occ_size=(64, 64, 16), lss_downsample=2
        ),
        model=ModelConfig(
            sparse_backend="dense",  # its encoder levels are >99% active: dense conv3d is faster
            image_backbone=ImageBackboneConfig(
                name="resnet18", out_indices=(2, 3, 4), frozen_stem=False, activation_checkpointing=False
            ),
            image_neck=ImageNeckConfig(
                in_channels=(128, 256, 512), out_channels=(32, 32, 32), upsample_strides=(1, 2, 4)
            ),
            view_transformer=ViewTransformerConfig(
                in_channels=96,
                context_channels=32,
                camera_params=33,
                downsample=8,
                depth_bound=(2.0, 58.0, 1.0),
                pool="mean",
                depth_from_occupancy=True,
                fix_depth_bin_offset=True,
                depth_loss_weight=3.0,
            ),
            voxel_encoder=VoxelEncoderConfig(in_channels=32, num_layers=(1, 1, 1, 1)),
            voxel_neck=VoxelNeckConfig(
                in_channels=(32, 64, 128, 256), feat_channels=48, out_channels=48, num_groups=8
            ),
            head=HeadConfig(
                type="spot",
                num_classes=20,
                class_frequencies=SEMANTIC_KITTI_FREQUENCIES,
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
            format="semantickitti",
            class_set="semantickitti",
            root="data/synthetic_tiny",
            train_split="train",
            val_split="val",
            cameras=("image_2",),
            input_size=(192, 640),
            bgr_input=False,
            augmentation=AugmentationConfig(bda=False),
            batch_size=2,
            num_workers=0,
        ),
        train=TrainConfig(
            epochs=18, lr=1e-3, lr_steps=(17,), sync_bn=False, log_interval=10, depth_teacher_forcing=1.0
        ),
    )
