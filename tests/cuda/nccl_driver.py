"""Run by ``torchrun`` in the CUDA tests: the process-group helpers over nccl, and DDP with SyncBN.

torchrun --standalone --nproc_per_node=1 nccl_driver.py RESULT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from spotocc.engine import distributed as dist_utils


def main(out_path: str) -> int:
    info = dist_utils.init_distributed("cuda")
    values = torch.tensor([1.0, 2.0], device=info.device)
    result = {
        "rank": info.rank,
        "world_size": info.world_size,
        "device": str(info.device),
        "backend": dist.get_backend(),
        "all_reduce_sum": dist_utils.all_reduce_sum(values.clone()).tolist(),
        "reduce_mean": dist_utils.reduce_mean(values).tolist(),
        "gathered": dist_utils.all_gather_objects({"rank": info.rank}),
        "broadcast": dist_utils.broadcast_object("from rank 0" if info.is_main else None),
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).to(info.device)
    model = dist_utils.convert_sync_batchnorm(model, info.device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index])
    ddp(torch.randn(16, 4, device=info.device)).square().mean().backward()  # gradients all-reduced
    result["ddp_grads_finite"] = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    dist_utils.barrier()
    if info.is_main:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist_utils.teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
