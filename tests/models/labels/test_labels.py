"""occupancy_labels: exact agreement with the direct formula evaluated in float64.

The oracle is the released formula taken literally: ``F.interpolate(..., "trilinear",
align_corners=True)`` of every query in float64, sigmoid, the probability-weighted sum over queries,
argmax. A voxel may disagree with it only where the oracle's own two best scores are within float32
rounding (``TIE_TOL``); every test counts those voxels and, on generic inputs, requires none.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spotocc.benchmarking.labels import structured_head_outputs
from spotocc.models.labels import class_probs_from_logits, occupancy_labels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TIE_TOL = 1e-5  # relative to the largest class total; float32 rounding of the scores is ~1e-6 of it


def reference_scores(class_probs: torch.Tensor, mask_logits: torch.Tensor, out_size) -> torch.Tensor:
    """The released formula in float64: scores [B, C, X', Y', Z']."""
    up = F.interpolate(mask_logits.double(), size=tuple(out_size), mode="trilinear", align_corners=True)
    return torch.einsum("bqc,bqxyz->bcxyz", class_probs.double(), torch.sigmoid(up))


def check_against_reference(labels, class_probs, mask_logits, out_size, allowed: int | None = None) -> int:
    """Assert labels equal the float64 argmax except at near-ties; return the number of near-tie voxels.

    ``allowed`` caps that number; by default one in 10,000 voxels (generic inputs: float32 rounding
    flips a voxel only where two scores agree to ~1e-7).
    """
    scores = reference_scores(class_probs.cpu(), mask_logits.cpu(), out_size)
    labels = labels.cpu()
    assert labels.dtype == torch.int64
    assert labels.shape == (mask_logits.shape[0], *out_size)
    expected = scores.argmax(dim=1)
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, -1]  # [B, X', Y', Z']
    tol = TIE_TOL * max(1.0, float(class_probs.double().sum(dim=1).max()))
    differ = labels != expected
    assert bool((gap[differ] < tol).all()), f"labels differ at voxels whose top-2 gap >= {tol}"
    # where the labels differ, the chosen class must itself be (near-)best
    chosen = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    assert bool((top2[:, 0][differ] - chosen[differ] < tol).all())
    count = int(differ.sum())
    allowed = labels.numel() // 10_000 if allowed is None else allowed
    assert count <= allowed, f"{count} near-tie voxels differ from the float64 formula (allowed {allowed})"
    return count


def random_inputs(batch, queries, classes, grid, *, logit_scale=4.0, smooth=True, seed=0, sharp_probs=True):
    gen = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn((batch, queries, classes + 1), generator=gen) * (3.0 if sharp_probs else 1.0)
    probs = class_probs_from_logits(cls_logits)
    logits = torch.randn((batch, queries, *grid), generator=gen)
    if smooth:  # spatially correlated fields, like real mask logits
        coarse = tuple(max(2, s // 2) for s in grid)
        logits = (
            F.interpolate(
                torch.randn((batch, queries, *coarse), generator=gen),
                size=grid,
                mode="trilinear",
                align_corners=True,
            )
            + 0.3 * logits
        )
    return probs, logits * logit_scale


# ---- generic inputs, many grid sizes and scale factors ------------------------------------------------

GRIDS = [
    ((7, 6, 5), (20, 13, 11)),  # non-integer ratios (7 -> 20 as in the task)
    ((5, 5, 4), (17, 17, 9)),
    ((4, 4, 4), (4, 4, 4)),  # identity
    ((6, 5, 4), (3, 4, 2)),  # downsampling: some cells hold no output voxel
    ((1, 4, 2), (3, 9, 5)),  # a single input plane
    ((4, 3, 5), (1, 7, 6)),  # a single output plane
    ((3, 3, 3), (12, 12, 12)),  # integer-ish, 4x
]


@pytest.mark.parametrize("grid,out_size", GRIDS)
@pytest.mark.parametrize("method", ["bounded", "direct"])
def test_random_inputs_match_float64_formula(grid, out_size, method):
    for seed, scale in ((0, 1.0), (1, 4.0), (2, 20.0)):
        probs, logits = random_inputs(2, 12, 5, grid, logit_scale=scale, seed=seed)
        labels = occupancy_labels(probs, logits, out_size, method)
        check_against_reference(labels, probs, logits, out_size)


@pytest.mark.parametrize(
    "grid,out_size",
    [
        ((128, 4, 10), (512, 7, 40)),  # nuScenes: 128 -> 512 along x, 10 -> 40 along z
        ((5, 128, 10), (9, 512, 40)),
        ((128, 3, 16), (256, 5, 32)),  # KITTI: 128 -> 256, 16 -> 32
        ((4, 128, 16), (6, 256, 32)),
    ],
)
def test_preset_scale_relations(grid, out_size):
    probs, logits = random_inputs(1, 10, 6, grid, logit_scale=6.0, seed=3)
    stats: dict = {}
    labels = occupancy_labels(probs, logits, out_size, stats=stats)
    check_against_reference(labels, probs, logits, out_size)
    assert stats["voxels_refined"] > 0  # the inputs reach the per-voxel stage


def test_full_nuscenes_grid_on_a_crop():
    """The real 128x128x10 -> 512x512x40 problem, checked on an output crop against an explicit oracle."""
    probs, logits = random_inputs(1, 4, 3, (128, 128, 10), logit_scale=6.0, seed=4)
    labels = occupancy_labels(probs, logits, (512, 512, 40))
    crop = (slice(301, 333), slice(97, 121), slice(0, 40))
    # oracle: x_src = x_out * (in - 1) / (out - 1) in float64, per axis, explicit 8-corner sum
    axes = []
    for n_in, n_out, sl in zip((128, 128, 10), (512, 512, 40), crop):
        src = torch.arange(n_out, dtype=torch.float64)[sl] * (n_in - 1) / (n_out - 1)
        lower = src.floor().long().clamp(max=n_in - 2)
        axes.append((lower, src - lower))
    (ix, tx), (iy, ty), (iz, tz) = axes
    volume = logits[0].double()  # [Q, X, Y, Z]
    up = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = (
                    (tx if dx else 1 - tx)[:, None, None]
                    * (ty if dy else 1 - ty)[None, :, None]
                    * (tz if dz else 1 - tz)[None, None, :]
                )
                up = up + weight * volume[:, ix + dx][:, :, iy + dy][:, :, :, iz + dz]
    scores = torch.einsum("qc,qxyz->cxyz", probs[0].double(), torch.sigmoid(up))
    assert torch.equal(labels[0][crop], scores.argmax(dim=0))


# ---- structured inputs -------------------------------------------------------------------------------


def test_structured_scene_blobs_and_boxes():
    """Mask2Former-like outputs of a street scene (smooth regions, soft edges, junk queries)."""
    probs, logits = structured_head_outputs(preset="nuscenes", grid=(24, 24, 6), num_queries=40, seed=5)
    out_size = (93, 93, 24)  # nuScenes-like 4x ratios, non-integer: (24 - 1) / (93 - 1)
    stats: dict = {}
    labels = occupancy_labels(probs, logits, out_size, stats=stats)
    check_against_reference(labels, probs, logits, out_size)
    assert stats["cells_certified_coarse"] > stats["cells"] // 2  # most cells decided whole
    kitti_probs, kitti_logits = structured_head_outputs(
        preset="kitti", grid=(20, 20, 8), num_queries=30, seed=6
    )
    labels = occupancy_labels(kitti_probs, kitti_logits, (40, 40, 16))
    check_against_reference(labels, kitti_probs, kitti_logits, (40, 40, 16))


def test_hard_class_boundaries():
    """Logits jumping between +-30 from one low-res voxel to the next: every boundary cell is mixed."""
    gen = torch.Generator().manual_seed(7)
    grid, out_size = (6, 7, 5), (21, 25, 17)
    owner = torch.randint(0, 4, grid, generator=gen)
    logits = torch.where(owner == torch.arange(4).view(4, 1, 1, 1), 30.0, -30.0).unsqueeze(0)
    logits = torch.cat((logits, torch.randn((1, 3, *grid), generator=gen)), dim=1)  # junk queries
    probs = class_probs_from_logits(torch.randn((1, 7, 5), generator=gen) * 4)
    for method in ("bounded", "direct"):
        check_against_reference(occupancy_labels(probs, logits, out_size, method), probs, logits, out_size)


def test_many_near_ties():
    """Classes whose probability columns differ by ~1e-6: scores nearly tie everywhere."""
    probs, logits = random_inputs(2, 10, 2, (5, 6, 4), logit_scale=5.0, seed=8)
    gen = torch.Generator().manual_seed(9)
    near = probs[..., :1] + 1e-6 * torch.rand((2, 10, 1), generator=gen)
    probs = torch.cat((probs[..., :1], near, probs[..., 1:]), dim=2)  # classes 0 and 1 nearly equal
    out_size = (13, 16, 10)
    labels = occupancy_labels(probs, logits, out_size)
    # near-ties below float32 resolution may go either way; the check counts them
    count = check_against_reference(labels, probs, logits, out_size, allowed=labels.numel())
    assert count < labels.numel() // 20


def test_exact_ties_go_to_the_lowest_class():
    probs, logits = random_inputs(1, 8, 3, (4, 5, 3), seed=10)
    probs = torch.cat((probs[..., :1], probs[..., :1], probs[..., 1:]), dim=2)  # class 1 == class 0
    out_size = (11, 13, 7)
    for method in ("bounded", "direct"):
        labels = occupancy_labels(probs, logits, out_size, method)
        assert not bool((labels == 1).any())  # an exact tie with class 0 never picks 1
        check_against_reference(labels, probs, logits, out_size)


# ---- dtypes, batches, devices, options ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs_are_computed_in_float32(device):
    probs, logits = random_inputs(2, 12, 5, (6, 5, 4), seed=11)
    probs, logits = probs.bfloat16().to(device), logits.bfloat16().to(device)
    out_size = (17, 16, 13)
    for method in ("bounded", "direct"):
        labels = occupancy_labels(probs, logits, out_size, method)
        assert labels.device.type == device
        check_against_reference(labels, probs.float(), logits.float(), out_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        # The per-voxel stage is shared by the batch: with a huge margin most voxels fall back to
        # the all-query evaluation, which must use each voxel's own sample; tiny chunks make the
        # shared queues flush in the middle of a sample.
        {"margin": 0.5, "chunk_bytes": 4096},
    ],
)
def test_batch_of_three_is_per_sample(device, options):
    probs, logits = random_inputs(3, 9, 4, (6, 6, 4), seed=12)
    probs, logits = probs.to(device), logits.to(device)
    out_size = (16, 17, 10)
    stats: dict = {}
    labels = occupancy_labels(probs, logits, out_size, stats=stats, **options)
    check_against_reference(labels, probs, logits, out_size)
    if "margin" in options:
        assert stats["voxels_exact"] > stats["voxels"] / 3  # more than one sample's worth
    for b in range(3):
        single = occupancy_labels(probs[b : b + 1], logits[b : b + 1], out_size, **options)
        assert torch.equal(single[0], labels[b])


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_bytes": 4096},
        {"num_contenders": 2},  # cells with three contenders are bounded per class
        {"num_exact_queries": 1},  # more voxels fall back to the all-query evaluation
        {"num_exact_queries": 50, "num_contenders": 50},
        {"margin": 0.5},  # a huge margin only moves work to the exact stages
    ],
)
def test_options_change_work_not_labels(options):
    probs, logits = random_inputs(2, 16, 6, (7, 6, 5), logit_scale=6.0, seed=13)
    out_size = (20, 19, 14)
    stats: dict = {}
    labels = occupancy_labels(probs, logits, out_size, stats=stats, **options)
    check_against_reference(labels, probs, logits, out_size)
    assert torch.equal(labels, occupancy_labels(probs, logits, out_size, "direct"))
    assert stats["voxels"] == labels.numel()


def test_every_stage_is_exercised_and_counted():
    probs, logits = structured_head_outputs(grid=(16, 16, 6), num_queries=30, seed=14)
    stats: dict = {}
    out_size = (61, 61, 21)
    labels = occupancy_labels(probs, logits, out_size, stats=stats, num_contenders=2, num_exact_queries=1)
    check_against_reference(labels, probs, logits, out_size)
    assert stats["cells"] == 15 * 15 * 5 and stats["voxels"] == 61 * 61 * 21
    for key in (
        "cells_certified_coarse",
        "cells_certified_refined",
        "cells_many_contenders",
        "voxels_refined",
        "voxels_exact",
    ):
        assert stats[key] > 0, key


# ---- memory: chunks bound every intermediate ---------------------------------------------------------


class LargestNewTensor(TorchDispatchMode):
    """Records the bytes of every tensor an op allocates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if not schema.is_mutable and not any(r.alias_info is not None for r in schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.allocations.append(
                        (str(func), tuple(t.shape), t.dtype, t.numel() * t.element_size())
                    )
        return out


@pytest.mark.parametrize("method", ["bounded", "direct"])
@pytest.mark.parametrize(
    "grid,out_size,chunk",
    [
        ((5, 6, 4), (30, 33, 19), 32 * 1024),
        ((3, 3, 3), (40, 40, 40), 64 * 1024),  # 8000 voxels per cell: blocks split a cell's x-rows
    ],
)
def test_chunk_bytes_bounds_the_largest_intermediate(method, grid, out_size, chunk):
    queries = 16
    probs, logits = random_inputs(1, queries, 6, grid, logit_scale=6.0, seed=15)
    with LargestNewTensor() as tracker:
        labels = occupancy_labels(probs, logits, out_size, method, chunk_bytes=chunk, num_exact_queries=2)
    check_against_reference(labels, probs, logits, out_size)
    output = [a for a in tracker.allocations if a[1] == labels.shape and a[2] == torch.int64]
    assert len(output) == 1  # the labels themselves
    rest = [a for a in tracker.allocations if a not in output]
    full_volume = queries * math.prod(out_size) * 4  # the sample's upsampled logits in float32
    input_sized = queries * math.prod(grid) * 4 * 4  # the logits (and checks over them)
    largest = max(rest, key=lambda a: a[3])
    assert largest[3] <= max(chunk, input_sized), largest
    assert max(chunk, input_sized) * 30 < full_volume  # the bound is far below the dense volume


# ---- helpers and errors ------------------------------------------------------------------------------


def test_class_probs_from_logits_drops_no_object_without_renormalising():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, C+1 = 3]
    probs = class_probs_from_logits(logits)
    expected = torch.softmax(logits, dim=-1)[..., :2]
    assert probs.shape == (1, 2, 2)
    assert torch.allclose(probs, expected)
    assert torch.allclose(probs[0, 1], torch.tensor([1 / 3, 1 / 3]))
    assert class_probs_from_logits(logits.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="cls_logits"):
        class_probs_from_logits(torch.zeros(2, 3))


def test_degenerate_sizes():
    probs = torch.zeros((2, 0, 4))
    logits = torch.zeros((2, 0, 3, 3, 3))
    assert torch.equal(
        occupancy_labels(probs, logits, (5, 5, 5)), torch.zeros((2, 5, 5, 5), dtype=torch.long)
    )
    probs, logits = random_inputs(1, 4, 1, (3, 3, 3), seed=16)
    assert not bool(occupancy_labels(probs, logits, (6, 6, 6)).any())  # one class: label 0 everywhere
    probs, logits = random_inputs(1, 4, 3, (3, 3, 3), seed=17)
    huge = logits * 1e4  # saturated sigmoids: no NaN, same labels as the formula
    check_against_reference(occupancy_labels(probs, huge, (7, 7, 7)), probs, huge, (7, 7, 7))


@pytest.mark.parametrize(
    "probs_shape,logits_shape,out_size,kwargs,match",
    [
        ((1, 4, 3), (1, 4, 3, 3, 3), (5, 5, 5), {"method": "nearest"}, "method"),
        ((1, 4), (1, 4, 3, 3, 3), (5, 5, 5), {}, "class_probs"),
        ((1, 4, 3), (1, 4, 3, 3), (5, 5, 5), {}, "mask_logits"),
        ((1, 5, 3), (1, 4, 3, 3, 3), (5, 5, 5), {}, "disagree"),
        ((1, 4, 3), (1, 4, 3, 3, 3), (5, 5), {}, "out_size"),
        ((1, 4, 3), (1, 4, 3, 3, 3), (5, 0, 5), {}, "out_size"),
        ((1, 4, 3), (1, 4, 3, 3, 3), (5, 5, 5), {"chunk_bytes": 0}, "chunk_bytes"),
        ((1, 4, 3), (1, 4, 3, 3, 3), (5, 5, 5), {"num_contenders": 1}, "num_contenders"),
    ],
)
def test_bad_arguments_raise(probs_shape, logits_shape, out_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        occupancy_labels(torch.rand(probs_shape), torch.randn(logits_shape), out_size, **kwargs)


def test_non_finite_or_negative_inputs_raise():
    probs, logits = random_inputs(1, 4, 3, (3, 3, 3))
    bad = logits.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        occupancy_labels(probs, bad, (5, 5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        occupancy_labels(-probs, logits, (5, 5, 5))
