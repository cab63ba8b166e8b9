"""The spconv 2.x backend of the sparse convs: the fast GPU path.

spconv's own module logic (its 1x1 path included) runs each conv from a parameter-free description.
On CPU tensors two workarounds apply: spconv's backward asks CUDA for its current stream even for CPU
data (it fails without a GPU; we answer "stream 0" when CUDA is unavailable), and its CPU kernels give
wrong values for some voxels when torch runs more than one thread (we run them, forward and backward,
with one thread and restore the count). spconv has no bfloat16 kernels: bfloat16 features run in
float32 and come back as bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from spotocc.models.sparse.reference import Int3, autocast_off

if TYPE_CHECKING:
    from spotocc.models.sparse.conv import SparseTensor

# "module": spconv.pytorch or None; "error": why it did not import; "cpu_only": its CPU-only build
_SPCONV_STATE: dict[str, Any] = {}


def load_spconv() -> Any | None:
    """``spconv.pytorch`` if it imports (with the CPU backward workaround installed), else None."""
    if "module" not in _SPCONV_STATE:
        try:
            import spconv.pytorch as spconv_pytorch
            from spconv.cppconstants import CPU_ONLY_BUILD
            from spconv.pytorch import ops as spconv_ops
            from spconv.pytorch.conv import SparseConvolutionBase  # noqa: F401  (needs spconv >= 2.3)
        except Exception as err:  # noqa: BLE001  (a broken CUDA wheel raises more than ImportError)
            _SPCONV_STATE["module"] = None
            _SPCONV_STATE["error"] = f"{type(err).__name__}: {err}"
        else:
            _install_cpu_stream_workaround(spconv_ops)
            _SPCONV_STATE["module"] = spconv_pytorch
            _SPCONV_STATE["cpu_only"] = bool(CPU_ONLY_BUILD)
    return _SPCONV_STATE["module"]


def _install_cpu_stream_workaround(spconv_ops: Any) -> None:
    """spconv's backward calls ``torch.cuda.current_stream()`` before branching on CPU data.

    On a machine without CUDA that call raises, so answer the (unused) stream handle 0 there. With
    CUDA available the original function runs unchanged.
    """
    original = spconv_ops.get_current_stream
    if getattr(original, "_spotocc_patched", False):
        return

    def get_current_stream() -> int:
        if not torch.cuda.is_available():
            return 0
        return original()

    get_current_stream._spotocc_patched = True  # type: ignore[attr-defined]
    spconv_ops.get_current_stream = get_current_stream


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the body with one torch CPU thread, restoring the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _OneThreadFunction(torch.autograd.Function):
    """Runs a differentiable call with one torch thread in forward AND backward.

    The call's own graph is recorded inside and replayed in backward (as reentrant checkpointing
    does), because a thread guard around the caller's forward would not cover autograd's backward.
    """

    @staticmethod
    def forward(
        ctx, call: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], features: Tensor, weight: Tensor
    ):
        with torch.enable_grad(), single_torch_thread():
            inner_features = features.detach().requires_grad_()
            inner_weight = weight.detach().requires_grad_()
            out_features, out_indices = call(inner_features, inner_weight)
        ctx.graph = (inner_features, inner_weight, out_features)
        ctx.mark_non_differentiable(out_indices)
        return out_features.detach(), out_indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_features: Tensor, _grad_indices: Tensor | None):
        inner_features, inner_weight, out_features = ctx.graph
        with single_torch_thread():
            grads = torch.autograd.grad(
                out_features, (inner_features, inner_weight), grad_features, allow_unused=True
            )
        del ctx.graph
        return None, grads[0], grads[1]


def spconv_conv(
    x: SparseTensor, weight: Tensor, kernel: Int3, stride: Int3, padding: Int3, kind: str
) -> tuple[Tensor, Tensor, Int3]:
    """Output (features [M, C_out], indices [M, 4], spatial shape) of one conv of ``kind`` on ``x``."""
    spconv_pytorch = load_spconv()
    from spconv import constants as spconv_constants
    from spconv.pytorch.conv import SparseConvolutionBase

    c_out, c_in = weight.shape[0], weight.shape[-1]
    # a parameter-free description of the conv; spconv's own module logic (incl. the 1x1 path) runs it.
    # Bias is added by the caller: spconv's CPU build rejects a bias at inference.
    spec = SparseConvolutionBase(
        3,
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        1,
        1,
        bias=False,
        subm=kind == "subm",
        transposed=kind == "transposed",
    )
    spatial_shape = list(x.spatial_shape)
    features = x.features.contiguous()
    # Like the reference backend, compute in the features' dtype whatever autocast says (spconv's own
    # torch ops under autocast mix dtypes and fail), but in float32 for bfloat16 features: spconv has no
    # bfloat16 kernels (a KeyError deep inside, spconv issue #673), so `--amp bf16` would not run.
    out_dtype = features.dtype
    compute_dtype = torch.float32 if out_dtype == torch.bfloat16 else out_dtype
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    out_shape: list[Int3] = []

    def call(f: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_off(f.device):
            f, w = f.to(compute_dtype), w.to(compute_dtype)
            sp_in = spconv_pytorch.SparseConvTensor(f, x.indices, spatial_shape, x.batch_size)
            sp_out = spec._conv_forward(needs_grad, sp_in, w, None)
            out_shape.append(tuple(int(s) for s in sp_out.spatial_shape))
            return sp_out.features.to(out_dtype), sp_out.indices

    if features.is_cuda:
        # spconv's GEMMs follow torch's TF32 switch, as the reference backend's torch.mm does
        spconv_constants.SPCONV_ALLOW_TF32 = torch.backends.cuda.matmul.allow_tf32
        out_features, out_indices = call(features, weight)
    elif needs_grad:
        out_features, out_indices = _OneThreadFunction.apply(call, features, weight)
    else:
        with single_torch_thread():
            out_features, out_indices = call(features, weight)
    return out_features, out_indices, out_shape[0]
