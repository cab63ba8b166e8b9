"""What is installed, and which combinations are known not to work (``spotocc doctor``'s first part).

:func:`collect_versions` reads python, torch (its CUDA and cuDNN), the GPU, torchvision, timm, spconv
(which build: CPU, or the CUDA it was built for), cumm and numpy. :func:`environment_flags` lists the
combinations known to break, each with the pip command that fixes it:

- several spconv distributions at once (``spconv`` and ``spconv-cu126`` overwrite each other's files),
  or an installed spconv that does not import;
- a spconv CUDA build for another CUDA than torch's: newer than torch's, or of another major version
  than the closest wheel (:func:`recommended_spconv_wheel`);
- a CPU-only spconv (the ``spconv`` / ``dev`` extras install it) on a CUDA machine: sparse convolutions
  fall back to the slow reference backend;
- a torchvision of another torch release (its C++ ops, deformable conv among them, fail to load), and
  numpy 2 under a torch built against numpy 1 (torch < 2.3).

spconv's CUDA builds are separate PyPI distributions, ``spconv-cuXYZ`` for CUDA X.Y(Z); which one is
installed is read from the package metadata (no import needed).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "SPCONV_CUDA_WHEELS",
    "Flag",
    "SpconvBuild",
    "collect_versions",
    "cuda_tag_version",
    "environment_flags",
    "installed_spconv",
    "paired_torchvision",
    "recommended_spconv_wheel",
    "torch_cuda_version",
]

# spconv 2.3's CUDA wheels on PyPI (spconv 2.3.6-2.3.8, the newest from December 2024); cu111 stops at
# 2.1, which spotocc's backend does not support.
SPCONV_CUDA_WHEELS = (
    "cu102",
    "cu113",
    "cu114",
    "cu116",
    "cu117",
    "cu118",
    "cu120",
    "cu121",
    "cu124",
    "cu126",
)

FAIL = "fail"  # known not to work: doctor exits non-zero
WARN = "warn"  # works, but slower or outside what was tested

_SPCONV_NAME = re.compile(r"^spconv(?:-(cu\d+))?$")


@dataclass(frozen=True)
class Flag:
    """A combination known to cause trouble, and the command that fixes it."""

    severity: str  # FAIL or WARN
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class SpconvBuild:
    """One installed spconv distribution: ``spconv`` (CPU-only) or ``spconv-cuXYZ``."""

    distribution: str
    version: str
    cuda: str | None  # "12.6" for spconv-cu126, None for the CPU-only ``spconv``


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_tag_version(tag: str) -> str:
    """``"cu126"`` -> ``"12.6"``, ``"cu102"`` -> ``"10.2"`` (the last digit is the minor version)."""
    digits = tag.removeprefix("cu")
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"not a CUDA tag: {tag!r}")
    return f"{int(digits[:-1])}.{digits[-1]}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def installed_spconv() -> list[SpconvBuild]:
    """Every installed spconv distribution, by name (several is a broken install)."""
    builds = {}
    for dist in importlib.metadata.distributions():
        name = _normalized(dist.metadata.get("Name") or "")
        match = _SPCONV_NAME.match(name)
        if match:
            tag = match.group(1)
            builds[name] = SpconvBuild(name, dist.version, cuda_tag_version(tag) if tag else None)
    return [builds[name] for name in sorted(builds)]


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built with (``"12.4"``), or None for a CPU-only torch."""
    return torch.version.cuda


def recommended_spconv_wheel(torch_cuda: str | None) -> str | None:
    """The spconv distribution to install next to a torch built for ``torch_cuda``.

    A CPU-only torch gets ``spconv`` (the CPU build); otherwise the newest ``spconv-cuXYZ`` whose CUDA
    is not newer than torch's (spconv's wheels carry their own CUDA runtime; a newer one than torch's
    may need a newer driver than the one torch runs on). None when torch's CUDA predates every wheel.
    """
    if torch_cuda is None:
        return "spconv"
    wanted = _version_tuple(torch_cuda)
    fitting = [t for t in SPCONV_CUDA_WHEELS if _version_tuple(cuda_tag_version(t)) <= wanted]
    if not fitting:
        return None
    return "spconv-" + max(fitting, key=lambda t: _version_tuple(cuda_tag_version(t)))


def _spconv_import() -> tuple[bool, bool | None, str | None, set]:
    """(imports, CPU-only build, import error, compiled CUDA archs) of the spconv that python finds."""
    from spotocc.models.sparse.conv import _SPCONV_STATE, load_spconv

    if load_spconv() is None:
        return False, None, _SPCONV_STATE.get("error"), set()
    archs: set = set()
    try:
        from spconv.cppconstants import COMPILED_CUDA_ARCHS

        archs = set(COMPILED_CUDA_ARCHS)
    except Exception:  # noqa: BLE001  (informational only)
        pass
    return True, bool(_SPCONV_STATE.get("cpu_only")), None, archs


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_versions(device: torch.device) -> dict[str, str]:
    """One line of text per component (python, torch, gpu, torchvision, timm, spconv, cumm, numpy)."""
    versions = {"python": f"{platform.python_version()} ({platform.system()} {platform.machine()})"}
    cuda = torch_cuda_version()
    if cuda is None:
        versions["torch"] = f"{torch.__version__} (CPU-only build)"
    else:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        cudnn_text = "no cuDNN" if cudnn is None else f"cuDNN {_cudnn_text(cudnn)}"
        versions["torch"] = f"{torch.__version__} (CUDA {cuda}, {cudnn_text})"
    if torch.cuda.is_available():
        index = device.index if device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        versions["gpu"] = (
            f"{props.name} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible)"
        )
    else:
        versions["gpu"] = "none visible to torch"
    versions["torchvision"] = _dist_version("torchvision") or "not installed"
    versions["timm"] = _dist_version("timm") or "not installed"
    versions["spconv"] = _spconv_text()
    cumm = [
        f"{_normalized(d.metadata.get('Name') or '')} {d.version}"
        for d in importlib.metadata.distributions()
        if re.match(r"^cumm(-cu\d+)?$", _normalized(d.metadata.get("Name") or ""))
    ]
    versions["cumm"] = ", ".join(sorted(cumm)) or "not installed"
    versions["numpy"] = _dist_version("numpy") or "not installed"
    return versions


def _cudnn_text(version: int) -> str:
    """cuDNN's integer version (``90100`` or ``8902``) as text."""
    if version >= 10000:  # cuDNN 9: major * 10000 + minor * 100 + patch
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def _spconv_text() -> str:
    builds = installed_spconv()
    if not builds:
        return "not installed (sparse convolutions use the pure-PyTorch reference backend)"
    names = ", ".join(f"{b.distribution} {b.version}" for b in builds)
    imports, cpu_only, error, _ = _spconv_import()
    if not imports:
        return f"{names}: does not import ({error})"
    if cpu_only:
        return f"{names}: CPU-only build"
    cudas = sorted({b.cuda for b in builds if b.cuda})
    return f"{names}: CUDA build (CUDA {', '.join(cudas) or 'unknown'})"


def environment_flags(device: torch.device) -> list[Flag]:
    """The known-bad combinations of this installation for work on ``device``."""
    flags: list[Flag] = []
    torch_cuda = torch_cuda_version()
    wheel = recommended_spconv_wheel(torch_cuda)
    install = f"pip install {wheel}" if wheel else "build spconv from source for your CUDA"
    flags += _torch_stack_flags()
    builds = installed_spconv()
    if len(builds) > 1:
        names = " ".join(b.distribution for b in builds)
        flags.append(
            Flag(
                FAIL,
                f"several spconv builds are installed ({names.replace(' ', ', ')}); they overwrite each "
                "other's files, so which one runs is an accident",
                f"pip uninstall -y {names} && {install}",
            )
        )
    imports, cpu_only, error, archs = _spconv_import() if builds else (False, None, None, set())
    if builds and not imports:
        names = " ".join(b.distribution for b in builds)
        flags.append(
            Flag(
                FAIL,
                f"{names} is installed but does not import: {error}",
                f"pip uninstall -y {names} && {install}",
            )
        )
    cuda_builds = [b for b in builds if b.cuda]
    if torch_cuda is not None and wheel is not None:
        best = cuda_tag_version(wheel.removeprefix("spconv-"))
        for build in cuda_builds:
            flags += _cuda_mismatch_flags(build, torch_cuda, best, wheel)
    on_cuda = device.type == "cuda"
    cpu_build = bool(builds) and imports and cpu_only
    if cpu_build and torch.cuda.is_available():
        flags.append(
            Flag(
                FAIL if on_cuda else WARN,
                "spconv is its CPU-only build on a machine with a CUDA GPU: sparse convolutions on the GPU "
                "fall back to the pure-PyTorch reference backend, which is much slower",
                f"pip uninstall -y spconv && {install}",
            )
        )
    if on_cuda and not builds:
        flags.append(
            Flag(
                WARN,
                "spconv is not installed: sparse convolutions on the GPU use the pure-PyTorch reference "
                "backend, which is much slower",
                install,
            )
        )
    if on_cuda and imports and not cpu_only:
        flags += _arch_flags(device, archs, wheel)
    from spotocc.models.sparse.conv import DISABLE_SPCONV_ENV, spconv_disabled

    if on_cuda and spconv_disabled():
        flags.append(
            Flag(
                WARN,
                f"{DISABLE_SPCONV_ENV}={os.environ.get(DISABLE_SPCONV_ENV)} turns spconv off: sparse "
                "convolutions on the GPU use the slow reference backend",
                f"unset {DISABLE_SPCONV_ENV}",
            )
        )
    return flags


def _cuda_mismatch_flags(build: SpconvBuild, torch_cuda: str, best: str, wheel: str) -> list[Flag]:
    have, want = _version_tuple(build.cuda or ""), _version_tuple(torch_cuda)
    fix = f"pip uninstall -y {build.distribution} && pip install {wheel}"
    if have > want:
        return [
            Flag(
                FAIL,
                f"{build.distribution} is built for CUDA {build.cuda}, newer than torch's CUDA {torch_cuda}: "
                "its kernels need a driver for CUDA "
                f"{build.cuda}, and {wheel} is the build for this torch",
                fix,
            )
        ]
    if have[:1] != _version_tuple(best)[:1]:
        return [
            Flag(
                FAIL,
                f"{build.distribution} is built for CUDA {build.cuda}, torch for CUDA {torch_cuda}: another "
                f"CUDA major version than torch's closest spconv build, {wheel}",
                fix,
            )
        ]
    if have[:1] != want[:1]:
        return [
            Flag(
                WARN,
                f"{build.distribution} (CUDA {build.cuda}) is the newest spconv build, but torch uses "
                f"CUDA {torch_cuda}: spconv has not tested its runtime next to torch's; the sparse conv "
                "self-check shows whether it works here",
                "none needed while the self-checks pass (spconv publishes no wheel for this CUDA yet)",
            )
        ]
    if have < _version_tuple(best):
        return [
            Flag(
                WARN,
                f"{build.distribution} is built for CUDA {build.cuda}, older than {wheel}, the closest build "
                f"to torch's CUDA {torch_cuda}",
                fix,
            )
        ]
    return []


def _arch_flags(device: torch.device, archs: set, wheel: str | None) -> list[Flag]:
    """A GPU newer than every architecture spconv was compiled for (it then relies on PTX JIT)."""
    compiled = sorted(tuple(a) for a in archs if isinstance(a, tuple | list) and len(a) == 2)
    if not compiled or not torch.cuda.is_available():
        return []
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability in compiled or capability < compiled[-1]:
        return []
    newest = "sm_{}{}".format(*compiled[-1])
    return [
        Flag(
            WARN,
            f"spconv is compiled for GPUs up to {newest}, this one is sm_{capability[0]}{capability[1]}: its "
            "kernels are JIT-compiled from PTX (slow first calls) or missing",
            f"pip install --upgrade {wheel}" if wheel else "build spconv from source for this GPU",
        )
    ]


def paired_torchvision() -> str | None:
    """The torchvision release (``"0.20"``) built for the installed torch 2.N, or None if unknown."""
    major_minor = _version_tuple(torch.__version__)
    if len(major_minor) != 2 or major_minor[0] != 2:
        return None
    return f"0.{major_minor[1] + 15}"  # torch 2.N pairs with torchvision 0.(N+15)


def _torch_stack_flags() -> list[Flag]:
    """torchvision built for another torch; numpy 2 under a torch built against numpy 1."""
    flags = []
    torch_version = _version_tuple(torch.__version__)
    vision, expected = _dist_version("torchvision"), paired_torchvision()
    if vision is not None and expected is not None and _version_tuple(vision) != _version_tuple(expected):
        flags.append(
            Flag(
                FAIL,
                f"torchvision {vision} belongs to another torch release than torch {torch.__version__} "
                f"(which pairs with torchvision {expected}): its C++ ops, deformable conv among them, may "
                "fail to load",
                f'pip install "torchvision=={expected}.*"',
            )
        )
    numpy = _dist_version("numpy")
    if numpy is not None and _version_tuple(numpy)[:1] >= (2,) and torch_version < (2, 3):
        flags.append(
            Flag(
                FAIL,
                f"numpy {numpy} with torch {torch.__version__}: torch before 2.3 is built against numpy 1",
                'pip install "numpy<2"',
            )
        )
    return flags
