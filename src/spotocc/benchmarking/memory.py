"""Peak memory of a block of code: the CUDA allocator's peak, or the process' resident set on CPU.

On CUDA the numbers are exact for tensors (``torch.cuda.max_memory_allocated``). On CPU they come
from Linux's ``/proc/self/status``: the resident-set high-water mark (``VmHWM``), reset before the
block through ``/proc/self/clear_refs``. Memory that the C allocator keeps after ``free`` would hide
a block's growth if the block reused it, so first glibc's ``malloc_trim(0)`` hands it back (its
pages stop being resident; reusing them counts again). Trimming and re-faulting pages cost time: do
not time a block while measuring its memory. Where ``/proc`` cannot be used, CPU peaks are ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["MemoryPeak", "measure_peak", "release_free_memory", "resident_mib"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class MemoryPeak:
    """Memory of one measured block, in MiB (``None`` where it cannot be measured)."""

    peak_mib: float | None = None  # the highest total during the block (RSS, or allocated on CUDA)
    growth_mib: float | None = None  # peak_mib minus the total just before the block


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_mib() -> float | None:
    """The process' resident set size now (Linux), in MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Give memory the C allocator holds after ``free`` back to the system (glibc; else nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the high-water mark to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


@contextmanager
def measure_peak(device: torch.device, result: MemoryPeak):
    """Fill ``result`` with the peak memory of the ``with`` block on ``device``.

    The caller synchronises CUDA work inside the block if it wants it counted (the allocator's
    peak includes every allocation made, finished or not).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.peak_mib, result.growth_mib = peak / 2**20, (peak - before) / 2**20
        return
    release_free_memory()
    before_kib = _status_kib("VmRSS")
    can_reset = before_kib is not None and _reset_rss_peak()
    yield result
    peak_kib = _status_kib("VmHWM") if can_reset else None
    if peak_kib is not None and before_kib is not None:
        result.peak_mib, result.growth_mib = peak_kib / 1024, (peak_kib - before_kib) / 1024
