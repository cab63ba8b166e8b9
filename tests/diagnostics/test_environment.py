"""Known-bad combinations of torch, spconv, torchvision and numpy, each with the pip command that fixes it.

The installed versions are faked through the module's reading functions, so every case runs on any
machine, with or without a GPU or spconv.
"""

from types import SimpleNamespace

import pytest
import torch

from spotocc.diagnostics import environment
from spotocc.diagnostics.environment import (
    FAIL,
    WARN,
    SpconvBuild,
    cuda_tag_version,
    environment_flags,
    installed_spconv,
    recommended_spconv_wheel,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_install(monkeypatch, builds, *, torch_cuda="12.4", imports=True, cpu_only=False, error=None):
    """Fake spconv distributions, torch's CUDA and what importing spconv gives."""
    monkeypatch.setattr(environment, "installed_spconv", lambda: list(builds))
    monkeypatch.setattr(environment, "torch_cuda_version", lambda: torch_cuda)
    state = (imports, cpu_only if imports else None, error, set())
    monkeypatch.setattr(environment, "_spconv_import", lambda: state)
    monkeypatch.setattr(environment, "_torch_stack_flags", lambda: [])
    monkeypatch.delenv("SPOTOCC_DISABLE_SPCONV", raising=False)


def cu(tag: str, version: str = "2.3.8") -> SpconvBuild:
    return SpconvBuild(f"spconv-{tag}", version, cuda_tag_version(tag))


@pytest.mark.parametrize(
    "torch_cuda,wheel",
    [
        (None, "spconv"),  # CPU-only torch: the CPU build
        ("12.4", "spconv-cu124"),
        ("12.8", "spconv-cu126"),  # the newest build not newer than torch's CUDA
        ("13.0", "spconv-cu126"),  # no cu13 build yet: the newest there is
        ("11.7", "spconv-cu117"),
        ("11.2", "spconv-cu102"),  # cu111 stops at spconv 2.1
        ("10.1", None),  # older than every build
    ],
)
def test_recommended_wheel(torch_cuda, wheel):
    assert recommended_spconv_wheel(torch_cuda) == wheel


def test_cuda_tags():
    assert cuda_tag_version("cu126") == "12.6" and cuda_tag_version("cu102") == "10.2"
    with pytest.raises(ValueError, match="not a CUDA tag"):
        cuda_tag_version("cuda")


def test_installed_builds_are_read_from_package_metadata(monkeypatch):
    names = (("spconv_cu120", "2.3.6"), ("spconv", "2.3.8"), ("spconvx", "1.0"), ("numpy", "2"))
    dists = [SimpleNamespace(metadata={"Name": name}, version=version) for name, version in names]
    monkeypatch.setattr(environment.importlib.metadata, "distributions", lambda: iter(dists))
    assert installed_spconv() == [
        SpconvBuild("spconv", "2.3.8", None),
        SpconvBuild("spconv-cu120", "2.3.6", "12.0"),
    ]


def test_matching_cuda_build_has_no_flag(monkeypatch):
    fake_install(monkeypatch, [cu("cu124")])
    assert environment_flags(CUDA) == [] and environment_flags(CPU) == []


@pytest.mark.parametrize(
    "build,torch_cuda,severity,message,fix",
    [
        (
            "cu118",
            "12.4",
            FAIL,
            "spconv-cu118 is built for CUDA 11.8, torch for CUDA 12.4: another CUDA major version",
            "pip uninstall -y spconv-cu118 && pip install spconv-cu124",
        ),
        (
            "cu126",
            "12.4",
            FAIL,
            "spconv-cu126 is built for CUDA 12.6, newer than torch's CUDA 12.4",
            "pip uninstall -y spconv-cu126 && pip install spconv-cu124",
        ),
        (
            "cu120",
            "12.4",
            WARN,
            "spconv-cu120 is built for CUDA 12.0, older than spconv-cu124",
            "pip uninstall -y spconv-cu120 && pip install spconv-cu124",
        ),
        (
            "cu126",
            "13.0",
            WARN,
            "spconv-cu126 (CUDA 12.6) is the newest spconv build, but torch uses CUDA 13.0",
            "none needed while the self-checks pass (spconv publishes no wheel for this CUDA yet)",
        ),
    ],
)
def test_spconv_for_another_cuda(monkeypatch, build, torch_cuda, severity, message, fix):
    fake_install(monkeypatch, [cu(build)], torch_cuda=torch_cuda)
    flags = environment_flags(CUDA)
    assert len(flags) == 1, flags
    assert flags[0].severity == severity and flags[0].message.startswith(message) and flags[0].fix == fix


def test_cpu_only_spconv_on_a_cuda_machine(monkeypatch):
    fake_install(monkeypatch, [SpconvBuild("spconv", "2.3.8", None)], cpu_only=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (on_gpu,) = environment_flags(CUDA)
    assert on_gpu.severity == FAIL and "CPU-only build on a machine with a CUDA GPU" in on_gpu.message
    assert on_gpu.fix == "pip uninstall -y spconv && pip install spconv-cu124"
    (on_cpu,) = environment_flags(CPU)  # checking the CPU of a GPU machine: worth knowing, not broken
    assert on_cpu.severity == WARN and on_cpu.fix == on_gpu.fix


def test_cpu_only_spconv_without_a_gpu_is_fine(monkeypatch):
    fake_install(monkeypatch, [SpconvBuild("spconv", "2.3.8", None)], torch_cuda=None, cpu_only=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert environment_flags(CPU) == []


def test_several_builds_and_a_build_that_does_not_import(monkeypatch):
    builds = [SpconvBuild("spconv", "2.3.8", None), cu("cu124")]
    fake_install(monkeypatch, builds, imports=False, error="ImportError: libcudart.so.12: cannot open")
    flags = environment_flags(CPU)
    assert [f.severity for f in flags] == [FAIL, FAIL]
    assert flags[0].message.startswith("several spconv builds are installed (spconv, spconv-cu124)")
    assert flags[0].fix == "pip uninstall -y spconv spconv-cu124 && pip install spconv-cu124"
    assert "does not import: ImportError: libcudart.so.12" in flags[1].message


def test_no_spconv_on_a_gpu_warns_and_disabling_it_too(monkeypatch):
    fake_install(monkeypatch, [], imports=False)
    (flag,) = environment_flags(CUDA)
    assert flag.severity == WARN and flag.fix == "pip install spconv-cu124"
    assert environment_flags(CPU) == []
    fake_install(monkeypatch, [cu("cu124")])
    monkeypatch.setenv("SPOTOCC_DISABLE_SPCONV", "1")
    (flag,) = environment_flags(CUDA)
    assert flag.severity == WARN and flag.fix == "unset SPOTOCC_DISABLE_SPCONV"


def test_torchvision_of_another_torch_and_numpy_2_under_old_torch(monkeypatch):
    versions = {"torchvision": "0.20.1", "numpy": "2.1.0"}
    monkeypatch.setattr(environment, "_dist_version", versions.get)
    monkeypatch.setattr(torch, "__version__", "2.2.1+cu121")
    flags = environment._torch_stack_flags()
    assert [(f.severity, f.fix) for f in flags] == [
        (FAIL, 'pip install "torchvision==0.17.*"'),
        (FAIL, 'pip install "numpy<2"'),
    ]
    versions.update(torchvision="0.17.2", numpy="1.26.4")
    assert environment._torch_stack_flags() == []
