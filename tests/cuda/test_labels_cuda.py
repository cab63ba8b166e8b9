"""Full-resolution labels on CUDA: the CPU's labels, CUDA's default chunk size, and bounded peak memory.

On CUDA ``occupancy_labels`` chunks its intermediates at 256 MiB by default (16 MiB on CPU). Peak
memory is the growth of ``torch.cuda.max_memory_allocated`` during one call. Measured on CPU for the
nuScenes problem (128x128x10 -> 512x512x40, 100 queries), the bounded method grows the resident set
by about 1.1 GB with 256 MiB chunks and 0.4 GB with 16 MiB chunks; the upsampled logits the released
inference forms are 4.2 GB.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_support import CUDA_ONLY

from spotocc.benchmarking.labels import structured_head_outputs
from spotocc.benchmarking.memory import MemoryPeak, measure_peak
from spotocc.models.labels import occupancy_labels

pytestmark = CUDA_ONLY

CUDA = torch.device("cuda")
MiB = 2**20


def near_tie_mismatches(labels, class_probs, mask_logits, out_size) -> int:
    """Voxels whose label differs from the float64 formula; fails on any that is not a near-tie."""
    up = F.interpolate(mask_logits.double(), size=out_size, mode="trilinear", align_corners=True)
    scores = torch.einsum("bqc,bqxyz->bcxyz", class_probs.double(), torch.sigmoid(up))  # [B, C, X', Y', Z']
    top2 = scores.topk(2, dim=1).values
    differ = labels.cpu() != scores.argmax(dim=1)
    tolerance = 1e-5 * float(class_probs.double().sum(dim=1).max())
    assert bool(((top2[:, 0] - top2[:, 1])[differ] < tolerance).all()), "a label differs beyond a near-tie"
    return int(differ.sum())


@pytest.mark.parametrize("chunk_bytes", [None, 4096])  # the default; tiny chunks flush mid-sample
@pytest.mark.parametrize("method", ["bounded", "direct"])
@pytest.mark.parametrize(
    "preset,grid,out_size", [("nuscenes", (24, 24, 6), (93, 93, 24)), ("kitti", (20, 20, 8), (40, 40, 16))]
)
def test_cuda_labels_match_the_cpu_and_float64(preset, grid, out_size, method, chunk_bytes):
    probs, logits = structured_head_outputs(preset=preset, grid=grid, num_queries=40, batch_size=2, seed=5)
    on_cpu = occupancy_labels(probs, logits, out_size, method, chunk_bytes=chunk_bytes)
    on_cuda = occupancy_labels(probs.to(CUDA), logits.to(CUDA), out_size, method, chunk_bytes=chunk_bytes)
    assert on_cuda.device.type == CUDA.type and on_cuda.dtype == torch.int64
    assert near_tie_mismatches(on_cuda, probs, logits, out_size) <= on_cuda.numel() // 10_000
    assert int((on_cuda.cpu() != on_cpu).sum()) <= on_cuda.numel() // 10_000


def labels_and_growth(probs, logits, out_size, method="bounded", **options):
    peak = MemoryPeak()
    with measure_peak(CUDA, peak):
        labels = occupancy_labels(probs, logits, out_size, method, **options)
    return labels, peak.growth_mib * MiB


def test_nuscenes_size_chunks_and_peak_memory():
    """128x128x10 -> 512x512x40 with 100 queries: exact labels, memory bounded by the chunk size."""
    probs, logits = structured_head_outputs(preset="nuscenes", grid=(128, 128, 10), num_queries=100, seed=0)
    probs, logits = probs.to(CUDA), logits.to(CUDA)
    out_size = (512, 512, 40)
    dense_logits = 100 * 512 * 512 * 40 * 4  # the released inference's upsampled volume, 4.2 GB
    occupancy_labels(probs, logits, out_size)  # warm-up: one-time allocations (library workspaces)
    labels, default_growth = labels_and_growth(probs, logits, out_size)
    explicit, explicit_growth = labels_and_growth(probs, logits, out_size, chunk_bytes=256 * MiB)
    small, small_growth = labels_and_growth(probs, logits, out_size, chunk_bytes=16 * MiB)
    assert torch.equal(labels, explicit) and torch.equal(labels, small)  # chunks change work, not labels
    assert default_growth == pytest.approx(explicit_growth, rel=0.01)  # CUDA's default chunk: 256 MiB
    assert small_growth < explicit_growth < dense_logits / 2, (small_growth, explicit_growth)
    assert labels.numel() * 8 <= small_growth  # the int64 labels themselves are allocated in the call
    direct, direct_growth = labels_and_growth(probs, logits, out_size, "direct")
    assert direct_growth < dense_logits / 2
    assert int((direct != labels).sum()) <= labels.numel() // 100_000  # near-ties in float32 only
