"""Sparse 3D convolution behind one small interface, with two interchangeable backends.

:class:`SparseTensor` holds the active voxels of a batch of 3D grids; :class:`SubMConv3d`,
:class:`SparseConv3d` and :class:`SparseConvTranspose3d` convolve it. Every conv stores its weight in
spconv 2.x's layout ``[out, kx, ky, kz, in]`` whatever the backend, so checkpoints move between them.

Backends (``backend=`` of every conv, ``ModelConfig.sparse_backend`` for a whole model):

- ``"reference"`` (:mod:`.reference`): pure PyTorch, any device, the numerical oracle for spconv.
- ``"spconv"`` (:mod:`.spconv_backend`): spconv 2.x, the fast GPU path (with CPU workarounds).
- ``"dense"`` (:mod:`.dense_backend`): ``conv3d`` on the zero-filled grid, read at the active sites;
  for mostly active grids (``synthetic_tiny``). Never chosen by ``"auto"``.
- ``"auto"`` (default): spconv for CUDA tensors when importable, the reference backend otherwise.
  The CPU default is the reference backend because spconv's CPU build is neither faster nor safe
  there. Set ``SPOTOCC_DISABLE_SPCONV=1`` to never use spconv (a warning says so when it matters).

All backends compute in the dtype of their input features, with autocast off inside the conv, so a
model under ``--amp`` gets the same dtypes from either.

spconv 1x1 quirk, reproduced in both backends: when the kernel volume is 1 (submanifold, or any conv
with stride 1) spconv computes ``features @ W.view(in, out)``: it reinterprets the contiguous
``[out, 1, 1, 1, in]`` buffer as an ``[in, out]`` matrix instead of transposing it (spconv issue
#450). Released checkpoints were trained with this, so a loaded 1x1 weight means the same thing in
both backends here; the equivalent ``nn.Linear`` weight is ``W.reshape(in, out).T``. 1x1 convs never
reach spconv: both backends run the same ``features @ W.reshape(in, out)`` (tested equal to spconv's
own result), so their meaning cannot change with the installed spconv version.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spotocc.models.sparse import spconv_backend
from spotocc.models.sparse.dense_backend import dense_conv
from spotocc.models.sparse.reference import IndexCache, Int3, linear_keys, reference_conv
from spotocc.models.sparse.spconv_backend import (  # noqa: F401  (re-exported: imported from here)
    _SPCONV_STATE,
    load_spconv,
    spconv_conv,
)

SPARSE_BACKENDS = ("auto", "reference", "spconv", "dense")
DISABLE_SPCONV_ENV = "SPOTOCC_DISABLE_SPCONV"


def _triple(value: int | Sequence[int], name: str) -> Int3:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (x, y, z), got {value}")
    return value  # type: ignore[return-value]


class SparseTensor:
    """Active voxels of ``batch_size`` 3D grids of ``spatial_shape`` (X, Y, Z).

    features: [N, C]; indices: [N, 4] int32 contiguous rows (b, x, y, z), unique. Treat instances as
    immutable: :meth:`replace_feature` makes a new tensor on the same indices.
    """

    def __init__(
        self,
        features: Tensor,
        indices: Tensor,
        spatial_shape: Sequence[int],
        batch_size: int,
        *,
        _cache: IndexCache | None = None,
    ) -> None:
        if features.dim() != 2:
            raise ValueError(f"SparseTensor: features must be [N, C], got shape {tuple(features.shape)}")
        if indices.dim() != 2 or indices.shape[1] != 4:
            raise ValueError(f"SparseTensor: indices must be [N, 4] (b, x, y, z), got {tuple(indices.shape)}")
        if indices.shape[0] != features.shape[0]:
            raise ValueError(
                f"SparseTensor: {features.shape[0]} feature rows but {indices.shape[0]} index rows"
            )
        if indices.dtype != torch.int32:
            if indices.dtype.is_floating_point:
                raise ValueError(f"SparseTensor: indices must be integers, got {indices.dtype}")
            indices = indices.to(torch.int32)
        # spconv silently builds wrong active sets from non-contiguous indices (spec 02 section 5.8)
        self.indices = indices.contiguous()
        self.features = features
        self.spatial_shape: Int3 = _triple(spatial_shape, "spatial_shape")
        self.batch_size = int(batch_size)
        self._cache = _cache if _cache is not None else IndexCache()

    @classmethod
    def from_dense(cls, volume: Tensor) -> SparseTensor:
        """Voxels of ``volume`` [B, C, X, Y, Z] whose L1 norm over channels is non-zero (exact test).

        Indices come in row-major (b, x, y, z) order (z fastest), features in the same order; the
        batch size is the real one.
        """
        if volume.dim() != 5:
            raise ValueError(f"SparseTensor.from_dense: expected [B, C, X, Y, Z], got {tuple(volume.shape)}")
        batch_size, channels = volume.shape[:2]
        active = volume.abs().sum(dim=1) != 0  # [B, X, Y, Z]
        indices = active.nonzero().to(torch.int32)  # [N, 4], row-major order
        features = volume.permute(0, 2, 3, 4, 1)[active]  # [N, C], same order
        return cls(features.reshape(-1, channels), indices, volume.shape[2:], batch_size)

    def replace_feature(self, features: Tensor) -> SparseTensor:
        """The same active set with new features [N, C'] (shares the cached neighbour tables)."""
        if features.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"replace_feature: got {features.shape[0]} rows for {self.features.shape[0]} active voxels"
            )
        return SparseTensor(features, self.indices, self.spatial_shape, self.batch_size, _cache=self._cache)

    def dense(self) -> Tensor:
        """Zero-filled dense tensor [B, C, X, Y, Z] (channels first, contiguous).

        ``index_copy`` into a channels-last grid: its backward is a gather, much faster on the CPU than
        that of advanced-index assignment (a sorting ``index_put``)."""
        channels = self.features.shape[1]
        idx = self.indices.long()
        rows = linear_keys(idx[:, 1:], self.spatial_shape, batch=idx[:, 0])  # [N]
        grid = self.features.new_zeros(self.batch_size * math.prod(self.spatial_shape), channels)
        grid = grid.index_copy(0, rows, self.features)  # [B*X*Y*Z, C]
        return grid.view(self.batch_size, *self.spatial_shape, channels).permute(0, 4, 1, 2, 3).contiguous()

    @property
    def num_active(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return (
            f"SparseTensor(active={self.num_active}, channels={self.features.shape[1]}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})"
        )


# --------------------------------------------------------------------------------------------------
# Backend selection


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def spconv_disabled() -> bool:
    """True when the environment variable ``SPOTOCC_DISABLE_SPCONV`` is set to a true value."""
    return os.environ.get(DISABLE_SPCONV_ENV, "").strip().lower() not in ("", "0", "false", "no")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("reference", "spconv" or "dense") that runs a conv on ``device`` for a requested one."""
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    if backend in ("reference", "dense"):
        return backend
    if spconv_disabled():
        if backend == "spconv" or device.type == "cuda":
            _warn_once(
                "disabled",
                f"spotocc: spconv is disabled by {DISABLE_SPCONV_ENV}; sparse convolutions use the "
                "pure-PyTorch reference backend, which is much slower on GPU.",
            )
        return "reference"
    if backend == "auto" and device.type != "cuda":
        return "reference"  # spconv's CPU build is no faster and races with >1 thread
    module = load_spconv()
    state = spconv_backend._SPCONV_STATE  # looked up here, so that tests may replace it
    cpu_build_on_cuda = module is not None and device.type == "cuda" and state["cpu_only"]
    if backend == "spconv":
        if module is None:
            raise ImportError(
                "sparse_backend='spconv' but spconv 2.x does not import "
                f"({state['error']}); install the spconv-cuXXX wheel matching your CUDA, "
                "or use sparse_backend='auto' / 'reference'"
            )
        if cpu_build_on_cuda:
            raise RuntimeError(
                "sparse_backend='spconv' on CUDA tensors, but the installed spconv is its CPU-only build; "
                "install the spconv-cuXXX wheel matching your CUDA (pip uninstall spconv first)"
            )
        return "spconv"
    if module is None or cpu_build_on_cuda:
        reason = state.get("error") or "the installed spconv is its CPU-only build"
        _warn_once(
            "missing",
            f"spotocc: no CUDA spconv ({reason}); sparse convolutions on CUDA fall back to the pure-PyTorch "
            "reference backend, which is much slower. Install the spconv-cuXXX wheel matching your CUDA.",
        )
        return "reference"
    return "spconv"


# --------------------------------------------------------------------------------------------------
# Modules


class SparseModule(nn.Module):
    """Marker base class: a module whose forward takes and returns a :class:`SparseTensor`."""


class _SparseConv3d(SparseModule):
    kind = "regular"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in SPARSE_BACKENDS:
            raise ValueError(
                f"{type(self).__name__}: backend must be one of {SPARSE_BACKENDS}, got {backend!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        self.padding = _triple(padding, "padding")
        self.backend = backend
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: invalid kernel {self.kernel_size} / stride {self.stride} / "
                f"padding {self.padding}"
            )
        # spconv's fast path for kernel volume 1 (see the module docstring for its weight quirk)
        self.is_1x1 = math.prod(self.kernel_size) == 1 and (
            self.kind == "subm" or math.prod(self.stride) == 1
        )
        if self.is_1x1 and self.kind != "subm" and self.padding != (0, 0, 0):
            raise ValueError(
                f"{type(self).__name__}: a 1x1x1 conv with stride 1 must have padding 0 (as spconv)"
            )
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """spconv's default: kaiming-uniform (a=sqrt(5)) with fan_in = in * kernel volume."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.features.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.in_channels} input channels, "
                f"got {x.features.shape[1]}"
            )
        if self.is_1x1:
            # features @ W.view(in, out): spconv's reinterpretation, not a transpose (spconv #450)
            w = self.weight.to(x.features.dtype).reshape(self.in_channels, self.out_channels)
            out = x.replace_feature(x.features @ w)
        else:
            backend = resolve_backend(self.backend, x.features.device)
            if backend == "dense":
                conv = dense_conv
            elif backend == "spconv" and x.num_active > 0:
                conv = spconv_conv
            else:  # spconv's hash tables are not written for an empty input; the reference handles it
                conv = reference_conv
            features, indices, shape = conv(
                x, self.weight, self.kernel_size, self.stride, self.padding, self.kind
            )
            # submanifold outputs keep the input's sites, so they share its cached neighbour tables
            cache = x._cache if self.kind == "subm" else None
            out = SparseTensor(features, indices, shape, x.batch_size, _cache=cache)
        if self.bias is not None:
            out = out.replace_feature(out.features + self.bias.to(out.features.dtype))
        return out

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.bias is None:
            s += ", bias=False"
        return s + f", backend={self.backend!r}"


class SubMConv3d(_SparseConv3d):
    """Submanifold conv: outputs only at the input's active sites, kernel centred (odd sizes)."""

    kind = "subm"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        if _triple(stride, "stride") != (1, 1, 1):
            raise ValueError(f"SubMConv3d: stride must be 1, got {stride}")
        if any(k % 2 == 0 for k in _triple(kernel_size, "kernel_size")):
            raise ValueError(f"SubMConv3d: kernel sizes must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, backend)


class SparseConv3d(_SparseConv3d):
    """Regular sparse conv: an output site is active iff its receptive field holds an active input."""

    kind = "regular"


class SparseConvTranspose3d(_SparseConv3d):
    """Transposed sparse conv generating new output sites ``stride * i - padding + k``."""

    kind = "transposed"


class SparseSequential(nn.Sequential, SparseModule):
    """Sequential over a :class:`SparseTensor`: sparse modules see the tensor, others its features.

    Feature-wise modules (norms, activations) are skipped on an empty tensor, as in spconv.
    """

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        for module in self:
            x = apply_to_features(module, x)
        return x


def apply_to_features(module: nn.Module, x: SparseTensor) -> SparseTensor:
    """``module(x)`` for a :class:`SparseModule`, else ``module`` applied to the [N, C] features."""
    if isinstance(module, SparseModule):
        return module(x)
    if x.num_active == 0:
        return x
    return x.replace_feature(module(x.features))


def set_sparse_backend(model: nn.Module, backend: str) -> None:
    """Switch every sparse conv inside ``model`` to ``backend`` (one of ``SPARSE_BACKENDS``)."""
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, _SparseConv3d):
            module.backend = backend
