"""Sparse 3D convolution behind one small interface, with two interchangeable backends.

:class:`SparseTensor` holds the active voxels of a batch of 3D grids; :class:`SubMConv3d`,
:class:`SparseConv3d` and :class:`SparseConvTranspose3d` convolve it. Every conv stores its weight in
spconv 2.x's layout ``[out, kx, ky, kz, in]`` whatever the backend, so checkpoints move between them.

Backends (``backend=`` of every conv, ``ModelConfig.sparse_backend`` for a whole model):

- ``"reference"``: pure PyTorch. Coordinates are hashed into a dense lookup table, each output gathers
  its neighbour per kernel offset, one matmul per chunk of outputs. Runs on any device and is the
  numerical oracle for spconv. Convs on the same index set with the same geometry share one
  neighbour table per forward (like spconv's ``indice_key``).
- ``"spconv"``: spconv 2.x, the fast GPU path. On CPU tensors two workarounds apply: spconv's backward
  asks CUDA for its current stream even for CPU data (it fails without a GPU; we answer "stream 0"
  when CUDA is unavailable), and its CPU kernels give wrong values for some voxels when torch runs
  more than one thread (we run them, forward and backward, with one thread and restore the count).
  spconv has no bfloat16 kernels: bfloat16 features run in float32 and come back as bfloat16.
- ``"auto"`` (default): spconv for CUDA tensors when importable, the reference backend otherwise.
  The CPU default is the reference backend because spconv's CPU build is neither faster nor safe
  there. Set ``SPOTOCC_DISABLE_SPCONV=1`` to never use spconv (a warning says so when it matters).

Both backends compute in the dtype of their input features, with autocast off inside the conv, so a
model under ``--amp`` gets the same dtypes from either.

Geometry (checked against dense ``conv3d`` / ``conv_transpose3d`` in the tests):

- submanifold: output sites = input sites; the kernel is centred (``padding`` is ignored, as in
  spconv); equals a dense conv with "same" padding read at the input sites.
- regular: output size ``(n + 2p - k) // s + 1``; output site ``o`` is active iff an active input lies
  at ``s*o - p + k`` for some kernel offset ``k``.
- transposed: output size ``(n - 1)*s - 2p + k``; input ``i`` writes to ``s*i - p + k`` (kept if inside
  the grid). New output coordinates are generated (not spconv's inverse conv).

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

SPARSE_BACKENDS = ("auto", "reference", "spconv")
DISABLE_SPCONV_ENV = "SPOTOCC_DISABLE_SPCONV"

# Elements of one gathered chunk (float32: 32 MiB); bounds the reference backend's extra memory.
_GATHER_CHUNK_ELEMENTS = 1 << 23
# Below this fraction of filled (row, offset) slots the reference backend scatters per offset instead
# of gathering a full neighbour row per output (measured: equal speed near 0.65 on a 2-core CPU).
_MIN_GATHER_FILL = 0.7

Int3 = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Int3:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (x, y, z), got {value}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The sparse tensor


@dataclass
class _IndexCache:
    """Neighbour tables computed for one index set; shared by tensors that have the same indices."""

    rulebooks: dict[tuple, _Rulebook] = field(default_factory=dict)


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
        _cache: _IndexCache | None = None,
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
        self._cache = _cache if _cache is not None else _IndexCache()

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
        """Zero-filled dense tensor [B, C, X, Y, Z] (channels first, contiguous)."""
        num_voxels = math.prod(self.spatial_shape)
        out = self.features.new_zeros(self.batch_size, self.features.shape[1], num_voxels)  # [B, C, XYZ]
        idx = self.indices.long()
        flat = _linear_keys(idx[:, 1:], self.spatial_shape)
        # batch and voxel index tensors around a slice: the indexed shape is [N, C]
        out[idx[:, 0], :, flat] = self.features
        return out.view(self.batch_size, -1, *self.spatial_shape)

    @property
    def num_active(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return (
            f"SparseTensor(active={self.num_active}, channels={self.features.shape[1]}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})"
        )


def _linear_keys(coords: Tensor, shape: Sequence[int], batch: Tensor | None = None) -> Tensor:
    """Row-major linear index of int64 coords [N, 3] in a grid of ``shape`` (optionally batched)."""
    key = (coords[:, 0] * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2]
    if batch is not None:
        key = key + batch * math.prod(shape)
    return key


# --------------------------------------------------------------------------------------------------
# Backend selection


_SPCONV_STATE: dict[str, Any] = {}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def spconv_disabled() -> bool:
    """True when the environment variable ``SPOTOCC_DISABLE_SPCONV`` is set to a true value."""
    return os.environ.get(DISABLE_SPCONV_ENV, "").strip().lower() not in ("", "0", "false", "no")


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("reference" or "spconv") that runs a conv on ``device`` for a requested backend."""
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
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
    cpu_build_on_cuda = module is not None and device.type == "cuda" and _SPCONV_STATE["cpu_only"]
    if backend == "spconv":
        if module is None:
            raise ImportError(
                "sparse_backend='spconv' but spconv 2.x does not import "
                f"({_SPCONV_STATE['error']}); install the spconv-cuXXX wheel matching your CUDA, "
                "or use sparse_backend='auto' / 'reference'"
            )
        if cpu_build_on_cuda:
            raise RuntimeError(
                "sparse_backend='spconv' on CUDA tensors, but the installed spconv is its CPU-only build; "
                "install the spconv-cuXXX wheel matching your CUDA (pip uninstall spconv first)"
            )
        return "spconv"
    if module is None or cpu_build_on_cuda:
        reason = _SPCONV_STATE.get("error") or "the installed spconv is its CPU-only build"
        _warn_once(
            "missing",
            f"spotocc: no CUDA spconv ({reason}); sparse convolutions on CUDA fall back to the pure-PyTorch "
            "reference backend, which is much slower. Install the spconv-cuXXX wheel matching your CUDA.",
        )
        return "reference"
    return "spconv"


# --------------------------------------------------------------------------------------------------
# Reference backend: neighbour tables


@dataclass
class _Rulebook:
    """Which input feeds which output through which kernel offset.

    ``neighbours[o, j]`` is the input row feeding output ``o`` through kernel offset ``offsets[j]``,
    or N (a zero row) if none. Only offsets with at least one pair are kept. For each offset an
    output has at most one input and an input at most one output, so the table inverts exactly.
    """

    out_indices: Tensor  # [M, 4] int32, row-major order
    out_shape: Int3
    num_inputs: int
    offsets: Tensor  # [K'] int64, flat positions in the kx, ky, kz kernel (kz fastest)
    neighbours: Tensor  # [M, K'] int32, N = missing
    num_pairs: int
    _inverse: Tensor | None = None
    _pairs: list[tuple[Tensor, Tensor]] | None = None

    @property
    def fill_out(self) -> float:
        """Fraction of filled slots of the [M, K'] output-major table."""
        slots = self.neighbours.numel()
        return self.num_pairs / slots if slots else 1.0

    @property
    def fill_in(self) -> float:
        """Fraction of filled slots of the [N, K'] input-major table (the backward's)."""
        slots = self.num_inputs * self.neighbours.shape[1]
        return self.num_pairs / slots if slots else 1.0

    def inverse(self) -> Tensor:
        """[N, K'] int32: the output row each input feeds through each offset, M = none."""
        if self._inverse is None:
            num_out, num_offsets = self.neighbours.shape
            device = self.neighbours.device
            inv = torch.full((self.num_inputs + 1, num_offsets), num_out, dtype=torch.int32, device=device)
            out_rows = (
                torch.arange(num_out, dtype=torch.int32, device=device)
                .unsqueeze(1)
                .expand_as(self.neighbours)
            )
            cols = torch.arange(num_offsets, device=device).expand_as(self.neighbours)
            # missing entries (N) all land in the extra row N, dropped below
            inv[self.neighbours, cols] = out_rows
            self._inverse = inv[: self.num_inputs]
        return self._inverse

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """Per kept offset: (input rows, output rows) of its pairs."""
        if self._pairs is None:
            self._pairs = []
            for j in range(self.neighbours.shape[1]):
                column = self.neighbours[:, j]
                out_rows = (column < self.num_inputs).nonzero().squeeze(1)
                self._pairs.append((column[out_rows], out_rows))
        return self._pairs


def _kernel_offsets(kernel: Int3, device: torch.device) -> Tensor:
    """[K, 3] int64 offsets (kx, ky, kz) in the order of the flattened weight (kz fastest)."""
    grids = torch.meshgrid(*(torch.arange(k, device=device) for k in kernel), indexing="ij")
    return torch.stack(grids, dim=-1).reshape(-1, 3)


def _decode_keys(keys: Tensor, shape: Int3) -> Tensor:
    """Inverse of batched :func:`_linear_keys`: int64 keys -> [M, 4] int32 (b, x, y, z)."""
    z = keys % shape[2]
    rest = keys // shape[2]
    y = rest % shape[1]
    rest = rest // shape[1]
    x = rest % shape[0]
    b = rest // shape[0]
    return torch.stack([b, x, y, z], dim=1).to(torch.int32)


def conv_output_shape(in_shape: Sequence[int], kernel: Int3, stride: Int3, padding: Int3, kind: str) -> Int3:
    """Spatial output size of a sparse conv of ``kind`` ("subm", "regular", "transposed")."""
    if kind == "subm":
        return tuple(in_shape)  # type: ignore[return-value]
    if kind == "transposed":
        out = tuple((n - 1) * s - 2 * p + k for n, k, s, p in zip(in_shape, kernel, stride, padding))
    else:
        out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_shape, kernel, stride, padding))
    if min(out) <= 0:
        raise ValueError(
            f"sparse conv ({kind}, kernel {kernel}, stride {stride}, padding {padding}) "
            f"maps spatial shape {tuple(in_shape)} to an empty grid {out}"
        )
    return out  # type: ignore[return-value]


def _check_indices(x: SparseTensor) -> None:
    """Out-of-range indices would silently read other voxels' rows from the lookup table."""
    if x.num_active == 0:
        return
    low = x.indices.amin(dim=0).tolist()
    high = x.indices.amax(dim=0).tolist()
    limits = (x.batch_size, *x.spatial_shape)
    if min(low) < 0 or any(h >= n for h, n in zip(high, limits)):
        raise ValueError(
            f"SparseTensor indices out of range: per-column min {low}, max {high} for batch_size "
            f"{x.batch_size} and spatial_shape {x.spatial_shape}"
        )


def _output_indices(
    x: SparseTensor, kernel: Int3, stride: Int3, padding: Int3, kind: str, out_shape: Int3
) -> Tensor:
    """[M, 4] int32 active output sites of a regular or transposed conv, in row-major order."""
    device = x.indices.device
    if kind == "regular" and all(p <= k // 2 for k, p in zip(kernel, padding)):
        # any active input in the window: a max-pool of the occupancy mask (spec 02 section 8)
        mask = x.features.new_zeros((x.batch_size, 1, *x.spatial_shape), dtype=torch.float32)
        idx = x.indices.long()
        mask[idx[:, 0], 0, idx[:, 1], idx[:, 2], idx[:, 3]] = 1.0
        pooled = F.max_pool3d(mask, kernel, stride, padding)  # [B, 1, *out_shape]
        return pooled[:, 0].nonzero().to(torch.int32)
    idx = x.indices.long()
    batch, coords = idx[:, 0], idx[:, 1:]
    stride_t, pad_t = torch.tensor(stride, device=device), torch.tensor(padding, device=device)
    out_size = torch.tensor(out_shape, device=device)
    occupied = torch.zeros(x.batch_size * math.prod(out_shape), dtype=torch.bool, device=device)
    for offset in _kernel_offsets(kernel, device):
        if kind == "transposed":
            out = coords * stride_t - pad_t + offset  # [N, 3]
            valid = ((out >= 0) & (out < out_size)).all(dim=1)
        else:
            num = coords + pad_t - offset  # s * out
            out = torch.div(num, stride_t, rounding_mode="floor")
            valid = ((num % stride_t == 0) & (out >= 0) & (out < out_size)).all(dim=1)
        occupied[_linear_keys(out[valid], out_shape, batch[valid])] = True
    return _decode_keys(occupied.nonzero().squeeze(1), out_shape)  # sorted keys = row-major


def _build_rulebook(x: SparseTensor, kernel: Int3, stride: Int3, padding: Int3, kind: str) -> _Rulebook:
    _check_indices(x)
    device = x.indices.device
    in_shape = x.spatial_shape
    out_shape = conv_output_shape(in_shape, kernel, stride, padding, kind)
    if kind == "subm":
        padding = tuple((k - 1) // 2 for k in kernel)  # type: ignore[assignment]
        out_indices = x.indices
    else:
        out_indices = _output_indices(x, kernel, stride, padding, kind, out_shape)
    num_in = x.num_active
    idx = x.indices.long()
    out_idx = out_indices.long()
    offsets = _kernel_offsets(kernel, device)  # [K, 3]

    if kind == "transposed":
        # input = (o + p - k) / s where divisible and inside the grid
        lookup = torch.full(
            (x.batch_size * math.prod(in_shape) + 1,), num_in, dtype=torch.int32, device=device
        )
        lookup[_linear_keys(idx[:, 1:], in_shape, idx[:, 0])] = torch.arange(
            num_in, dtype=torch.int32, device=device
        )
        stride_t, pad_t = torch.tensor(stride, device=device), torch.tensor(padding, device=device)
        in_size = torch.tensor(in_shape, device=device)
        columns = []
        for offset in offsets:
            num = out_idx[:, 1:] + pad_t - offset  # s * input
            src = torch.div(num, stride_t, rounding_mode="floor")
            valid = ((num % stride_t == 0) & (src >= 0) & (src < in_size)).all(dim=1)
            key = _linear_keys(src.clamp(min=0), in_shape, out_idx[:, 0])
            columns.append(lookup[torch.where(valid, key, lookup.shape[0] - 1)])
    else:
        # input = s * o - p + k lies in [-p, n + p - 1]: a lookup grid padded by p on each side (filled
        # with "missing") turns every offset into one constant shift of the linear key, no bounds checks
        padded = tuple(n + 2 * p for n, p in zip(in_shape, padding))
        lookup = torch.full((x.batch_size * math.prod(padded),), num_in, dtype=torch.int32, device=device)
        pad_t = torch.tensor(padding, device=device)
        lookup[_linear_keys(idx[:, 1:] + pad_t, padded, idx[:, 0])] = torch.arange(
            num_in, dtype=torch.int32, device=device
        )
        base = _linear_keys(
            out_idx[:, 1:] * torch.tensor(stride, device=device), padded, out_idx[:, 0]
        )  # [M]
        shifts = _linear_keys(offsets, padded).tolist()  # [K]
        columns = [lookup[base + shift] for shift in shifts]
    neighbours = torch.stack(columns, dim=1)  # [M, K]
    per_offset = (neighbours < num_in).sum(dim=0)
    keep = (per_offset > 0).nonzero().squeeze(1)
    return _Rulebook(
        out_indices=out_indices,
        out_shape=out_shape,
        num_inputs=num_in,
        offsets=keep,
        neighbours=neighbours[:, keep].contiguous(),
        num_pairs=int(per_offset.sum()),
    )


def _chunks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, _GATHER_CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _gather_matmul(source: Tensor, table: Tensor, weight: Tensor, out: Tensor) -> None:
    """out[r] = concat_k source_padded[table[r, k]] @ weight, chunked (implicit GEMM).

    source: [S, C]; table: [R, K'] rows into source, S = a zero row; weight: [K' * C, C_out].
    """
    padded = torch.cat([source, source.new_zeros(1, source.shape[1])])  # [S + 1, C]
    for start, stop in _chunks(table.shape[0], table.shape[1] * source.shape[1]):
        gathered = padded.index_select(0, table[start:stop].reshape(-1))  # [r * K', C]
        torch.mm(gathered.view(stop - start, -1), weight, out=out[start:stop])


class _ReferenceConvFunction(torch.autograd.Function):
    """Sparse conv over a rulebook; saves only its inputs and the tables (never gathered copies).

    Each direction picks its strategy from how full its table is: a dense neighbour table gathers
    one [rows, K' * C] block per chunk and runs one GEMM (fast when most slots are filled, e.g.
    submanifold convs on a compact active set); a sparse one gathers, multiplies and scatter-adds
    offset by offset, touching only real pairs (strided convs' backward, transposed convs).
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, rulebook: _Rulebook) -> Tensor:
        # features: [N, C_in]; weight: [C_out, kx, ky, kz, C_in] (saved as is: no per-conv copy kept)
        weight_kio = _offset_major(weight, rulebook)  # [K', C_in, C_out]
        num_offsets, c_in, c_out = weight_kio.shape
        num_out = rulebook.neighbours.shape[0]
        if rulebook.fill_out >= _MIN_GATHER_FILL:
            out = features.new_empty(num_out, c_out)
            _gather_matmul(features, rulebook.neighbours, weight_kio.reshape(num_offsets * c_in, c_out), out)
        else:
            out = features.new_zeros(num_out, c_out)
            for k, (in_rows, out_rows) in enumerate(rulebook.pairs()):
                out.index_add_(0, out_rows, features.index_select(0, in_rows) @ weight_kio[k])
        ctx.save_for_backward(features, weight)
        ctx.rulebook = rulebook
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        features, weight = ctx.saved_tensors
        rulebook: _Rulebook = ctx.rulebook
        weight_kio = _offset_major(weight, rulebook)
        num_offsets, c_in, c_out = weight_kio.shape
        grad_out = grad_out.contiguous()
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            if rulebook.fill_in >= _MIN_GATHER_FILL:
                grad_features = features.new_empty(features.shape)
                w_t = weight_kio.transpose(1, 2).reshape(num_offsets * c_out, c_in)
                _gather_matmul(grad_out, rulebook.inverse(), w_t, grad_features)
            else:
                grad_features = features.new_zeros(features.shape)
                for k, (in_rows, out_rows) in enumerate(rulebook.pairs()):
                    grad_features.index_add_(0, in_rows, grad_out.index_select(0, out_rows) @ weight_kio[k].T)
        if ctx.needs_input_grad[1]:
            if rulebook.fill_out >= _MIN_GATHER_FILL:
                nbr = rulebook.neighbours
                padded = torch.cat([features, features.new_zeros(1, c_in)])  # [N + 1, C_in]
                grad_weight = weight_kio.new_zeros(num_offsets * c_in, c_out)
                for start, stop in _chunks(nbr.shape[0], num_offsets * c_in):
                    gathered = padded.index_select(0, nbr[start:stop].reshape(-1)).view(stop - start, -1)
                    grad_weight.addmm_(gathered.T, grad_out[start:stop])
                grad_weight = grad_weight.view(num_offsets, c_in, c_out)
            else:
                grad_weight = weight_kio.new_empty(weight_kio.shape)
                for k, (in_rows, out_rows) in enumerate(rulebook.pairs()):
                    torch.mm(
                        features.index_select(0, in_rows).T,
                        grad_out.index_select(0, out_rows),
                        out=grad_weight[k],
                    )
            # back to [C_out, kx, ky, kz, C_in]; offsets without pairs get zero
            full = weight.new_zeros(c_out, weight[0].numel() // c_in, c_in)
            full[:, rulebook.offsets] = grad_weight.permute(2, 0, 1)
            grad_weight = full.view(weight.shape)
        return grad_features, grad_weight, None


def _offset_major(weight: Tensor, rulebook: _Rulebook) -> Tensor:
    """[C_out, kx, ky, kz, C_in] -> [K', C_in, C_out] for the rulebook's kept offsets (a copy)."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    return weight.reshape(c_out, -1, c_in)[:, rulebook.offsets].permute(1, 2, 0).contiguous()


def _autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (a sparse conv runs in its features' dtype)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def _reference_conv(
    x: SparseTensor, weight: Tensor, kernel: Int3, stride: Int3, padding: Int3, kind: str
) -> SparseTensor:
    key = (kind, kernel, stride, padding)
    rulebook = x._cache.rulebooks.get(key)
    if rulebook is None:
        rulebook = _build_rulebook(x, kernel, stride, padding, kind)
        x._cache.rulebooks[key] = rulebook
    with _autocast_off(x.features.device):  # the features' dtype, as in the spconv backend
        out = _ReferenceConvFunction.apply(x.features, weight.to(x.features.dtype), rulebook)
    cache = x._cache if kind == "subm" else None
    return SparseTensor(out, rulebook.out_indices, rulebook.out_shape, x.batch_size, _cache=cache)


# --------------------------------------------------------------------------------------------------
# spconv backend


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


def _spconv_conv(
    x: SparseTensor, weight: Tensor, kernel: Int3, stride: Int3, padding: Int3, kind: str
) -> SparseTensor:
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
        with _autocast_off(f.device):
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
    cache = x._cache if kind == "subm" else None
    return SparseTensor(out_features, out_indices, out_shape[0], x.batch_size, _cache=cache)


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
            # spconv's hash tables are not written for an empty input; the reference handles it
            if backend == "spconv" and x.num_active > 0:
                out = _spconv_conv(x, self.weight, self.kernel_size, self.stride, self.padding, self.kind)
            else:
                out = _reference_conv(x, self.weight, self.kernel_size, self.stride, self.padding, self.kind)
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
    """Switch every sparse conv inside ``model`` to ``backend`` ("auto", "reference", "spconv")."""
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, _SparseConv3d):
            module.backend = backend
