"""``spotocc doctor``: prove an installation on one device.

1. Versions (:func:`~spotocc.diagnostics.environment.collect_versions`).
2. Combinations known not to work, each with the pip command that fixes it
   (:func:`~spotocc.diagnostics.environment.environment_flags`).
3. Self-checks on the device, each PASS, FAIL or SKIP with its time and, on a failure, what to do:
   the sparse convolutions of both backends, torchvision's deformable conv and SpotCrossAttention against
   float64 (:mod:`~spotocc.diagnostics.selfcheck`), then one training step and one prediction of
   ``synthetic_tiny`` on generated scenes in float32 and under bf16 (fp16 on GPUs without bf16)
   autocast (:mod:`~spotocc.diagnostics.model_check`).

:attr:`DoctorReport.ok` is true only when no check failed and no combination known not to work was
found; a skipped check (spconv not installed, say) does not count against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spotocc.diagnostics import environment
from spotocc.diagnostics.environment import FAIL, Flag, paired_torchvision
from spotocc.diagnostics.model_check import TinyModelCheck, amp_for_device
from spotocc.diagnostics.selfcheck import (
    Check,
    CheckResult,
    check_deform_conv,
    check_sparse_reference,
    check_sparse_spconv,
    check_spot_attention,
    run_check,
)

__all__ = ["DoctorReport", "default_checks", "format_result", "run_doctor"]

_BUG = "a wrong result inside spotocc or torch on this device: please report it with the --json output"


@dataclass
class DoctorReport:
    device: str
    versions: dict[str, str]
    flags: list[Flag]
    recommended_spconv: str | None = None  # the spconv distribution for this torch
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "FAIL"]

    @property
    def failing_flags(self) -> list[Flag]:
        return [f for f in self.flags if f.severity == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failed_checks and not self.failing_flags

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
            "recommended_spconv": self.recommended_spconv,
            "flags": [f.to_dict() for f in self.flags],
            "checks": [c.to_dict() for c in self.checks],
        }


def default_checks(device: torch.device) -> list[Check]:
    """The self-checks, in the order they run."""
    model = TinyModelCheck()
    amp = amp_for_device(device)
    vision = paired_torchvision()
    vision_fix = (
        "reinstall the torchvision built for your torch: "
        f'pip install --force-reinstall "torchvision=={vision}.*"'
        if vision
        else "reinstall the torchvision built for your torch"
    )
    return [
        Check("sparse conv, reference backend vs float64 dense conv", check_sparse_reference, _BUG),
        Check(
            "sparse conv, spconv vs float64 dense conv and the reference backend",
            check_sparse_spconv,
            "set SPOTOCC_DISABLE_SPCONV=1 (the reference backend then runs) and reinstall spconv: "
            "spotocc doctor --spconv-wheel names the build for your torch",
        ),
        Check("deformable conv (torchvision) vs float64 bilinear sampling", check_deform_conv, vision_fix),
        Check("SpotCrossAttention forward + backward vs float64", check_spot_attention, _BUG),
        Check(
            "synthetic_tiny training step + prediction, float32",
            lambda d: model.run(d, "none"),
            _BUG,
        ),
        Check(
            f"synthetic_tiny training step + prediction, {amp} autocast",
            lambda d: model.run(d, amp),
            f"train without --amp {amp} (or with --amp {'fp16' if amp == 'bf16' else 'bf16'} where the "
            f"device has it) and report this failure with the --json output",
        ),
    ]


def run_doctor(
    device: torch.device,
    checks: Sequence[Check] | None = None,
    log: Callable[[str], None] | None = None,
) -> DoctorReport:
    """Versions, known-bad combinations and the self-checks on ``device``; each part is logged as it ends."""
    log = log or (lambda line: None)
    start = time.perf_counter()
    report = DoctorReport(
        str(device),
        environment.collect_versions(device),
        environment.environment_flags(device),
        environment.recommended_spconv_wheel(environment.torch_cuda_version()),
    )
    log(f"spotocc doctor on {device}")
    log(format_versions(report.versions))
    log(format_flags(report.flags))
    log(f"self-checks on {device}:")
    for check in default_checks(device) if checks is None else checks:
        result = run_check(check, device)
        report.checks.append(result)
        log(format_result(result))
    report.seconds = time.perf_counter() - start
    log(format_summary(report))
    return report


def format_versions(versions: dict[str, str]) -> str:
    width = max(len(name) for name in versions)
    return "versions:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in versions.items())


def format_flags(flags: Sequence[Flag]) -> str:
    if not flags:
        return "known problems: none"
    lines = ["known problems:"]
    for flag in flags:
        lines.append(f"  {flag.severity.upper():<4}  {flag.message}")
        lines.append(f"        fix: {flag.fix}")
    return "\n".join(lines)


def format_result(result: CheckResult) -> str:
    lines = [f"  {result.status:<4}  {result.seconds:6.2f} s  {result.name}", f"        {result.detail}"]
    if result.fix:
        lines.append(f"        what to do: {result.fix}")
    return "\n".join(lines)


def format_summary(report: DoctorReport) -> str:
    passed = sum(c.status == "PASS" for c in report.checks)
    skipped = sum(c.status == "SKIP" for c in report.checks)
    counts = f"{passed} passed, {len(report.failed_checks)} failed"
    counts += f", {skipped} skipped" if skipped else ""
    problems = len(report.failing_flags)
    verdict = "OK" if report.ok else "FAILED"
    known = "no known problem"
    if problems:
        known = f"{problems} known problem{'s' if problems != 1 else ''} to fix"
    return f"{verdict}: {counts}; {known} ({report.seconds:.1f} s)"
