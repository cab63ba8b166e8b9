"""Deterministic, resumable sample order and per-sample augmentation seeds.

Training order is ``torch.utils.data.DistributedSampler``'s (a permutation seeded by ``seed + epoch``,
rank ``r`` taking every ``world_size``-th index), so one process with batch ``W * B`` sees the same
global batches as ``W`` processes with batch ``B``. :class:`ResumableDistributedSampler` can start
part-way into an epoch and hands each index out with a seed derived from ``(seed, epoch, index)``;
:class:`SeededSamples` seeds Python's, NumPy's and torch's CPU generators with it around
``dataset[index]``. A sample's augmentation therefore depends only on the seed, the epoch and the
sample, not on the number of processes or data-loader workers, nor on where a run was resumed.

Evaluation uses :class:`ContiguousShards`: each rank takes one contiguous slice of the dataset with
no padding, so every sample is evaluated exactly once whatever the world size.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["ContiguousShards", "ResumableDistributedSampler", "SeededSamples", "sample_seed", "seeded_rngs"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample in one epoch (independent streams via NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator; restore their states on exit.

    Only the CPU generator is touched (``torch.default_generator``), so a CUDA generator used by the
    model in the main process is left alone.
    """
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),  # noqa: NPY002 (the global generator datasets use)
        torch.default_generator.get_state(),
    )
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global generator datasets use)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002 (the global generator datasets use)
        torch.default_generator.set_state(torch_state)


class SeededSamples(Dataset):
    """Wraps a dataset so that ``self[(index, seed)]`` is ``dataset[index]`` under :func:`seeded_rngs`.

    A plain integer key reads the sample without seeding (evaluation).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with seeded_rngs(seed):
                return self.dataset[index]
        return self.dataset[key]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(index, sample_seed)`` and can skip the start of an epoch.

    Call ``set_epoch(epoch)`` before each epoch and ``set_start(n)`` to skip this rank's first ``n``
    samples of that epoch (resuming mid-epoch); ``set_epoch`` resets the skip to 0.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"set_start({start}): this rank has {self.num_samples} samples per epoch")
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start :]
        for index in indices:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ContiguousShards(Sampler[int]):
    """Rank ``r`` of ``W`` gets indices ``[r * n // W, (r + 1) * n // W)``: no padding, no duplicates."""

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.begin = rank * length // num_replicas
        self.end = (rank + 1) * length // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
