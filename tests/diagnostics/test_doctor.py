"""``spotocc doctor`` end to end on the CPU, and its failures: a mismatched spconv, a wrong conv result.

The whole command (every self-check, the two synthetic_tiny runs included) takes about 10 s on 2 CPU
cores; it runs once for the module.
"""

import contextlib
import io
import json

import pytest
import torch

from spotocc import cli
from spotocc.diagnostics import doctor, environment
from spotocc.diagnostics.environment import SpconvBuild, recommended_spconv_wheel
from spotocc.diagnostics.selfcheck import Check, check_deform_conv, check_sparse_reference
from spotocc.models.sparse import SubMConv3d
from spotocc.models.sparse.conv import load_spconv

CPU = torch.device("cpu")
VERSION_KEYS = ["python", "torch", "gpu", "torchvision", "timm", "spconv", "cumm", "numpy"]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("SPOTOCC_DEBUG", raising=False)
    monkeypatch.delenv("SPOTOCC_DISABLE_SPCONV", raising=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(exit status, stdout, JSON report) of ``spotocc doctor --device cpu --json FILE``."""
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["doctor", "--device", "cpu", "--json", str(path)])
    return code, out.getvalue(), json.loads(path.read_text())


def test_every_check_passes_on_the_cpu(full_run):
    code, stdout, report = full_run
    assert code == 0, stdout
    assert report["ok"] is True and report["device"] == "cpu"
    assert list(report["versions"]) == VERSION_KEYS
    assert report["versions"]["torch"].startswith(torch.__version__)
    assert report["recommended_spconv"] == recommended_spconv_wheel(torch.version.cuda)
    assert not [f for f in report["flags"] if f["severity"] == "fail"]
    names = [c.name for c in doctor.default_checks(CPU)]
    assert [c["name"] for c in report["checks"]] == names and len(names) == 6
    spconv_status = "PASS" if load_spconv() is not None else "SKIP"
    statuses = [c["status"] for c in report["checks"]]
    assert statuses == ["PASS", spconv_status, "PASS", "PASS", "PASS", "PASS"], report["checks"]
    for check in report["checks"]:
        assert check["seconds"] > 0 and check["detail"] and not check["fix"] and not check["traceback"]
    assert 0 < report["seconds"] < 600


def test_report_details(full_run):
    _, stdout, report = full_run
    details = {c["name"]: c["detail"] for c in report["checks"]}
    sparse = details["sparse conv, reference backend vs float64 dense conv"]
    assert sparse.startswith("submanifold, strided, transposed; forward + backward;")
    assert "largest relative error float32" in sparse and "float16" in sparse
    fp32 = details["synthetic_tiny training step + prediction, float32"]
    bf16 = details["synthetic_tiny training step + prediction, bf16 autocast"]
    assert fp32.startswith("loss ") and "batch 2, sparse backend dense" in fp32  # synthetic_tiny's
    assert "from float32)" in bf16  # compared with the float32 loss of the same weights and batch
    assert "peak resident memory" in fp32  # Linux: /proc/self/status
    # the printout: versions, problems, one line per check, the verdict
    assert stdout.startswith("spotocc doctor on cpu\nversions:\n  python ")
    assert "known problems: none" in stdout or "known problems:\n" in stdout
    assert sum(line.startswith("  PASS ") for line in stdout.splitlines()) == statuses_passed(report)
    assert "\nOK: " in stdout and "0 failed" in stdout and stdout.rstrip().endswith(".json")


def statuses_passed(report) -> int:
    return sum(c["status"] == "PASS" for c in report["checks"])


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mismatched_spconv_is_flagged_with_its_pip_command(monkeypatch, capsys, tmp_path):
    """spconv built for CUDA 11.8 next to a torch for CUDA 12.4: a FAIL flag, exit status 1."""
    build = SpconvBuild("spconv-cu118", "2.3.8", "11.8")
    monkeypatch.setattr(environment, "installed_spconv", lambda: [build])
    monkeypatch.setattr(environment, "torch_cuda_version", lambda: "12.4")
    monkeypatch.setattr(environment, "_spconv_import", lambda: (True, False, None, set()))
    fast = [Check("deformable conv", check_deform_conv, "reinstall torchvision")]
    monkeypatch.setattr(doctor, "default_checks", lambda device: fast)
    path = tmp_path / "doctor.json"
    code, out, _ = run_cli(["doctor", "--device", "cpu", "--json", str(path)], capsys)
    fix = "pip uninstall -y spconv-cu118 && pip install spconv-cu124"
    assert code == 1, out
    assert "  FAIL  spconv-cu118 is built for CUDA 11.8, torch for CUDA 12.4" in out
    assert f"        fix: {fix}\n" in out
    assert "  PASS " in out and "FAILED: 1 passed, 0 failed; 1 known problem to fix" in out
    report = json.loads(path.read_text())
    assert report["ok"] is False and report["recommended_spconv"] == "spconv-cu124"
    assert [(f["severity"], f["fix"]) for f in report["flags"]] == [("fail", fix)]
    assert report["versions"]["spconv"] == "spconv-cu118 2.3.8: CUDA build (CUDA 11.8)"


def perturb_submanifold_convs(monkeypatch) -> None:
    """Every submanifold conv adds 0.5 to the first three output voxels (as a racing kernel would)."""
    original = SubMConv3d.forward

    def forward(self, x):
        out = original(self, x)
        features = out.features.clone()
        features[:3] += 0.5
        return out.replace_feature(features)

    monkeypatch.setattr(SubMConv3d, "forward", forward)


def test_a_wrong_conv_result_fails_its_check_with_advice(monkeypatch, capsys):
    perturb_submanifold_convs(monkeypatch)
    checks = [
        Check("sparse conv, reference backend", check_sparse_reference, "default advice"),
        Check("deformable conv", check_deform_conv, "reinstall torchvision"),
    ]
    monkeypatch.setattr(doctor, "default_checks", lambda device: checks)
    code, out, _ = run_cli(["doctor", "--device", "cpu"], capsys)
    assert code == 1, out
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if "sparse conv, reference backend" in line))
    assert lines[at].startswith("  FAIL ")
    assert lines[at + 1].startswith(
        "        submanifold float32 vs float64 dense conv: relative error forward "
    )
    assert "input grad" not in lines[at + 1]  # the backward of the perturbed forward is still right
    assert lines[at + 2].startswith("        what to do: the pure-PyTorch sparse conv gives wrong numbers")
    assert "FAILED: 1 passed, 1 failed" in out


def test_the_spconv_check_names_its_own_fix(monkeypatch):
    if load_spconv() is None:
        pytest.skip("spconv does not import here: its check is skipped (tested in test_selfcheck)")
    perturb_submanifold_convs(monkeypatch)
    (spconv_check,) = [c for c in doctor.default_checks(CPU) if "spconv" in c.name]
    report = doctor.run_doctor(CPU, checks=[spconv_check])
    (result,) = report.checks
    assert result.status == "FAIL" and result.detail.startswith("submanifold float32 vs float64")
    assert result.fix.startswith("set SPOTOCC_DISABLE_SPCONV=1 to use the reference backend")
    assert not report.ok


def test_spconv_wheel_and_user_errors(monkeypatch, capsys):
    monkeypatch.setattr(environment, "torch_cuda_version", lambda: "12.8")
    assert run_cli(["doctor", "--spconv-wheel"], capsys)[:2] == (0, "spconv-cu126\n")
    monkeypatch.setattr(environment, "torch_cuda_version", lambda: None)
    assert run_cli(["doctor", "--spconv-wheel"], capsys)[:2] == (0, "spconv\n")
    monkeypatch.setattr(environment, "torch_cuda_version", lambda: "10.1")
    code, _, err = run_cli(["doctor", "--spconv-wheel"], capsys)
    assert (code, err) == (
        2,
        "spotocc doctor: error: no spconv wheel is built for torch's CUDA 10.1; build spconv from source\n",
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--device", "tpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("spotocc doctor: error: argument --device: invalid")


def test_cuda_requested_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    code, _, err = run_cli(["doctor", "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("spotocc doctor: error: --device cuda, but torch ")
    assert "(built for CUDA 12.4) sees no GPU: check the driver (nvidia-smi)" in err
    monkeypatch.setattr(torch.version, "cuda", None)
    code, _, err = run_cli(["doctor", "--device", "cuda"], capsys)
    assert code == 2 and "is a CPU-only build: install torch's CUDA build" in err
