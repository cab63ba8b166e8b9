"""SparseLatentDiffuser (+ the neck): parameter counts and names, shapes, active sets, batching, backends."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from spotocc.config import get_config
from spotocc.models.sparse.conv import SparseTensor, set_sparse_backend
from spotocc.models.sparse.encoder import RELEASED_NAME_MAP, SparseLatentDiffuser
from spotocc.models.sparse.pyramid import SparseFeaturePyramid

# the img_bev_encoder_* lines of the released nuScenes SPOT-Occ parameter listing (spec/released-parameters)
RELEASED_PARAMETERS = Path(__file__).with_name("released_bev_encoder_parameters.txt")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_volume(batch: int, channels: int, shape, num_active: int, seed: int) -> torch.Tensor:
    """[B, C, X, Y, Z] with ``num_active`` random non-zero voxels per sample."""
    gen = torch.Generator().manual_seed(seed)
    volume = torch.zeros(batch, channels, *shape)
    cells = torch.randperm(shape[0] * shape[1] * shape[2], generator=gen)[: batch * num_active]
    for n, cell in enumerate(cells.tolist()):
        x, rest = divmod(cell, shape[1] * shape[2])
        y, z = divmod(rest, shape[2])
        volume[n % batch, :, x, y, z] = torch.rand(channels, generator=gen) + 0.1
    return volume


def test_parameter_counts_match_the_released_model():
    encoder = SparseLatentDiffuser.from_config(get_config("spotocc_nusc_256").model)
    assert sum(p.numel() for p in encoder.parameters()) == 42_153_984
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in encoder.named_children()}
    assert counts == {
        "res_block": 885_248,
        "completion1": 738_560,
        "aggregation1": 1_033_216,
        "completion2": 590_848,
        "aggregation2": 2_655_744,
        "completion3": 1_180_672,
        "aggregation3": 11_995_392,
        "completion4": 2_360_320,
        "aggregation4": 20_713_984,
    }
    kitti = SparseLatentDiffuser.from_config(get_config("spotocc_kitti").model)
    assert sum(p.numel() for p in kitti.parameters()) == 42_153_984


@pytest.mark.parametrize("preset", ["spotocc_nusc_256", "spotocc_kitti"])
def test_released_parameter_names_map_one_to_one(preset):
    """Every released backbone/neck parameter has a spotocc twin of the same shape, and nothing more."""
    model = get_config(preset).model
    ours = {
        **{
            f"img_bev_encoder_backbone.{k}": v.shape
            for k, v in SparseLatentDiffuser.from_config(model).named_parameters()
        },
        **{
            f"img_bev_encoder_neck.{k}": v.shape
            for k, v in SparseFeaturePyramid.from_config(model).named_parameters()
        },
    }
    up_kernel = [2, 2, 3] if preset == "spotocc_nusc_256" else [2, 2, 2]
    released = {}
    for line in RELEASED_PARAMETERS.read_text().splitlines():
        name, shape = line.split(" ", 1)
        shape = json.loads(shape)
        if name.startswith("img_bev_encoder_neck.up_sample.") and name.endswith(".0.weight"):
            shape = [192, *up_kernel, 192]
        head, _, rest = name.partition(".")
        if head == "img_bev_encoder_backbone":
            block, _, leaf = rest.partition(".")
            name = f"{head}.{RELEASED_NAME_MAP[block]}.{leaf}"
        released[name] = list(shape)
    assert {k: list(v) for k, v in ours.items()} == released


@pytest.mark.parametrize(
    "preset, z_sizes", [("spotocc_nusc_256", (10, 5, 3, 2)), ("spotocc_kitti", (16, 8, 4, 2))]
)
def test_preset_level_shapes(preset, z_sizes, one_thread):
    cfg = get_config(preset).model
    encoder = SparseLatentDiffuser.from_config(cfg).eval()
    neck = SparseFeaturePyramid.from_config(cfg).eval()
    volume = sparse_volume(1, 128, (128, 128, z_sizes[0]), num_active=3, seed=0)
    with torch.no_grad():
        levels = encoder(volume)
        outs = neck(levels)
    xy = (128, 64, 32, 16)
    assert [lv.spatial_shape for lv in levels] == [(s, s, z) for s, z in zip(xy, z_sizes)]
    assert [lv.features.shape[1] for lv in levels] == [128, 256, 512, 1024]
    assert [tuple(o.shape) for o in outs] == [(1, 192, s, s, z) for s, z in zip(xy, z_sizes)]
    assert all(torch.isfinite(o).all() for o in outs)


# ---- active sets by the rules of spec 02 section 2.3, with python sets


def dilate(active: set, radius, shape) -> set:
    out = set()
    for b, *c in active:
        for d in itertools.product(*(range(-r, r + 1) for r in radius)):
            o = tuple(ci + di for ci, di in zip(c, d))
            if all(0 <= oi < n for oi, n in zip(o, shape)):
                out.add((b, *o))
    return out


def stride2_image(active: set, shape) -> tuple[set, tuple]:
    """k3 s2 p1: coarse o is active iff an active fine i has |i - 2o| <= 1 on every axis."""
    out_shape = tuple((n - 1) // 2 + 1 for n in shape)
    out = set()
    for b, *c in active:
        for d in itertools.product((-1, 0, 1), repeat=3):
            num = [ci + di for ci, di in zip(c, d)]
            if all(v % 2 == 0 and 0 <= v // 2 < n for v, n in zip(num, out_shape)):
                out.add((b, *(v // 2 for v in num)))
    return out, out_shape


def children(active: set, kernel, padding, shape) -> set:
    """Transposed conv (stride 2) footprint: 2i - p + k inside the grid."""
    out = set()
    for b, *c in active:
        for k in itertools.product(*(range(n) for n in kernel)):
            o = tuple(2 * ci - p + ki for ci, p, ki in zip(c, padding, k))
            if all(0 <= oi < n for oi, n in zip(o, shape)):
                out.add((b, *o))
    return out


def as_set(x: SparseTensor) -> set:
    return {tuple(r) for r in x.indices.tolist()}


def support(dense: torch.Tensor) -> set:
    return {tuple(r) for r in (dense.abs().sum(1) != 0).nonzero().tolist()}


@pytest.mark.parametrize("z, up", [(10, ((2, 2, 3), (0, 0, 1))), (16, ((2, 2, 2), (0, 0, 0)))])
def test_active_sets_and_zeros_outside_them(z, up, one_thread):
    torch.manual_seed(0)
    shape0 = (24, 16, z)  # x, y halve evenly down to L3, as the presets do
    encoder = SparseLatentDiffuser(in_channels=8, num_layers=(3, 2, 2, 1), backend="reference").eval()
    neck = SparseFeaturePyramid(
        in_channels=(8, 16, 32, 64), feat_channels=16, out_channels=16, num_groups=4,
        up_kernel_size=up[0], up_padding=up[1], backend="reference",
    ).eval()  # fmt: skip
    volume = sparse_volume(2, 8, shape0, num_active=3, seed=1)
    with torch.no_grad():
        levels = encoder(volume)
        outs = neck(levels)

    s0 = dilate({tuple(r) for r in (volume.abs().sum(1) != 0).nonzero().tolist()}, (4, 4, 2), shape0)
    s1, shape1 = stride2_image(s0, shape0)
    s1 = dilate(s1, (3, 3, 2), shape1)
    s2, shape2 = stride2_image(s1, shape1)
    s2 = dilate(s2, (2, 2, 0), shape2)
    s3, shape3 = stride2_image(s2, shape2)
    s3 = dilate(s3, (1, 1, 0), shape3)
    assert [as_set(lv) for lv in levels] == [s0, s1, s2, s3]
    assert [lv.spatial_shape for lv in levels] == [shape0, shape1, shape2, shape3]
    # dense neck outputs: zeros exactly outside level set + transposed-conv children of the coarser one
    assert support(outs[3]) == s3
    assert support(outs[2]) == s2 | children(s3, up[0], up[1], shape2)
    assert support(outs[1]) == s1 | children(s2, up[0], up[1], shape1)
    assert len(support(outs[0])) == 2 * shape0[0] * shape0[1] * shape0[2]  # mask features: dense


def small_model(backend: str = "reference") -> tuple[SparseLatentDiffuser, SparseFeaturePyramid]:
    torch.manual_seed(0)
    encoder = SparseLatentDiffuser(in_channels=8, num_layers=(1, 1, 1, 1), backend=backend)
    neck = SparseFeaturePyramid(
        in_channels=(8, 16, 32, 64), feat_channels=16, out_channels=16, num_groups=4,
        up_kernel_size=(2, 2, 3), up_padding=(0, 0, 1), backend=backend,
    )  # fmt: skip
    # non-trivial BN statistics and affine parameters, so eval mode is not an identity
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return encoder, neck


def test_batch_of_two_equals_each_sample_alone(one_thread):
    encoder, neck = small_model()
    encoder.eval(), neck.eval()
    volume = torch.cat(
        [
            sparse_volume(1, 8, (16, 16, 10), num_active=6, seed=2),
            sparse_volume(1, 8, (16, 16, 10), 4, seed=3),
        ]
    )
    with torch.no_grad():
        together = neck(encoder(volume))
        alone = [neck(encoder(volume[b : b + 1])) for b in range(2)]
    for level, out in enumerate(together):
        for b in range(2):
            torch.testing.assert_close(out[b : b + 1], alone[b][level], rtol=1e-5, atol=1e-5)


def test_every_parameter_receives_a_gradient(one_thread):
    encoder, neck = small_model()
    volume = sparse_volume(2, 8, (16, 16, 10), num_active=5, seed=4).requires_grad_()
    outs = neck(encoder(volume))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert volume.grad.abs().sum() > 0
    params = dict(itertools.chain(encoder.named_parameters(), neck.named_parameters()))
    cancelled = [f"aggregation{i}.conv1.{j}.bias" for i in (3, 4) for j in (0, 3)]
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in cancelled:
            # a conv bias right before a training-mode BatchNorm cancels out (released quirk, spec 7.8)
            weight_grad = params[name.replace(".bias", ".weight")].grad
            assert p.grad.abs().max() < 1e-3 * weight_grad.abs().max(), name
        else:
            assert p.grad.abs().sum() > 0, name


def test_backends_agree_on_encoder_and_neck(one_thread):
    """float64: per-voxel GroupNorm over 4 channels makes float32 input gradients ill-conditioned."""
    results = {}
    for backend in ("reference", "spconv", "dense"):
        encoder, neck = small_model()
        encoder.double(), neck.double()
        set_sparse_backend(encoder, backend), set_sparse_backend(neck, backend)
        volume = sparse_volume(2, 8, (16, 16, 10), num_active=5, seed=5).double().requires_grad_()
        outs = neck(encoder(volume))
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs).backward()
        grads = [p.grad for p in itertools.chain(encoder.parameters(), neck.parameters())]
        results[backend] = ([o.detach() for o in outs], volume.grad, grads)
    ref = results["reference"]
    for other in ("spconv", "dense"):
        outs, volume_grad, grads = results[other]
        for a, b in zip(ref[0], outs):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(volume_grad, ref[1], rtol=1e-7, atol=1e-7)
        for a, b in zip(ref[2], grads):
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-7)


def test_empty_volume_gives_empty_levels_and_finite_outputs():
    encoder, neck = small_model()
    outs = neck(encoder(torch.zeros(2, 8, 16, 16, 10)))
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(o.abs().sum() == 0 for o in outs[1:])


def test_bad_input_is_named():
    encoder, _ = small_model()
    with pytest.raises(ValueError, match=r"expected a volume \[B, 8, X, Y, Z\]"):
        encoder(torch.zeros(1, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="num_layers needs 4 entries"):
        SparseLatentDiffuser(num_layers=(1, 1))
    with pytest.raises(ValueError, match="voxel_encoder.norm"):
        SparseLatentDiffuser(in_channels=8, norm="group")
