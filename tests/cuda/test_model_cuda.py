"""The whole model on CUDA: a training step and a prediction of ``synthetic_tiny`` under bf16 and fp16
autocast, for both heads (``head.type`` spot and sparseocc), through the doctor's model check.

The check (:class:`~spotocc.diagnostics.model_check.TinyModelCheck`) generates two scenes, reads them
with the real reader, and fails on a non-finite loss, gradient or weight, on a step that moves no
weight, on labels of the wrong shape or range, and on an autocast loss more than 10% away from the
float32 loss of the same weights and batch (run first, in the fixture). fp16 runs through a
GradScaler, as the trainer does.
"""

from __future__ import annotations

import pytest
import torch
from cuda_support import CUDA_ONLY

from spotocc.diagnostics.model_check import TinyModelCheck
from spotocc.models.sparse import resolve_backend

pytestmark = CUDA_ONLY


@pytest.fixture(scope="module", params=["spot", "sparseocc"])
def model_check(request):
    """A model check of one head whose float32 run (the reference loss) has passed."""
    check = TinyModelCheck(overrides=[f"head.type={request.param}"])
    detail = check.run(torch.device("cuda"), "none")
    assert "peak allocated memory" in detail, detail
    return check


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_step_and_prediction_under_autocast(model_check, amp):
    device = torch.device("cuda")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 (before Ampere)")
    detail = model_check.run(device, amp)
    assert "from float32)" in detail and "peak allocated memory" in detail, detail
    backend = resolve_backend("auto", device)  # spconv when its CUDA build is installed
    assert f"sparse backend {backend}" in detail, detail
    assert "none" in model_check.first_loss and amp in model_check.first_loss
