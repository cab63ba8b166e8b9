"""``torchrun --nproc_per_node=1`` on a GPU: the nccl process group, and ``spotocc train`` under it.

The CPU / gloo version with two processes is tests/engine/test_trainer.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cuda_support import CUDA_ONLY

pytestmark = CUDA_ONLY

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_nccl_process_group_and_ddp(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [*TORCHRUN, str(HERE / "nccl_driver.py"), str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "nccl" and result["device"] == "cuda:0"
    assert (result["rank"], result["world_size"]) == (0, 1)
    assert result["all_reduce_sum"] == [1.0, 2.0] and result["reduce_mean"] == [1.0, 2.0]
    assert result["gathered"] == [{"rank": 0}] and result["broadcast"] == "from rank 0"
    assert result["ddp_grads_finite"] is True


def test_spotocc_train_under_torchrun_on_cuda(tmp_path):
    from spotocc.config import get_config
    from spotocc.data.synthetic import generate, source_image_size

    cfg = get_config("synthetic_tiny")
    summary = generate(
        tmp_path / "data",
        "semantickitti",
        num_train=2,
        num_val=1,
        seed=0,
        grid=cfg.grid,
        image_size=source_image_size(cfg.data),
        lidar_azimuth_steps=128,
    )
    work_dir = tmp_path / "run"
    command = [
        *TORCHRUN,
        "-m",
        "spotocc.cli",
        "train",
        "synthetic_tiny",
        *summary.data_overrides,
        "--device",
        "cuda",
        "--amp",
        "bf16",
        "--max-iters",
        "2",
        "--no-eval",
        "--no-progress",
        "--work-dir",
        str(work_dir),
    ]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda:0: 1 process(es) x batch 2 = effective batch 2" in proc.stdout, proc.stdout[-3000:]
    assert "amp=bf16" in proc.stdout and "done: 2 iterations" in proc.stdout
    assert (work_dir / "checkpoints" / "last").exists()
