"""``spotocc doctor --device cuda``: every check passes on the GPU, spconv's CUDA build included."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from cuda_support import CUDA_ONLY, require_spconv_cuda

from spotocc import cli
from spotocc.diagnostics.model_check import amp_for_device

pytestmark = CUDA_ONLY


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["doctor", "--device", "cuda", "--json", str(path)])
    result = json.loads(path.read_text())
    result["exit_status"], result["stdout"] = code, out.getvalue()
    return result


def test_doctor_passes_on_cuda(report):
    assert report["exit_status"] == 0 and report["ok"] is True, report["stdout"]
    assert report["device"] == "cuda" and torch.cuda.get_device_name(0) in report["versions"]["gpu"]
    assert "CUDA" in report["versions"]["torch"] and "CPU-only" not in report["versions"]["torch"]
    names = [c["name"] for c in report["checks"]]
    amp = amp_for_device(torch.device("cuda"))
    assert names[-1] == f"synthetic_tiny training step + prediction, {amp} autocast"
    for check in report["checks"]:
        assert check["status"] in ("PASS", "SKIP"), check
        if check["name"].startswith("synthetic_tiny"):
            assert "peak allocated memory" in check["detail"], check
    assert [c["status"] for c in report["checks"]].count("SKIP") <= 1  # at most spconv's


def test_doctor_runs_spconv_cuda(report):
    require_spconv_cuda()
    spconv, *_ = (c for c in report["checks"] if "spconv" in c["name"])
    assert spconv["status"] == "PASS", spconv
    model = report["checks"][-1]
    assert "sparse backend spconv" in model["detail"], model
    assert not [f for f in report["flags"] if f["severity"] == "fail"], report["flags"]
