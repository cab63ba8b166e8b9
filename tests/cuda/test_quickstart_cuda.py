"""``spotocc quickstart --device cuda``, small: generate, train, evaluate and draw, all on the GPU."""

from __future__ import annotations

import json

from cuda_support import CUDA_ONLY

from spotocc import cli

pytestmark = CUDA_ONLY


def test_quickstart_on_cuda(tmp_path, capsys):
    argv = ["quickstart", "--device", "cuda", "--num-train", "4", "--num-val", "2", "--epochs", "1"]
    code = cli.main([*argv, "--work-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training synthetic_tiny on cuda: 1 process(es)" in (tmp_path / "train" / "train.log").read_text()
    results = json.loads((tmp_path / "quickstart.json").read_text())
    for name in ("model", "baseline"):
        assert 0.0 <= results[name]["SC_IoU"] <= 100.0 and 0.0 <= results[name]["SSC_mIoU"] <= 100.0
    assert len(list((tmp_path / "predictions").rglob("*.npz"))) == 2
    assert (tmp_path / "quickstart.png").stat().st_size > 0
