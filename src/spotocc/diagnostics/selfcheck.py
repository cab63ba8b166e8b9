"""Numerical self-checks of the kernels spotocc relies on, on one device (``spotocc doctor``).

Each check runs a kernel on the chosen device in float32 (and float16 where it says so) and compares it,
forward and backward, with an independent float64 computation on the CPU:

- sparse convolution, reference backend: submanifold, strided and transposed convs of a random sparse
  tensor against a dense ``conv3d`` / ``conv_transpose3d`` masked to the active sites (the active sets
  themselves from a convolution of the occupancy);
- sparse convolution, spconv: the same convs with spconv, against the same oracle and against the
  reference backend; on the CPU build spotocc runs spconv's kernels on one torch thread (they give wrong
  values on some voxels with more) and answers its backward's CUDA-stream query;
- torchvision's deformable convolution against bilinear sampling with ``grid_sample``;
- :class:`~spotocc.models.SpotCrossAttention` against itself in float64 (its top-k picks the same keys:
  the inputs are fixed, and no two similarities at the cut are within 2e-4 of each other).

A check returns a one-line detail when it passes, raises :class:`CheckFailed` (with what to do) when a
result is wrong, or :class:`CheckSkipped` when it cannot run here; :func:`run_check` times it.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "check_deform_conv",
    "check_sparse_reference",
    "check_sparse_spconv",
    "check_spot_attention",
    "relative_error",
    "run_check",
]

FP32_TOLERANCE = 1e-4  # largest |ours - float64| over the largest |float64|
FP16_TOLERANCE = 1e-2

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class CheckFailed(Exception):
    """A check's result is wrong; ``fix`` says what to do (empty: the check's default advice)."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class CheckSkipped(Exception):
    """A check that cannot run here; the message says why."""


@dataclass
class CheckResult:
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    detail: str
    fix: str = ""
    traceback: str = ""  # of an unexpected exception (in the JSON report, for a bug report)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """A named check: ``run(device)`` returns its detail line; ``fix`` is the advice on a failure."""

    name: str
    run: Callable[[torch.device], str]
    fix: str


def run_check(check: Check, device: torch.device) -> CheckResult:
    """Run ``check`` on ``device``; any exception other than a skip is a FAIL with its message."""
    start = time.perf_counter()
    status, fix, trace = PASS, "", ""
    try:
        detail = check.run(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except CheckSkipped as skip:
        status, detail = SKIP, str(skip)
    except CheckFailed as failure:
        status, detail, fix = FAIL, failure.message, failure.fix or check.fix
    except Exception as err:  # noqa: BLE001  (a crash inside a kernel is what the check looks for)
        lines = str(err).strip().splitlines()
        first = lines[0] if lines else ""
        status, detail, fix = FAIL, f"{type(err).__name__}: {first[:300]}", check.fix
        trace = traceback.format_exc()
    return CheckResult(check.name, status, time.perf_counter() - start, detail, fix, trace)


def relative_error(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``oracle`` (both moved to float64 CPU)."""
    ours, oracle = ours.detach().double().cpu(), oracle.detach().double().cpu()
    if ours.shape != oracle.shape:
        raise CheckFailed(f"shape {tuple(ours.shape)} where {tuple(oracle.shape)} was expected")
    if not torch.isfinite(ours).all():
        return float("inf")
    scale = float(oracle.abs().max()) if oracle.numel() else 0.0
    return float((ours - oracle).abs().max()) / max(scale, 1e-30) if oracle.numel() else 0.0


def _require(errors: dict[str, float], tolerance: float, what: str, fix: str = "") -> float:
    """Raise :class:`CheckFailed` naming every error above ``tolerance``; the largest error otherwise."""
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    if bad:
        listed = ", ".join(f"{name} {err:.1e}" for name, err in bad.items())
        raise CheckFailed(f"{what}: relative error {listed} above {tolerance:.0e}", fix)
    return max(errors.values(), default=0.0)


# --------------------------------------------------------------------------------------------------
# Sparse convolution


def _sparse_cases():
    from spotocc.models.sparse.conv import SparseConv3d, SparseConvTranspose3d, SubMConv3d

    return (
        ("submanifold", SubMConv3d, dict(kernel_size=3, padding=1)),
        ("strided", SparseConv3d, dict(kernel_size=3, stride=2, padding=1)),
        ("transposed", SparseConvTranspose3d, dict(kernel_size=2, stride=2)),
    )


_SPARSE_CHANNELS = 16
_SPARSE_SHAPE = (2, _SPARSE_CHANNELS, 20, 20, 10)  # [B, C, X, Y, Z]


def _sparse_volume() -> torch.Tensor:
    """[B, C, X, Y, Z] float64: random features on about 20% of the sites, exact zeros elsewhere."""
    gen = torch.Generator().manual_seed(0)
    active = torch.rand(_SPARSE_SHAPE[0], 1, *_SPARSE_SHAPE[2:], generator=gen) < 0.2
    return torch.randn(_SPARSE_SHAPE, generator=gen, dtype=torch.float64) * active


def _sparse_oracle(conv, volume: torch.Tensor, probe_seed: int):
    """Dense float64 equivalent of ``conv``: (output, input grad, weight grad, active mask, probe)."""
    weight = conv.weight.detach().double().cpu().requires_grad_()
    vol = volume.clone().requires_grad_()
    occupied = (volume.abs().sum(1, keepdim=True) != 0).double()  # [B, 1, X, Y, Z]
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
    if conv.kind == "transposed":
        out = F.conv_transpose3d(vol, weight.permute(4, 0, 1, 2, 3), stride=conv.stride, padding=conv.padding)
        active = F.conv_transpose3d(occupied, ones, stride=conv.stride, padding=conv.padding) > 0.5
    elif conv.kind == "subm":
        padding = tuple((k - 1) // 2 for k in conv.kernel_size)
        out = F.conv3d(vol, weight.permute(0, 4, 1, 2, 3), padding=padding)
        active = occupied > 0.5
    else:
        out = F.conv3d(vol, weight.permute(0, 4, 1, 2, 3), stride=conv.stride, padding=conv.padding)
        active = F.conv3d(occupied, ones, stride=conv.stride, padding=conv.padding) > 0.5
    out = out * active
    gen = torch.Generator().manual_seed(probe_seed)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * probe).sum().backward()
    return out.detach(), vol.grad * occupied, weight.grad, active, probe


def _sparse_run(conv, volume: torch.Tensor, probe: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """``conv`` on ``device`` in ``dtype``: (dense output, input grad, weight grad, active mask)."""
    from spotocc.models.sparse.conv import SparseTensor

    conv.zero_grad(set_to_none=True)
    vol = volume.to(device=device, dtype=dtype).requires_grad_()
    out = conv(SparseTensor.from_dense(vol))
    dense = out.dense()  # [B, C, X', Y', Z']
    if dense.shape != probe.shape:
        raise CheckFailed(
            f"{conv.kind} conv: output grid {tuple(dense.shape)}, expected {tuple(probe.shape)}"
        )
    (dense.float() * probe.to(device=device, dtype=torch.float32)).sum().backward()
    active = torch.zeros(probe.shape[0], 1, *probe.shape[2:], dtype=torch.bool)
    idx = out.indices.long().cpu()
    active[idx[:, 0], 0, idx[:, 1], idx[:, 2], idx[:, 3]] = True
    return dense.detach(), vol.grad, conv.weight.grad, active


def _sparse_compare(backend: str, device: torch.device, dtypes, fix: str, against_reference: bool = False):
    """Every conv kind with ``backend`` in each dtype against the float64 oracle; returns the largest
    error per dtype (and against the reference backend in float32 when asked)."""
    from spotocc.models.sparse.conv import set_sparse_backend

    volume = _sparse_volume()
    worst: dict[str, float] = {}
    active_sites = []
    for seed, (kind, cls, kwargs) in enumerate(_sparse_cases()):
        torch.manual_seed(seed)
        conv = cls(_SPARSE_CHANNELS, _SPARSE_CHANNELS, bias=False, **kwargs)
        expected, grad_in, grad_w, active, probe = _sparse_oracle(conv, volume, probe_seed=100 + seed)
        conv = conv.to(device)
        active_sites.append(int(active.sum()))
        for dtype in dtypes:
            set_sparse_backend(conv, backend)
            out, vol_grad, w_grad, got_active = _sparse_run(conv, volume, probe, device, dtype)
            label = f"{kind} {str(dtype).removeprefix('torch.')}"
            if not torch.equal(got_active, active):
                missing = int((active & ~got_active).sum())
                extra = int((got_active & ~active).sum())
                raise CheckFailed(f"{label}: active sites differ ({missing} missing, {extra} extra)", fix)
            tolerance = FP32_TOLERANCE if dtype == torch.float32 else FP16_TOLERANCE
            errors = {
                "forward": relative_error(out, expected),
                "input grad": relative_error(vol_grad, grad_in),
                "weight grad": relative_error(w_grad, grad_w),
            }
            err = _require(errors, tolerance, f"{label} vs float64 dense conv", fix)
            key = str(dtype).removeprefix("torch.")
            worst[key] = max(worst.get(key, 0.0), err)
            if against_reference and dtype == torch.float32:
                set_sparse_backend(conv, "reference")
                ref = _sparse_run(conv, volume, probe, device, dtype)
                errors = {
                    "forward": relative_error(out, ref[0]),
                    "input grad": relative_error(vol_grad, ref[1]),
                    "weight grad": relative_error(w_grad, ref[2]),
                }
                err = _require(errors, FP32_TOLERANCE, f"{label} vs the reference backend", fix)
                worst["vs reference"] = max(worst.get("vs reference", 0.0), err)
    text = ", ".join(f"{key} {err:.0e}" for key, err in worst.items())
    return (
        f"submanifold, strided, transposed; forward + backward; {sum(active_sites)} output sites; "
        f"largest relative error {text}"
    )


_REFERENCE_FIX = (
    "the pure-PyTorch sparse conv gives wrong numbers on this device: report it with this output "
    "(spotocc doctor --json doctor.json)"
)
_SPCONV_FIX = (
    "set SPOTOCC_DISABLE_SPCONV=1 to use the reference backend, and reinstall the spconv build for your "
    "torch (spotocc doctor --spconv-wheel names it)"
)


def check_sparse_reference(device: torch.device) -> str:
    """The reference backend in float32 and float16 against the float64 dense conv."""
    return _sparse_compare("reference", device, (torch.float32, torch.float16), _REFERENCE_FIX)


def check_sparse_spconv(device: torch.device) -> str:
    """spconv in float32 and float16 against the float64 dense conv and the reference backend."""
    from spotocc.models.sparse.conv import (
        _SPCONV_STATE,
        DISABLE_SPCONV_ENV,
        load_spconv,
        resolve_backend,
        spconv_disabled,
    )

    if spconv_disabled():
        raise CheckSkipped(f"{DISABLE_SPCONV_ENV} is set: spotocc does not use spconv")
    if load_spconv() is None:
        raise CheckSkipped(
            f"spconv does not import ({_SPCONV_STATE.get('error')}): the reference backend runs"
        )
    try:
        resolve_backend("spconv", device)
    except (ImportError, RuntimeError) as err:
        raise CheckSkipped(f"spconv cannot run on {device.type}: {err}") from None
    detail = _sparse_compare(
        "spconv", device, (torch.float32, torch.float16), _SPCONV_FIX, against_reference=True
    )
    if device.type == "cpu":
        detail += (
            "; CPU build: spotocc runs it on one torch thread (it is wrong on some voxels with more) and "
            "answers its backward's CUDA-stream query; the CPU default backend stays the reference"
        )
    return detail


# --------------------------------------------------------------------------------------------------
# Deformable convolution


def check_deform_conv(device: torch.device) -> str:
    """torchvision's ``deform_conv2d`` (grouped, as the depth net uses it) against the float64 oracle."""
    import torchvision

    from spotocc.models.deform_conv import deform_conv2d_by_sampling

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 20, generator=gen, dtype=torch.float64)
    offset = torch.randn(2, 18, 12, 20, generator=gen, dtype=torch.float64) * 2.0  # up to a few pixels
    weight = torch.randn(16, 4, 3, 3, generator=gen, dtype=torch.float64) * 0.2  # 4 groups
    probe = torch.randn(2, 16, 12, 20, generator=gen, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x, offset, weight)]
    expected = deform_conv2d_by_sampling(*leaves64, padding=1)  # one grid_sample; the CPU path
    (expected * probe).sum().backward()
    leaves = [t.to(device=device, dtype=torch.float32).requires_grad_() for t in (x, offset, weight)]
    out = torchvision.ops.deform_conv2d(*leaves, padding=1)
    (out * probe.to(device=device, dtype=torch.float32)).sum().backward()
    errors = {"forward": relative_error(out, expected)}
    for name, ours, oracle in zip(("input grad", "offset grad", "weight grad"), leaves, leaves64):
        errors[name] = relative_error(ours.grad, oracle.grad)
    err = _require(errors, FP32_TOLERANCE, "deform_conv2d vs float64 bilinear sampling")
    return f"3x3, 4 groups, random offsets; forward + backward; largest relative error {err:.0e}"


# --------------------------------------------------------------------------------------------------
# SpotCrossAttention


def check_spot_attention(device: torch.device) -> str:
    """SpotCrossAttention (synthetic_tiny's sizes) in float32 on ``device`` against float64 on the CPU."""
    from spotocc.models import SpotCrossAttention

    torch.manual_seed(0)
    module = SpotCrossAttention(embed_dims=48, num_heads=3, pruning_ratio=0.1, min_k=8)
    # seed 8: at the top-k cut no two float64 similarities are closer than 2e-4, far above float32
    # rounding, so every device picks the keys the float64 run picks
    gen = torch.Generator().manual_seed(8)
    batch, queries, keys = 2, 10, 300
    inputs = {
        "query": torch.randn(batch, queries, 48, generator=gen, dtype=torch.float64),
        "key": torch.randn(batch, keys, 48, generator=gen, dtype=torch.float64),
        "query_pos": torch.randn(batch, queries, 48, generator=gen, dtype=torch.float64),
        "key_pos": torch.randn(batch, keys, 48, generator=gen, dtype=torch.float64),
    }
    attn_mask = torch.rand(batch, queries, keys, generator=gen) < 0.2  # True = may not attend
    attn_mask[0, 0] = True  # a row that may attend nowhere: an empty prototype set
    probe = torch.randn(batch, queries, 48, generator=gen, dtype=torch.float64)

    def run(mod, dev, dtype):
        mod = mod.to(device=dev, dtype=dtype)
        mod.zero_grad(set_to_none=True)
        leaves = {k: v.detach().to(device=dev, dtype=dtype).requires_grad_() for k, v in inputs.items()}
        out = mod(**leaves, attn_mask=attn_mask.to(dev))
        (out * probe.to(device=dev, dtype=dtype)).sum().backward()
        grads = {f"{k} grad": v.grad for k, v in leaves.items()}
        grads.update({f"{n} grad": p.grad for n, p in mod.named_parameters()})
        return out, grads

    expected, expected_grads = run(copy.deepcopy(module), torch.device("cpu"), torch.float64)
    out, grads = run(module, device, torch.float32)
    errors = {"forward": relative_error(out, expected)}
    errors.update({name: relative_error(grads[name], expected_grads[name]) for name in expected_grads})
    err = _require(errors, FP32_TOLERANCE, "SpotCrossAttention vs float64")
    return (
        f"{batch}x{queries} queries, {keys} keys, top-{module.num_selected(keys)} of each, masked rows; "
        f"forward + backward (inputs and {len(list(module.parameters()))} parameters); "
        f"largest relative error {err:.0e}"
    )
