"""The pure-PyTorch reference backend of the sparse convs: runs on any device, the oracle for spconv.

Coordinates are hashed into a dense lookup table and each output gathers its neighbour per kernel
offset (a "rulebook"); one matmul per chunk of outputs. Convs on the same index set with the same
geometry share one rulebook per forward (like spconv's ``indice_key``), cached on the input tensor.

Geometry (checked against dense ``conv3d`` / ``conv_transpose3d`` in the tests):

- submanifold: output sites = input sites; the kernel is centred (``padding`` is ignored, as in
  spconv); equals a dense conv with "same" padding read at the input sites.
- regular: output size ``(n + 2p - k) // s + 1``; output site ``o`` is active iff an active input lies
  at ``s*o - p + k`` for some kernel offset ``k``.
- transposed: output size ``(n - 1)*s - 2p + k``; input ``i`` writes to ``s*i - p + k`` (kept if inside
  the grid). New output coordinates are generated (not spconv's inverse conv).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from spotocc.models.sparse.conv import SparseTensor

# Elements of one gathered chunk (float32: 32 MiB); bounds the reference backend's extra memory.
_GATHER_CHUNK_ELEMENTS = 1 << 23
# Below this fraction of filled (row, offset) slots the reference backend scatters per offset instead
# of gathering a full neighbour row per output (measured: equal speed near 0.65 on a 2-core CPU).
_MIN_GATHER_FILL = 0.7

Int3 = tuple[int, int, int]


@dataclass
class IndexCache:
    """Rulebooks computed for one index set; shared by tensors that have the same indices."""

    rulebooks: dict[tuple, _Rulebook] = field(default_factory=dict)


def linear_keys(coords: Tensor, shape: Sequence[int], batch: Tensor | None = None) -> Tensor:
    """Row-major linear index of int64 coords [N, 3] in a grid of ``shape`` (optionally batched)."""
    key = (coords[:, 0] * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2]
    if batch is not None:
        key = key + batch * math.prod(shape)
    return key


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
    """Inverse of batched :func:`linear_keys`: int64 keys -> [M, 4] int32 (b, x, y, z)."""
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
        occupied[linear_keys(out[valid], out_shape, batch[valid])] = True
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
        lookup[linear_keys(idx[:, 1:], in_shape, idx[:, 0])] = torch.arange(
            num_in, dtype=torch.int32, device=device
        )
        stride_t, pad_t = torch.tensor(stride, device=device), torch.tensor(padding, device=device)
        in_size = torch.tensor(in_shape, device=device)
        columns = []
        for offset in offsets:
            num = out_idx[:, 1:] + pad_t - offset  # s * input
            src = torch.div(num, stride_t, rounding_mode="floor")
            valid = ((num % stride_t == 0) & (src >= 0) & (src < in_size)).all(dim=1)
            key = linear_keys(src.clamp(min=0), in_shape, out_idx[:, 0])
            columns.append(lookup[torch.where(valid, key, lookup.shape[0] - 1)])
    else:
        # input = s * o - p + k lies in [-p, n + p - 1]: a lookup grid padded by p on each side (filled
        # with "missing") turns every offset into one constant shift of the linear key, no bounds checks
        padded = tuple(n + 2 * p for n, p in zip(in_shape, padding))
        lookup = torch.full((x.batch_size * math.prod(padded),), num_in, dtype=torch.int32, device=device)
        pad_t = torch.tensor(padding, device=device)
        lookup[linear_keys(idx[:, 1:] + pad_t, padded, idx[:, 0])] = torch.arange(
            num_in, dtype=torch.int32, device=device
        )
        base = linear_keys(out_idx[:, 1:] * torch.tensor(stride, device=device), padded, out_idx[:, 0])  # [M]
        shifts = linear_keys(offsets, padded).tolist()  # [K]
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


def autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (a sparse conv runs in its features' dtype)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def reference_conv(
    x: SparseTensor, weight: Tensor, kernel: Int3, stride: Int3, padding: Int3, kind: str
) -> tuple[Tensor, Tensor, Int3]:
    """Output (features [M, C_out], indices [M, 4], spatial shape) of one conv of ``kind`` on ``x``."""
    key = (kind, kernel, stride, padding)
    rulebook = x._cache.rulebooks.get(key)
    if rulebook is None:
        rulebook = _build_rulebook(x, kernel, stride, padding, kind)
        x._cache.rulebooks[key] = rulebook
    with autocast_off(x.features.device):  # the features' dtype, as in the spconv backend
        out = _ReferenceConvFunction.apply(x.features, weight.to(x.features.dtype), rulebook)
    return out, rulebook.out_indices, rulebook.out_shape
