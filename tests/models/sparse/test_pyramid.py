"""SparseFeaturePyramid against a step-by-step oracle of spec 02 section 3.2, written with dicts and loops."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from spotocc.config import get_config
from spotocc.models.sparse.conv import SparseTensor
from spotocc.models.sparse.pyramid import SparseFeaturePyramid


def random_level(batch: int, channels: int, shape, density: float, seed: int) -> SparseTensor:
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, 1, *shape, generator=gen) < density
    return SparseTensor.from_dense(
        torch.randn(batch, channels, *shape, generator=gen, dtype=torch.float64) * active
    )


def rows(x: SparseTensor) -> dict:
    return {tuple(c): f for c, f in zip(x.indices.tolist(), x.features)}


def voxel_group_norm(f: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of one voxel's feature vector on its own (biased variance over each channel group)."""
    groups = f.view(gn.num_groups, -1)
    mean = groups.mean(dim=1, keepdim=True)
    var = groups.var(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / torch.sqrt(var + gn.eps)).view(-1) * gn.weight + gn.bias


def project(seq, level: dict) -> dict:
    """1x1 sparse conv with spconv's weight reinterpretation, then per-voxel GroupNorm."""
    conv, gn = seq[0], seq[1]
    w = conv.weight.reshape(conv.in_channels, conv.out_channels)
    out = {}
    for c, f in level.items():
        y = f @ w
        if conv.bias is not None:
            y = y + conv.bias
        out[c] = voxel_group_norm(y, gn)
    return out


def transposed(seq, level: dict, out_shape) -> dict:
    """Transposed conv by its definition (input i writes W[:, k, :] @ f to s*i - p + k), then GN."""
    conv, gn = seq[0], seq[1]
    out = defaultdict(lambda: torch.zeros(conv.out_channels, dtype=torch.float64))
    for (b, *i), f in level.items():
        for k in itertools.product(*(range(n) for n in conv.kernel_size)):
            o = tuple(s * i_ - p + k_ for s, i_, p, k_ in zip(conv.stride, i, conv.padding, k))
            if all(0 <= o_ < n for o_, n in zip(o, out_shape)):
                out[(b, *o)] = out[(b, *o)] + conv.weight[:, k[0], k[1], k[2], :] @ f
    return {c: voxel_group_norm(f, gn) for c, f in out.items()}


def merge_mean(a: dict, b: dict) -> dict:
    keys = set(a) | set(b)
    return {k: (a[k] + b[k]) / 2 if (k in a and k in b) else (a[k] if k in a else b[k]) for k in keys}


def to_dense(level: dict, batch: int, channels: int, shape) -> torch.Tensor:
    out = torch.zeros(batch, channels, *shape, dtype=torch.float64)
    for (b, x, y, z), f in level.items():
        out[b, :, x, y, z] = f
    return out


def oracle(neck: SparseFeaturePyramid, levels: list[SparseTensor]) -> list[torch.Tensor]:
    skip0, skip1, skip2, skip3 = levels
    batch, feat = skip0.batch_size, neck.feat_channels
    p3 = project(neck.input_convs[0], rows(skip3))
    p2 = project(neck.input_convs[1], rows(skip2))
    p1 = project(neck.input_convs[2], rows(skip1))
    # one mean per L3 cell over all L1 (coords // 4), L2 (// 2) and L3 voxels
    cells = defaultdict(list)
    for level, div in ((p1, 4), (p2, 2), (p3, 1)):
        for (b, x, y, z), f in level.items():
            cells[(b, x // div, y // div, z // div)].append(f)
    mean = {cell: torch.stack(fs).mean(0) for cell, fs in cells.items()}
    p3 = {c: f + mean[c] for c, f in p3.items()}
    p2 = {c: f + mean[(c[0], c[1] // 2, c[2] // 2, c[3] // 2)] for c, f in p2.items()}
    p1 = {c: f + mean[(c[0], c[1] // 4, c[2] // 4, c[3] // 4)] for c, f in p1.items()}
    o2 = merge_mean(p2, transposed(neck.up_sample[0], p3, skip2.spatial_shape))
    o1 = merge_mean(p1, transposed(neck.up_sample[1], p2, skip1.spatial_shape))
    d3 = to_dense(p3, batch, feat, skip3.spatial_shape)
    d2 = to_dense(o2, batch, feat, skip2.spatial_shape)
    d1 = to_dense(o1, batch, feat, skip1.spatial_shape)
    lateral = to_dense(project(neck.lateral_convs[0], rows(skip0)), batch, feat, skip0.spatial_shape)
    y = lateral + F.interpolate(d1, size=skip0.spatial_shape, mode="trilinear", align_corners=False)
    out_conv = neck.output_convs[0]
    y = F.conv3d(y, out_conv.conv.weight)
    y = torch.relu(
        F.group_norm(y, out_conv.gn.num_groups, out_conv.gn.weight, out_conv.gn.bias, out_conv.gn.eps)
    )
    mask_features = F.conv3d(y, neck.mask_feature.weight, neck.mask_feature.bias)
    return [mask_features, d1, d2, d3]


@pytest.mark.parametrize(
    "shapes, up",
    [
        ([(16, 16, 10), (8, 8, 5), (4, 4, 3), (2, 2, 2)], ((2, 2, 3), (2, 2, 2), (0, 0, 1))),  # nuScenes
        ([(16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)], ((2, 2, 2), (2, 2, 2), (0, 0, 0))),  # KITTI
    ],
)
@pytest.mark.parametrize("backend", ["reference", "spconv"])
def test_neck_matches_the_step_by_step_oracle(shapes, up, backend):
    torch.manual_seed(0)
    channels = (4, 6, 8, 10)
    neck = SparseFeaturePyramid(
        in_channels=channels, feat_channels=12, out_channels=9, num_groups=3,
        up_kernel_size=up[0], up_stride=up[1], up_padding=up[2], backend=backend,
    ).double()  # fmt: skip
    with torch.no_grad():  # non-trivial GroupNorm affine parameters
        for m in neck.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    levels = [random_level(2, c, s, 0.35, seed=i) for i, (c, s) in enumerate(zip(channels, shapes))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            outs = neck(levels)
            expected = oracle(neck, levels)
    finally:
        torch.set_num_threads(threads)
    assert [tuple(o.shape) for o in outs] == [(2, 9, *shapes[0])] + [(2, 12, *s) for s in shapes[1:]]
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    assert all(o.is_contiguous() for o in outs)


def test_parameter_counts_match_the_released_necks():
    counts = {}
    for preset in ("spotocc_nusc_256", "spotocc_kitti"):
        neck = SparseFeaturePyramid.from_config(get_config(preset).model)
        counts[preset] = {name: sum(p.numel() for p in m.parameters()) for name, m in neck.named_children()}
    shared = {"input_convs": 345_216, "lateral_convs": 25_152, "output_convs": 37_248, "mask_feature": 37_056}
    assert counts["spotocc_nusc_256"] == {**shared, "up_sample": 885_504}
    assert counts["spotocc_kitti"] == {**shared, "up_sample": 590_592}
    assert sum(counts["spotocc_nusc_256"].values()) == 1_330_176
    assert sum(counts["spotocc_kitti"].values()) == 1_035_264


def test_mismatched_upsampling_and_bad_levels_are_named():
    levels = [
        random_level(1, c, s, 0.5, seed=i)
        for i, (c, s) in enumerate(zip((4, 6, 8, 10), [(16, 16, 10), (8, 8, 5), (4, 4, 3), (2, 2, 2)]))
    ]
    neck = SparseFeaturePyramid(
        in_channels=(4, 6, 8, 10), feat_channels=12, out_channels=12, num_groups=3
    ).double()
    with pytest.raises(ValueError, match=r"L3 -> L2 transposed conv gives grid \(4, 4, 4\).*up_kernel_size"):
        neck(levels)  # the KITTI defaults on a nuScenes-shaped Z chain
    with pytest.raises(ValueError, match="expected 4 sparse levels"):
        neck(levels[:3])
    with pytest.raises(ValueError, match="level 2 has 8 channels, expected 9"):
        SparseFeaturePyramid(in_channels=(4, 6, 9, 10), feat_channels=12, num_groups=3)(levels)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        SparseFeaturePyramid(feat_channels=20, num_groups=32)
