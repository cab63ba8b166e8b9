"""How many output voxels spconv's CPU build gets wrong with 2 torch threads, with and without the guard.

"raw" calls spconv directly (no thread guard); "spotocc" goes through
``spotocc.models.sparse.spconv_backend``, which runs spconv's forward and backward on one torch
thread. Both are compared with the reference backend (float32, an output voxel is wrong if any
channel is off by more than 1e-3); forward outputs and the gradient w.r.t. the input features are checked.

    python benchmarks/spconv_threads.py
"""

from __future__ import annotations

import torch

from spotocc.models.sparse.conv import (
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    SubMConv3d,
    set_sparse_backend,
)
from spotocc.models.sparse.spconv_backend import load_spconv

CASES = {
    "subm 3x3x3": SubMConv3d(32, 32, 3, padding=1, bias=False),
    "regular 3x3x1": SparseConv3d(32, 32, (3, 3, 1), padding=(1, 1, 0), bias=False),
    "strided k3 s2 p1": SparseConv3d(32, 32, 3, stride=2, padding=1, bias=False),
    "transposed 223": SparseConvTranspose3d(32, 32, (2, 2, 3), stride=2, padding=(0, 0, 1), bias=False),
}


def run(conv, volume, backend: str):
    """(dense output, input-feature gradient) for one backend; "raw" = spconv without the guard."""
    volume = volume.clone().requires_grad_()
    x = SparseTensor.from_dense(volume)
    if backend == "raw":
        spconv = load_spconv()
        from spconv.pytorch.conv import SparseConvolutionBase

        spec = SparseConvolutionBase(
            3, 32, 32, conv.kernel_size, conv.stride, conv.padding, 1, 1, bias=False,
            subm=conv.kind == "subm", transposed=conv.kind == "transposed",
        )  # fmt: skip
        sp_in = spconv.SparseConvTensor(x.features, x.indices, list(x.spatial_shape), x.batch_size)
        sp_out = spec._conv_forward(True, sp_in, conv.weight, None)
        out_shape = tuple(int(s) for s in sp_out.spatial_shape)
        y = SparseTensor(sp_out.features, sp_out.indices, out_shape, x.batch_size)
    else:
        set_sparse_backend(conv, backend)
        y = conv(x)
    dense = y.dense()
    (dense * torch.linspace(-1, 1, dense.numel()).view_as(dense)).sum().backward()
    return dense.detach(), volume.grad


def wrong_voxels(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(((a - b).abs().amax(dim=1) > 1e-3).sum())


def main() -> None:
    torch.manual_seed(0)
    volume = torch.randn(2, 32, 48, 48, 10) * (torch.rand(2, 1, 48, 48, 10) < 0.4)
    torch.set_num_threads(2)
    print(f"input: {int((volume.abs().sum(1) != 0).sum())} active voxels, torch threads = 2; 5 calls each")
    for name, conv in CASES.items():
        ref = run(conv, volume, "reference")
        for backend in ("raw", "spconv"):
            fwd, bwd = [], []
            for _ in range(5):
                out, grad = run(conv, volume, backend)
                fwd.append(wrong_voxels(out, ref[0]))
                bwd.append(wrong_voxels(grad, ref[1]))
            label = "spconv, no guard " if backend == "raw" else "spotocc's guard  "
            print(f"{name:18s} {label} wrong output voxels {fwd}  wrong input-grad voxels {bwd}")
        assert torch.get_num_threads() == 2


if __name__ == "__main__":
    main()
