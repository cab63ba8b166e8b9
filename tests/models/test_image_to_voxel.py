"""The whole image -> voxel path (ImageEncoder + ViewTransformer) on the three presets, at small sizes."""

import torch

from spotocc.config import get_config
from spotocc.models.image_neck import ImageEncoder
from spotocc.models.view_transform import ViewTransformer, image_aug_transform


def _cameras(b: int, n: int, input_size: tuple[int, int], kitti: bool) -> tuple[torch.Tensor, ...]:
    """Forward-looking cameras (x right, y down, z forward -> LiDAR x forward, y left, z up)."""
    h, w = input_size
    cam_to_lidar = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    rots = cam_to_lidar.expand(b, n, 3, 3).clone()
    trans = torch.tensor([0.3, 0.0, 1.2]).expand(b, n, 3).clone()
    intrins = torch.zeros(b, n, 4, 4)
    intrins[..., 0, 0] = intrins[..., 1, 1] = w / 2
    intrins[..., 0, 2], intrins[..., 1, 2], intrins[..., 2, 2], intrins[..., 3, 3] = w / 2, h / 2, 1.0, 1.0
    if kitti:
        intrins[..., 0, 3] = 45.0
    post_rot, post_tran = image_aug_transform(
        resize=1.0, crop=(0.0, 0.0), flip=True, rotate=3.0, input_size=input_size
    )
    post_rots, post_trans = post_rot.expand(b, n, 3, 3).clone(), post_tran.expand(b, n, 3).clone()
    bda = torch.eye(4).repeat(b, 1, 1)
    if kitti and b > 1:
        bda[1, 1, 1] = -1.0  # y flip on the second sample
    return rots, trans, intrins, post_rots, post_trans, bda


def _build(preset: str, input_size: tuple[int, int]) -> tuple[ImageEncoder, ViewTransformer]:
    cfg = get_config(preset)
    encoder = ImageEncoder.from_config(cfg.model.image_backbone, cfg.model.image_neck)
    vt = ViewTransformer.from_config(cfg.model.view_transformer, cfg.grid, input_size)
    return encoder, vt


def test_synthetic_tiny_path_trains_every_parameter():
    torch.manual_seed(0)
    cfg = get_config("synthetic_tiny")
    input_size, stride = cfg.data.input_size, cfg.model.view_transformer.downsample
    dmin, dmax, dstep = cfg.model.view_transformer.depth_bound
    encoder, vt = _build("synthetic_tiny", input_size)
    encoder.train(), vt.train()
    with torch.no_grad():  # timm zero-initialises each residual block's last BN (as if pretrained instead)
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    b, n = 2, 1
    img = torch.randn(b, n, 3, *input_size)
    feats = encoder(img)
    fh, fw = input_size[0] // stride, input_size[1] // stride
    assert feats.shape == (b, n, 96, fh, fw)
    cams = _cameras(b, n, input_size, kitti=True)
    volume, depth_prob = vt(feats, *cams)
    num_bins = round((dmax - dmin) / dstep)
    assert volume.shape == (b, 32, 32, 32, 8) and depth_prob.shape == (b * n, num_bins, fh, fw)
    occupied = (volume.abs().sum(dim=1) > 0).flatten(1).sum(dim=1)
    assert (occupied > 0).all()
    gt_depth = torch.zeros(b, n, *input_size)
    gt_depth[..., ::7, ::5] = torch.rand(b, n, *gt_depth[..., ::7, ::5].shape[2:]) * 40 + 3
    loss = (volume * torch.randn_like(volume)).sum() + vt.depth_loss(
        gt_depth,
        depth_prob,
        gt_occ=torch.zeros(b, *cfg.grid.occ_size, dtype=torch.uint8),
        points=vt.geometry(*cams),
    )
    loss.backward()
    params = list(encoder.named_parameters()) + list(vt.named_parameters())
    no_grad = [
        name for name, p in params if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert no_grad == []


def test_nuscenes_preset_path_with_frozen_stem():
    """Shapes on the released nuScenes modules (gradients: synthetic_tiny; frozen stem: backbone tests)."""
    torch.manual_seed(0)
    input_size = (32, 64)
    encoder, vt = _build("spotocc_nusc_256", input_size)
    encoder.train(), vt.train()
    stem_bn = encoder.backbone.body.bn1
    assert not stem_bn.training and not encoder.backbone.body.conv1.weight.requires_grad
    b, n = 1, 2
    with torch.no_grad():
        feats = encoder(torch.randn(b, n, 3, *input_size))
        assert feats.shape == (b, n, 512, 2, 4)
        volume, depth_prob = vt(feats, *_cameras(b, n, input_size, kitti=False))
    assert volume.shape == (b, 128, 128, 128, 10) and depth_prob.shape == (b * n, 112, 2, 4)
    assert torch.isfinite(volume).all() and volume.abs().sum() > 0
    assert (
        int(stem_bn.num_batches_tracked) == 0
        and int(encoder.backbone.body.layer1[0].bn1.num_batches_tracked) == 1
    )


def test_kitti_preset_path_with_one_camera_in_training():
    """Batch 1 x 1 camera in train mode: the camera BatchNorm1d and ASPP's pooled BN see one value."""
    torch.manual_seed(0)
    input_size = (32, 64)
    encoder, vt = _build("spotocc_kitti", input_size)
    encoder.train(), vt.train()
    img = torch.randn(1, 1, 3, *input_size)
    with torch.no_grad():
        feats = encoder(img)
        assert feats.shape == (1, 1, 640, 2, 4)
        volume, depth_prob = vt(feats, *_cameras(1, 1, input_size, kitti=True))
    assert volume.shape == (1, 128, 128, 128, 16) and depth_prob.shape == (1, 112, 2, 4)
    assert torch.isfinite(volume).all() and torch.isfinite(depth_prob).all()
    assert int(vt.depth_net.bn.num_batches_tracked) == 1
