import math

import pytest
import torch

from spotocc.config import get_config
from spotocc.models.image_neck import SECONDFPN


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("preset", "count", "sizes", "out_channels"),
    [
        ("spotocc_nusc_256", 1_967_104, [(64, 176), (32, 88), (16, 44), (8, 22)], 512),
        ("spotocc_kitti", 1_807_616, [(96, 320), (48, 160), (24, 80), (12, 40), (12, 40)], 640),
    ],
)
def test_released_necks(preset, count, sizes, out_channels):
    cfg = get_config(preset).model.image_neck
    neck = SECONDFPN.from_config(cfg)
    assert _num_params(neck) == count
    kinds = [type(block[0]).__name__ for block in neck.deblocks]
    kernels = [block[0].kernel_size for block in neck.deblocks]
    assert kinds[:3] == ["Conv2d", "Conv2d", "ConvTranspose2d"] and set(kinds[3:]) == {"ConvTranspose2d"}
    assert kernels[:4] == [(4, 4), (2, 2), (1, 1), (2, 2)]
    assert all(block[1].eps == 1e-3 and block[1].momentum == 0.01 for block in neck.deblocks)
    assert all(block[0].bias is None for block in neck.deblocks)
    # the stride-16 fused map from the released backbone feature sizes
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip(cfg.in_channels, sizes)]
    with torch.no_grad():
        assert tuple(neck.eval()(feats).shape) == (1, out_channels, *sizes[2])


def test_resampling_and_concatenation_by_hand():
    neck = SECONDFPN(in_channels=(1, 1), out_channels=(1, 2), upsample_strides=(0.5, 2)).eval()
    with torch.no_grad():
        neck.deblocks[0][0].weight.fill_(1.0)  # 2x2 stride-2 patch sums
        neck.deblocks[1][0].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.tensor([[[[1.0]]]])
    out = neck([fine, coarse])
    scale = 1 / math.sqrt(1 + 1e-3)  # eval BN with default statistics
    patch_sums = torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]])
    torch.testing.assert_close(out[0, 0], patch_sums * scale)
    torch.testing.assert_close(out[0, 1], torch.full((2, 2), scale))  # deconv replicates into 2x2
    torch.testing.assert_close(out[0, 2], torch.zeros(2, 2))  # ReLU of the negative channel


def test_mismatched_configs_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        SECONDFPN(in_channels=(1, 2), out_channels=(1,), upsample_strides=(1, 2))
    with pytest.raises(ValueError, match="integer"):
        SECONDFPN(in_channels=(1,), out_channels=(1,), upsample_strides=(1.5,))
