"""The self-checks fail on wrong numbers and crashes, skip what cannot run, and time everything."""

import pytest
import torch
import torchvision

from spotocc.diagnostics.doctor import DoctorReport, format_result, format_summary
from spotocc.diagnostics.model_check import TinyModelCheck, amp_for_device
from spotocc.diagnostics.selfcheck import (
    Check,
    CheckFailed,
    CheckSkipped,
    check_deform_conv,
    check_sparse_spconv,
    check_spot_attention,
    relative_error,
    run_check,
)
from spotocc.models.occupancy import OccupancyModel

CPU = torch.device("cpu")


def test_relative_error():
    oracle = torch.tensor([[1.0, -4.0], [2.0, 0.0]], dtype=torch.float64)
    ours = oracle.float() + torch.tensor([[0.0, 0.0], [0.02, 0.0]])
    assert relative_error(ours, oracle) == pytest.approx(0.02 / 4, rel=1e-5)
    assert relative_error(torch.full((2, 2), float("nan")), oracle) == float("inf")
    with pytest.raises(CheckFailed, match=r"shape \(4,\) where \(2, 2\) was expected"):
        relative_error(ours.flatten(), oracle)


def test_statuses_of_run_check():
    def crash(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    def skip(device):
        raise CheckSkipped("spconv is not installed")

    def wrong(device):
        raise CheckFailed("forward off by 1e-2")

    results = [
        run_check(Check(name, fn, f"advice for {name}"), CPU)
        for name, fn in (("ok", lambda d: "fine"), ("crash", crash), ("skip", skip), ("wrong", wrong))
    ]
    assert [(r.status, r.detail, r.fix) for r in results] == [
        ("PASS", "fine", ""),
        (
            "FAIL",
            "RuntimeError: CUDA error: no kernel image is available for execution on the device",
            "advice for crash",
        ),
        ("SKIP", "spconv is not installed", ""),
        ("FAIL", "forward off by 1e-2", "advice for wrong"),
    ]
    assert "Traceback" in results[1].traceback and not results[3].traceback
    assert all(r.seconds >= 0 for r in results)
    report = DoctorReport("cpu", {}, [], checks=[results[0], results[2]])
    assert report.ok and format_summary(report).startswith("OK: 1 passed, 0 failed, 1 skipped")
    report.checks.append(results[1])
    assert not report.ok
    assert format_result(results[1]).splitlines()[-1] == "        what to do: advice for crash"


def test_a_wrong_deformable_conv_fails(monkeypatch):
    original = torchvision.ops.deform_conv2d

    def off_by_a_little(*args, **kwargs):
        out = original(*args, **kwargs)
        return out + 1e-3 * out.detach().abs().max()

    assert "forward + backward; largest relative error" in check_deform_conv(CPU)  # the real one passes
    monkeypatch.setattr(torchvision.ops, "deform_conv2d", off_by_a_little)
    result = run_check(Check("deform", check_deform_conv, "reinstall torchvision"), CPU)
    assert result.status == "FAIL" and result.fix == "reinstall torchvision"
    expected = "deform_conv2d vs float64 bilinear sampling: relative error forward 1.0e-03"
    assert result.detail.startswith(expected)


def test_a_wrong_attention_fails(monkeypatch):
    from spotocc.models import SpotCrossAttention

    original = SpotCrossAttention.forward

    def forward(self, query, key, **kwargs):  # a float32-only error, as a bad kernel would make
        out = original(self, query, key, **kwargs)
        return out * 1.001 if out.dtype == torch.float32 else out

    monkeypatch.setattr(SpotCrossAttention, "forward", forward)
    with pytest.raises(CheckFailed, match="SpotCrossAttention vs float64: relative error forward"):
        check_spot_attention(CPU)


def test_spconv_check_skips_when_disabled_or_missing(monkeypatch):
    monkeypatch.setenv("SPOTOCC_DISABLE_SPCONV", "1")
    with pytest.raises(CheckSkipped, match="SPOTOCC_DISABLE_SPCONV is set"):
        check_sparse_spconv(CPU)
    monkeypatch.delenv("SPOTOCC_DISABLE_SPCONV")
    import spotocc.models.sparse.conv as conv

    monkeypatch.setattr(conv, "load_spconv", lambda: None)
    with pytest.raises(CheckSkipped, match="spconv does not import"):
        check_sparse_spconv(CPU)


def test_amp_for_device(monkeypatch):
    assert amp_for_device(CPU) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert amp_for_device(torch.device("cuda")) == "fp16"


def test_a_non_finite_loss_fails_the_model_check(monkeypatch):
    original = OccupancyModel.forward_train

    def forward_train(self, batch):
        losses = original(self, batch)
        first = next(k for k in losses if "loss" in k)
        losses[first] = losses[first] * float("nan")
        return losses

    monkeypatch.setattr(OccupancyModel, "forward_train", forward_train)
    check = TinyModelCheck()
    with pytest.raises(CheckFailed, match="non-finite losses under amp=none: ") as info:
        check.run(CPU, "none")
    assert "loss" in str(info.value).split(": ")[1]
