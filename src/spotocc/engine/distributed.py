"""Helpers for multi-process training that are safe to call in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes when torch.distributed is initialised; identity otherwise.

    Every process must call it (it is a collective); the input is not modified.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return reduced
