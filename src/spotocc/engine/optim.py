"""AdamW with the released per-parameter weight decay, gradient clipping and the step schedule.

The released configs (``projects/configs/spotocc/*.py``) build AdamW(lr=1e-4, weight_decay=0.01,
betas=(0.9, 0.999), eps=1e-8) through mmcv's ``DefaultOptimizerConstructor`` with
``paramwise_cfg = dict(custom_keys={query_embed, query_feat, level_embed: decay 0, absolute_pos_embed,
relative_position_bias_table: decay 0}, norm_decay_mult=0.0)``. Under mmcv's rules that means:

- a parameter whose full name contains one of those keys gets no weight decay (the longest matching
  key wins; ``lr`` unchanged);
- otherwise every parameter of a normalisation module (BatchNorm / SyncBatchNorm, GroupNorm,
  LayerNorm, InstanceNorm) gets no weight decay;
- everything else decays by 0.01, **biases included** (``bias_decay_mult`` is left at 1), and so do
  embeddings not named above (the SPOT head's denoising ``label_enc`` decays).

The gradient norm is clipped to 35 (L2 over all parameters) and the learning rate is multiplied by
0.1 after each epoch in ``TrainConfig.lr_steps`` (mmcv ``policy='step'``, no warm-up).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from spotocc.config import TrainConfig

__all__ = [
    "NO_DECAY_KEYS",
    "StepSchedule",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_gradients",
    "lr_at_epoch",
    "param_groups",
]

# mmcv custom_keys with decay_mult=0 in the released configs
NO_DECAY_KEYS: tuple[str, ...] = (
    "query_embed",
    "query_feat",
    "level_embed",
    "absolute_pos_embed",
    "relative_position_bias_table",
)

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str] = NO_DECAY_KEYS
) -> list[dict]:
    """Two AdamW parameter groups, ``decay`` and ``no_decay``, by the released rules (module docstring).

    Each group carries ``"name"`` and ``"param_names"``; frozen parameters (``requires_grad=False``)
    are left out. The order inside each group follows ``model.named_parameters()``, so a rebuilt
    optimizer loads a saved state dict.
    """
    # longest key first, as mmcv sorts custom_keys
    keys = sorted(sorted(no_decay_keys), key=len, reverse=True)
    norm_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if any(key in name for key in keys) or id(param) in norm_params:
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    return [
        {
            "name": "decay",
            "params": [p for _, p in decay],
            "param_names": [n for n, _ in decay],
            "weight_decay": weight_decay,
        },
        {
            "name": "no_decay",
            "params": [p for _, p in no_decay],
            "param_names": [n for n, _ in no_decay],
            "weight_decay": 0.0,
        },
    ]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(lr, betas=(0.9, 0.999), eps=1e-8) over :func:`param_groups` (released optimiser)."""
    groups = [g for g in param_groups(model, train_cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at_epoch(train_cfg: TrainConfig, epoch: int) -> float:
    """Learning rate during 0-based ``epoch``: ``lr * gamma ** (number of steps s with epoch >= s)``."""
    return train_cfg.lr * train_cfg.lr_gamma ** sum(1 for s in train_cfg.lr_steps if epoch >= s)


class StepSchedule:
    """mmcv ``policy='step'`` by epoch: group lr = initial lr * gamma ** (number of steps s with epoch >= s).

    ``step()`` once at the end of every epoch. Its state is two plain values, so a checkpoint holding it
    loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float):
        self.optimizer = optimizer
        self.milestones = tuple(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.epoch = 0
        self._apply()

    def _apply(self) -> None:
        factor = self.gamma ** sum(1 for m in self.milestones if self.epoch >= m)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> StepSchedule:
    """Step schedule, stepped once per epoch: lr *= ``lr_gamma`` after each epoch in ``lr_steps``."""
    return StepSchedule(optimizer, train_cfg.lr_steps, train_cfg.lr_gamma)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the global L2 gradient norm to ``max_norm`` (None or <= 0: no clipping); returns the norm."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    if max_norm is None or max_norm <= 0:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0)
