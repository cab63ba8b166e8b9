"""What the CUDA tests share: the ``cuda`` marker with its skip, and the spconv CUDA requirement.

Every test module here sets ``pytestmark = CUDA_ONLY``: ``pytest -m cuda`` selects them, and without
a GPU each is skipped with the reason. ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def require_spconv_cuda() -> None:
    """Skip (with the command that installs it) unless spconv's CUDA build runs on this GPU."""
    from spotocc.models.sparse.conv import DISABLE_SPCONV_ENV, resolve_backend, spconv_disabled

    if spconv_disabled():
        pytest.skip(f"{DISABLE_SPCONV_ENV} is set: spotocc does not use spconv")
    try:
        resolve_backend("spconv", torch.device("cuda"))
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"needs spconv's CUDA build (pip install $(spotocc doctor --spconv-wheel)): {err}")
