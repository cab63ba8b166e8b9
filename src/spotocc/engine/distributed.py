"""Process-group helpers: torchrun detection, init/teardown, rank-0 gating, reductions, SyncBN.

Everything here is a no-op (identity) in a plain single process, so the training and evaluation code
is the same with and without ``torchrun``. Backend: nccl when the process drives a CUDA device, gloo
otherwise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "CrossProcessBatchNorm",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "reduce_mean",
    "teardown_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) is set."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, and pick this process's device.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``. Under torchrun the
    CUDA device is ``cuda:LOCAL_RANK`` and the backend nccl; on CPU the backend is gloo.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch_device if use_cuda else None,
        )
    return DistInfo(rank, world_size, local_rank, torch_device)


def teardown_distributed() -> None:
    """Leave the process group (if any), after every rank has arrived: a rank that destroys its gloo
    group while a peer is still using it can abort the peer ("terminate called without an active
    exception", seen intermittently in the two-process test)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` across processes (a new tensor); the identity when not distributed."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` across processes (a new tensor); the identity when not distributed."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


# --------------------------------------------------------------------------------------------------
# Synchronised BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is again the sum over processes.

    Used instead of ``torch.distributed.nn.functional.all_reduce``: with torch 2.14 and gloo, a
    backward through that one made about one spawned process in eight abort at exit ("terminate
    called without an active exception"); this plain Function never did in the same loop.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """``all_reduce`` (sum) that autograd can pass through."""
    return _AllReduceSum.apply(x)


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all processes, on any device and backend.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so CPU (gloo) runs use this module: the batch mean
    and biased variance come from an autograd-aware ``all_reduce`` of per-channel sums over every
    process's inputs (inputs of different sizes allowed), so forward and backward equal one BatchNorm
    over the concatenated global batch. Running statistics are updated with the unbiased variance, as
    BatchNorm does. Outside training, or without a process group, it is a plain BatchNorm. Parameter
    and buffer names are BatchNorm's, so state dicts move freely between the two.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if not (use_batch_stats and is_distributed() and get_world_size() > 1):
            return _plain_batch_norm(self, input)
        channels = input.shape[1]
        reduce_dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // max(channels, 1)], dtype=torch.float64, device=input.device)
        dist.all_reduce(count)  # total elements per channel over all processes
        total = float(count.item())
        if total <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(total)}")
        x = input.float()
        mean = differentiable_all_reduce(x.sum(dim=reduce_dims)) / total  # [C]
        centred = x - mean.reshape(shape)
        var = differentiable_all_reduce((centred * centred).sum(dim=reduce_dims)) / total  # [C], biased
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked.item())
                else:
                    factor = self.momentum
                unbiased = var.detach() * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(
                    mean.detach().to(self.running_mean.dtype), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def _plain_batch_norm(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """What ``torch.nn.BatchNorm*d.forward`` computes (shared by the cross-process module)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked.item()) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return nn.functional.batch_norm(
        input,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        factor,
        bn.eps,
    )


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in ``module`` synchronised across processes (released ``sync_bn=True``).

    On CUDA this is ``torch.nn.SyncBatchNorm``; on other devices :class:`CrossProcessBatchNorm`.
    Modules keep their training/eval mode and ``requires_grad`` flags.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_cross_process(module)


def _convert_to_cross_process(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        out = CrossProcessBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert_to_cross_process(child))
    return out
