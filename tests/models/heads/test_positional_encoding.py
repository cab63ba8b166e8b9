import math

import torch

from spotocc.models.heads.positional_encoding import SinePositionalEncoding3D


def released_style_encoding(size, num_feats, temperature=10000, scale=2 * math.pi, eps=1e-6):
    """Transcription of the spec's recipe: cumulative sums over an all-False mask, normalised."""
    not_mask = torch.ones(1, *size)
    x = not_mask.cumsum(1, dtype=torch.float32)
    y = not_mask.cumsum(2, dtype=torch.float32)
    z = not_mask.cumsum(3, dtype=torch.float32)
    x = x / (x[:, -1:] + eps) * scale
    y = y / (y[:, :, -1:] + eps) * scale
    z = z / (z[:, :, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    blocks = []
    for e in (x, y, z):
        angles = e[..., None] / dim_t
        blocks.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=5).flatten(4))
    return torch.cat(blocks, dim=4)[0].reshape(-1, 3 * num_feats)  # [X*Y*Z, C], z fastest


def test_matches_released_recipe_bit_for_bit():
    pe = SinePositionalEncoding3D(num_feats=64)
    for size in [(16, 16, 2), (32, 32, 3), (5, 7, 4)]:
        assert torch.equal(pe(size), released_style_encoding(size, 64))


def test_hand_computed_entries():
    size = (4, 3, 2)
    pe = SinePositionalEncoding3D(num_feats=8)(size).double()
    assert pe.shape == (24, 24)
    flat = lambda i, j, k: (i * 3 + j) * 2 + k  # noqa: E731  row-major, z fastest
    for i, j, k in [(0, 0, 0), (3, 2, 1), (1, 2, 0)]:
        row = pe[flat(i, j, k)]
        for axis, (index, length) in enumerate([(i, 4), (j, 3), (k, 2)]):
            e = (index + 1) / (length + 1e-6) * 2 * math.pi
            for c in range(4):
                tau = 10000 ** (2 * c / 8)
                assert abs(row[axis * 8 + 2 * c] - math.sin(e / tau)) < 1e-5
                assert abs(row[axis * 8 + 2 * c + 1] - math.cos(e / tau)) < 1e-5
