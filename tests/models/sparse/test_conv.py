"""Sparse conv backends against dense conv3d / conv_transpose3d and brute-force active sets."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from spotocc.models.sparse import conv as sparse_conv
from spotocc.models.sparse import reference as sparse_reference
from spotocc.models.sparse import spconv_backend
from spotocc.models.sparse.conv import (
    SparseConv3d,
    SparseConvTranspose3d,
    SparseSequential,
    SparseTensor,
    SubMConv3d,
    resolve_backend,
    set_sparse_backend,
)
from spotocc.models.sparse.spconv_backend import load_spconv

BACKENDS = ["reference-gather", "reference-scatter", "spconv", "dense"]

CASES = {
    "subm 3x3x3": (SubMConv3d, dict(kernel_size=3, padding=1, bias=False)),
    "subm 3x3x1": (SubMConv3d, dict(kernel_size=(3, 3, 1), padding=(1, 1, 0), bias=False)),
    "subm 5x5x1 bias": (SubMConv3d, dict(kernel_size=(5, 5, 1), padding=(2, 2, 0), bias=True)),
    "regular 3x1x3": (SparseConv3d, dict(kernel_size=(3, 1, 3), padding=(1, 0, 1), bias=False)),
    "regular 3x3x1 bias": (SparseConv3d, dict(kernel_size=(3, 3, 1), padding=(1, 1, 0), bias=True)),
    "strided k3 s2 p1": (SparseConv3d, dict(kernel_size=3, stride=2, padding=1, bias=False)),
    "transposed 223 s2 p001": (
        SparseConvTranspose3d,
        dict(kernel_size=(2, 2, 3), stride=2, padding=(0, 0, 1), bias=False),
    ),
    "transposed 222 s2 defaults": (SparseConvTranspose3d, dict(kernel_size=2, stride=2, bias=False)),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_backend(conv: torch.nn.Module, backend: str, monkeypatch: pytest.MonkeyPatch) -> torch.dtype:
    """Select the backend (forcing the reference strategy); returns the dtype to test it in.

    float64 for both (spconv's CPU build supports it), so agreement is checked to ~1e-12.
    """
    if backend in ("spconv", "dense"):
        set_sparse_backend(conv, backend)
    else:
        set_sparse_backend(conv, "reference")
        fill = 0.0 if backend == "reference-gather" else 2.0
        monkeypatch.setattr(sparse_reference, "_MIN_GATHER_FILL", fill)
    return torch.float64


def random_volume(batch: int, channels: int, shape, density: float, seed: int) -> torch.Tensor:
    """[B, C, X, Y, Z] float64 with random features on a random active set and exact zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, 1, *shape, generator=gen) < density
    return torch.randn(batch, channels, *shape, generator=gen, dtype=torch.float64) * active


def brute_force_active(conv, active_in: set, in_shape) -> tuple[set, tuple]:
    """Output sites by the definitions (spec 02 sections 2.1, 3.2), with explicit loops."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if conv.kind == "subm":
        return set(active_in), tuple(in_shape)
    if conv.kind == "transposed":
        out_shape = tuple((n - 1) * s_ - 2 * p_ + k_ for n, k_, s_, p_ in zip(in_shape, k, s, p))
        out = set()
        for b, *i in active_in:
            for off in itertools.product(*(range(k_) for k_ in k)):
                o = tuple(s_ * i_ - p_ + o_ for i_, s_, p_, o_ in zip(i, s, p, off))
                if all(0 <= o_ < n for o_, n in zip(o, out_shape)):
                    out.add((b, *o))
        return out, out_shape
    out_shape = tuple((n + 2 * p_ - k_) // s_ + 1 for n, k_, s_, p_ in zip(in_shape, k, s, p))
    batches = {b for b, *_ in active_in}
    out = set()
    for b in batches:
        for o in itertools.product(*(range(n) for n in out_shape)):
            for off in itertools.product(*(range(k_) for k_ in k)):
                i = tuple(s_ * o_ - p_ + f for o_, s_, p_, f in zip(o, s, p, off))
                if (b, *i) in active_in:
                    out.add((b, *o))
                    break
    return out, out_shape


def dense_conv(conv, volume: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense equivalent of ``conv`` (spec 02 section 5.2: no kernel flip), before masking."""
    if conv.kind == "transposed":
        out = F.conv_transpose3d(
            volume, weight.permute(4, 0, 1, 2, 3), stride=conv.stride, padding=conv.padding
        )
    else:
        padding = tuple((k - 1) // 2 for k in conv.kernel_size) if conv.kind == "subm" else conv.padding
        out = F.conv3d(volume, weight.permute(0, 4, 1, 2, 3), stride=conv.stride, padding=padding)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


def index_set(x: SparseTensor) -> set:
    return {tuple(r) for r in x.indices.tolist()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_matches_masked_dense_conv_forward_and_gradients(case, backend, monkeypatch, one_thread):
    torch.manual_seed(0)
    cls, kwargs = CASES[case]
    conv = cls(4, 5, **kwargs)
    dtype = use_backend(conv, backend, monkeypatch)
    conv = conv.to(dtype)
    volume = random_volume(2, 4, (7, 6, 5), 0.25, seed=1)
    active_in = {tuple(r) for r in (volume.abs().sum(1) != 0).nonzero().tolist()}

    # sparse run: loss = <probe, dense output>
    vol_sparse = volume.to(dtype, copy=True).requires_grad_()
    y = conv(SparseTensor.from_dense(vol_sparse))
    expected_active, expected_shape = brute_force_active(conv, active_in, volume.shape[2:])
    assert y.spatial_shape == expected_shape
    assert index_set(y) == expected_active
    assert y.indices.dtype == torch.int32 and y.indices.is_contiguous()
    dense_y = y.dense()
    probe = torch.randn(dense_y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (dense_y * probe.to(dtype)).sum().backward()

    # dense oracle, masked to the expected active set
    w_ref = conv.weight.detach().double().requires_grad_()
    b_ref = None if conv.bias is None else conv.bias.detach().double().requires_grad_()
    vol_ref = volume.clone().requires_grad_()
    mask = torch.zeros(2, 1, *expected_shape, dtype=torch.float64)
    for b, *o in expected_active:
        mask[b, 0, o[0], o[1], o[2]] = 1
    ref = dense_conv(conv, vol_ref, w_ref, b_ref) * mask
    (ref * probe).sum().backward()

    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dense_y.double(), ref.detach(), **tol)
    in_mask = (volume.abs().sum(1, keepdim=True) != 0).double()
    torch.testing.assert_close(vol_sparse.grad.double(), vol_ref.grad * in_mask, **tol)
    torch.testing.assert_close(conv.weight.grad.double(), w_ref.grad, **tol)
    if conv.bias is not None:
        torch.testing.assert_close(conv.bias.grad.double(), b_ref.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["subm 3x3x3", "strided k3 s2 p1", "transposed 223 s2 p001"])
def test_batches_do_not_mix(case, backend, monkeypatch, one_thread):
    cls, kwargs = CASES[case]
    conv = cls(3, 4, **kwargs)
    dtype = use_backend(conv, backend, monkeypatch)
    conv = conv.to(dtype)
    volume = random_volume(2, 3, (6, 6, 5), 0.3, seed=3).to(dtype)
    together = conv(SparseTensor.from_dense(volume)).dense()
    for b in range(2):
        alone = conv(SparseTensor.from_dense(volume[b : b + 1])).dense()
        torch.testing.assert_close(together[b : b + 1], alone)


@pytest.mark.parametrize("backend", ["reference", "spconv"])
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (SubMConv3d, dict(kernel_size=1, padding=1, bias=True)),  # the neck's input convs (padding: no-op)
        (SubMConv3d, dict(kernel_size=1, bias=False)),
        (SparseConv3d, dict(kernel_size=1, stride=1, bias=True)),
    ],
)
def test_1x1_fast_path_reinterprets_the_weight_buffer(cls, kwargs, backend, one_thread):
    torch.manual_seed(0)
    conv = cls(5, 7, backend=backend, **kwargs)
    volume = random_volume(2, 5, (4, 5, 3), 0.5, seed=4).float()
    x = SparseTensor.from_dense(volume.requires_grad_())
    y = conv(x)
    w = conv.weight.detach()  # [7, 1, 1, 1, 5]
    quirk = x.features.detach() @ w.reshape(5, 7)
    if conv.bias is not None:
        quirk = quirk + conv.bias.detach()
    assert torch.equal(y.indices, x.indices) and y.spatial_shape == x.spatial_shape
    torch.testing.assert_close(y.features, quirk, rtol=1e-6, atol=1e-6)
    usual = x.features.detach() @ w[:, 0, 0, 0, :].T
    assert not torch.allclose(y.features, usual + (0 if conv.bias is None else conv.bias.detach()), atol=1e-3)
    # gradient of the weight buffer follows the same reinterpretation
    probe = torch.randn_like(y.features)
    (y.features * probe).sum().backward()
    expected = (x.features.detach().T @ probe).reshape(7, 1, 1, 1, 5)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["subm 3x3x3", "regular 3x3x1 bias", "strided k3 s2 p1", "transposed 223 s2 p001"]
)
def test_spconv_is_exact_when_the_caller_runs_two_threads(case):
    """spconv's CPU kernels race with >1 torch thread; the backend's guard runs them on one."""
    cls, kwargs = CASES[case]
    torch.manual_seed(0)
    conv = cls(16, 16, **kwargs)
    volume = random_volume(2, 16, (20, 20, 10), 0.4, seed=5).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = {}
        for backend in ("reference", "spconv"):
            set_sparse_backend(conv, backend)
            conv.zero_grad()
            vol = volume.clone().requires_grad_()
            y = conv(SparseTensor.from_dense(vol)).dense()
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results[backend] = (y.detach(), vol.grad, conv.weight.grad.clone())
            assert torch.get_num_threads() == 2  # restored after forward and backward
        for ref, sp in zip(results["reference"], results["spconv"]):
            torch.testing.assert_close(sp, ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["bf16 features", "fp32 under bf16 autocast", "fp32 under fp16 autocast"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["subm 3x3x3", "strided k3 s2 p1", "transposed 223 s2 p001"])
def test_reduced_precision_runs_in_the_features_dtype(case, backend, mode, monkeypatch, one_thread):
    """``--amp``: a sparse conv computes in its features' dtype whatever autocast says, in both backends.

    spconv has no bfloat16 kernels (it raised a KeyError) and its torch ops under autocast mixed dtypes;
    the reference backend's scatter path failed in index_add_ on float32 features under autocast.
    """
    cls, kwargs = CASES[case]
    torch.manual_seed(0)
    conv = cls(6, 5, **kwargs)
    use_backend(conv, backend, monkeypatch)
    volume = random_volume(2, 6, (7, 6, 5), 0.3, seed=6)
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    autocast_dtype = torch.float16 if "fp16 autocast" in mode else torch.bfloat16
    vol = volume.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled="autocast" in mode):
        y = conv(SparseTensor.from_dense(vol))
    assert y.features.dtype == dtype
    dense_y = y.dense()
    probe = torch.randn(dense_y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (dense_y.double() * probe).sum().backward()
    assert vol.grad.dtype == dtype and conv.weight.grad.dtype == torch.float32

    w_ref = conv.weight.detach().double().requires_grad_()
    vol_ref = vol.detach().double().requires_grad_()
    expected_active, expected_shape = brute_force_active(
        conv, {tuple(r) for r in (volume.abs().sum(1) != 0).nonzero().tolist()}, volume.shape[2:]
    )
    mask = torch.zeros(2, 1, *expected_shape, dtype=torch.float64)
    for b, *o in expected_active:
        mask[b, 0, o[0], o[1], o[2]] = 1
    ref = dense_conv(conv, vol_ref, w_ref, None) * mask
    (ref * probe).sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bfloat16 keeps 8 bits of mantissa
    for ours, oracle in ((dense_y, ref), (conv.weight.grad, w_ref.grad)):
        scale = float(oracle.detach().abs().max())
        assert float((ours.detach().double() - oracle.detach()).abs().max()) <= tol * scale


@pytest.mark.parametrize("backend", ["reference", "spconv", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_empty_input(case, backend):
    cls, kwargs = CASES[case]
    conv = cls(3, 4, backend=backend, **kwargs)
    x = SparseTensor.from_dense(torch.zeros(2, 3, 6, 6, 4, requires_grad=True))
    y = conv(x)
    assert y.num_active == 0 and y.features.shape == (0, 4)
    assert y.dense().abs().sum() == 0
    y.features.sum().backward()
    assert conv.weight.grad is not None and torch.all(conv.weight.grad == 0)


def test_sparse_tensor_from_dense_uses_the_exact_l1_test_and_row_major_order():
    volume = torch.zeros(2, 2, 3, 3, 2)
    volume[1, :, 0, 2, 1] = torch.tensor([1.0, -1.0])  # sums to 0, L1 norm 2 -> active
    volume[0, 1, 2, 0, 0] = 2.0**-100  # tiny but not zero -> active
    volume[0, 0, 0, 1, 1] = 3.0
    x = SparseTensor.from_dense(volume)
    assert x.indices.tolist() == [[0, 0, 1, 1], [0, 2, 0, 0], [1, 0, 2, 1]]
    assert x.indices.dtype == torch.int32 and x.indices.is_contiguous()
    assert x.features.tolist() == [[3.0, 0.0], [0.0, 2.0**-100], [1.0, -1.0]]
    assert x.batch_size == 2 and x.spatial_shape == (3, 3, 2)
    assert torch.equal(x.dense(), volume)


def test_sparse_tensor_validates_and_makes_indices_contiguous():
    indices = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32).T.contiguous().T
    assert not indices.is_contiguous()
    x = SparseTensor(torch.ones(2, 3), indices, (4, 4, 4), 2)
    assert x.indices.is_contiguous() and x.indices.tolist() == [[0, 1, 2, 3], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="2 feature rows but 3 index rows"):
        SparseTensor(torch.ones(2, 3), torch.zeros(3, 4, dtype=torch.int32), (4, 4, 4), 1)
    with pytest.raises(ValueError, match=r"indices must be \[N, 4\]"):
        SparseTensor(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.int32), (4, 4, 4), 1)
    with pytest.raises(ValueError, match="expected 5 input channels"):
        SubMConv3d(5, 2, 3, bias=False)(x)


def test_sparse_sequential_applies_plain_modules_to_features_and_nests():
    x = SparseTensor.from_dense(random_volume(1, 3, (4, 4, 3), 0.5, seed=7).float())
    conv = SubMConv3d(3, 3, 1, bias=False)
    seq = SparseSequential(SparseSequential(conv, torch.nn.ReLU()), torch.nn.Linear(3, 2, bias=False))
    y = seq(x)
    expected = seq[1](torch.relu(x.features @ conv.weight.reshape(3, 3)))
    assert torch.equal(y.indices, x.indices)
    torch.testing.assert_close(y.features, expected)


def test_submanifold_convs_on_one_index_set_share_one_rulebook(monkeypatch):
    calls = []
    build = sparse_reference._build_rulebook
    monkeypatch.setattr(sparse_reference, "_build_rulebook", lambda *a: calls.append(a[1:]) or build(*a))
    seq = SparseSequential(
        SubMConv3d(3, 3, 3, bias=False, backend="reference"),
        torch.nn.ReLU(),
        SubMConv3d(3, 3, 3, bias=False, backend="reference"),
        SubMConv3d(3, 3, (3, 3, 1), bias=False, backend="reference"),
        SparseConv3d(3, 3, 3, stride=2, padding=1, bias=False, backend="reference"),
        SubMConv3d(3, 3, 3, bias=False, backend="reference"),
    )
    seq(SparseTensor.from_dense(random_volume(1, 3, (6, 6, 4), 0.3, seed=6).float()))
    # 3x3x3 at L0 once, 3x3x1 at L0, the strided conv, 3x3x3 at the new index set
    assert [c[0] for c in calls] == [(3, 3, 3), (3, 3, 1), (3, 3, 3), (3, 3, 3)]
    assert [c[3] for c in calls] == ["subm", "subm", "regular", "subm"]


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(sparse_conv.DISABLE_SPCONV_ENV, raising=False)
    assert load_spconv() is not None  # the dev extra installs spconv's CPU wheel
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "reference"  # spconv's CPU build is no faster and races
    monkeypatch.setitem(spconv_backend._SPCONV_STATE, "cpu_only", False)  # as if a spconv-cuXXX wheel
    assert resolve_backend("auto", cuda) == "spconv"
    assert resolve_backend("reference", cuda) == "reference"
    assert resolve_backend("dense", cpu) == "dense" and resolve_backend("dense", cuda) == "dense"
    assert resolve_backend("spconv", cpu) == "spconv"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        SubMConv3d(2, 2, 3, backend="fast")

    monkeypatch.setenv(sparse_conv.DISABLE_SPCONV_ENV, "1")
    monkeypatch.setattr(sparse_conv, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="disabled by SPOTOCC_DISABLE_SPCONV"):
        assert resolve_backend("spconv", cpu) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", cpu) == "reference"  # nothing to warn about on CPU

    monkeypatch.delenv(sparse_conv.DISABLE_SPCONV_ENV)
    monkeypatch.setitem(spconv_backend._SPCONV_STATE, "cpu_only", True)  # the CPU wheel on a GPU machine
    monkeypatch.setattr(sparse_conv, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="CPU-only build"):
        assert resolve_backend("auto", cuda) == "reference"
    with pytest.raises(RuntimeError, match="spconv-cuXXX"):
        resolve_backend("spconv", cuda)
    assert resolve_backend("spconv", cpu) == "spconv"

    monkeypatch.setattr(spconv_backend, "_SPCONV_STATE", {"module": None, "error": "ImportError: no spconv"})
    monkeypatch.setattr(sparse_conv, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="fall back to the pure-PyTorch reference"):
        assert resolve_backend("auto", cuda) == "reference"
    with pytest.raises(ImportError, match="spconv-cuXXX"):
        resolve_backend("spconv", cpu)


def test_cpu_stream_workaround_is_installed():
    load_spconv()
    from spconv.pytorch import ops

    assert getattr(ops.get_current_stream, "_spotocc_patched", False)
    if not torch.cuda.is_available():
        assert ops.get_current_stream() == 0
