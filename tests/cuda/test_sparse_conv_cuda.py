"""Sparse convs on CUDA, spconv and the reference backend, against the reference backend in float64 on CPU.

Every conv kind (submanifold, strided, transposed), forward and backward (input, weight and bias
gradients), in float32, in float32 under bf16 / fp16 autocast (the conv keeps its features' dtype),
and with float16 / bfloat16 features (spconv runs bfloat16 in float32).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from cuda_support import CUDA_ONLY, require_spconv_cuda

from spotocc.models.sparse import (
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    SubMConv3d,
    set_sparse_backend,
)

pytestmark = CUDA_ONLY

CASES = {
    "submanifold": (SubMConv3d, dict(kernel_size=3, padding=1)),
    "strided": (SparseConv3d, dict(kernel_size=3, stride=2, padding=1)),
    "strided anisotropic": (SparseConv3d, dict(kernel_size=(3, 3, 2), stride=(2, 2, 1), padding=(1, 1, 0))),
    "transposed": (SparseConvTranspose3d, dict(kernel_size=2, stride=2)),
}
# mode -> (features dtype, autocast dtype or None, largest error relative to the float64 maximum)
MODES = {
    "float32": (torch.float32, None, 1e-4),
    "float32 under bf16 autocast": (torch.float32, torch.bfloat16, 1e-4),
    "float32 under fp16 autocast": (torch.float32, torch.float16, 1e-4),
    "float16": (torch.float16, None, 1e-2),
    "bfloat16": (torch.bfloat16, None, 4e-2),
}
CHANNELS_IN, CHANNELS_OUT = 16, 24


def random_volume(seed: int = 0) -> torch.Tensor:
    """[2, C, 24, 20, 12] float64: features on about 15% of the sites, exact zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(2, 1, 24, 20, 12, generator=gen) < 0.15
    return torch.randn(2, CHANNELS_IN, 24, 20, 12, generator=gen, dtype=torch.float64) * active


def run_conv(conv, backend: str, volume, probe, device, dtype, autocast_dtype=None):
    """Dense output, grads of input / weight / bias (float64, CPU) and the active sites of ``conv``."""
    set_sparse_backend(conv, backend)
    conv.zero_grad(set_to_none=True)
    vol = volume.to(device=device, dtype=dtype, copy=True).requires_grad_()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        out = conv(SparseTensor.from_dense(vol))
    assert out.features.dtype == dtype  # the conv computes in its features' dtype
    dense = out.dense()  # [B, C, X', Y', Z']
    (dense.double() * probe.to(device)).sum().backward()
    sites = {tuple(i) for i in out.indices.cpu().tolist()}
    grads = [t.detach().double().cpu() for t in (vol.grad, conv.weight.grad, conv.bias.grad)]
    return [dense.detach().double().cpu(), *grads], sites


def oracle(case: str, seed: int = 0):
    """(conv on CPU in float64, input volume, probe, reference results in float64)."""
    cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    conv = cls(CHANNELS_IN, CHANNELS_OUT, **kwargs).double()
    volume = random_volume(seed)
    with torch.no_grad():
        shape = conv(SparseTensor.from_dense(volume)).dense().shape
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    expected, sites = run_conv(conv, "reference", volume, probe, torch.device("cpu"), torch.float64)
    return conv, volume, probe, expected, sites


def relative_errors(got, expected) -> dict[str, float]:
    names = ("forward", "input grad", "weight grad", "bias grad")
    return {n: float((g - e).abs().max() / e.abs().max()) for n, g, e in zip(names, got, expected)}


def check_backend(backend: str, case: str, mode: str, device: torch.device) -> dict[str, float]:
    dtype, autocast_dtype, tolerance = MODES[mode]
    conv, volume, probe, expected, sites = oracle(case)
    conv = conv.float().to(device)
    got, got_sites = run_conv(conv, backend, volume, probe, device, dtype, autocast_dtype)
    assert got_sites == sites, f"{len(sites ^ got_sites)} active sites differ"
    errors = relative_errors(got, expected)
    assert max(errors.values()) <= tolerance, errors
    return errors


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["spconv", "reference"])
def test_conv_on_cuda_matches_float64(backend, case, mode):
    if backend == "spconv":
        require_spconv_cuda()
    check_backend(backend, case, mode, torch.device("cuda"))


@pytest.mark.parametrize("case", list(CASES))
def test_spconv_cuda_equals_the_reference_backend_on_cuda(case):
    """Same device, same float32 input: the two backends agree to float32 rounding."""
    require_spconv_cuda()
    device = torch.device("cuda")
    conv, volume, probe, _, _ = oracle(case, seed=1)
    conv = conv.float().to(device)
    spconv_out, spconv_sites = run_conv(conv, "spconv", volume, probe, device, torch.float32)
    reference_out, reference_sites = run_conv(conv, "reference", volume, probe, device, torch.float32)
    assert spconv_sites == reference_sites
    errors = relative_errors(spconv_out, reference_out)
    assert max(errors.values()) <= 1e-5, errors
