import random

import numpy as np
import torch
from engine_toys import ToyDataset
from torch.utils.data import DataLoader, Dataset

from spotocc.data import collate
from spotocc.engine.sampling import (
    ContiguousShards,
    ResumableDistributedSampler,
    SeededSamples,
    sample_seed,
    seeded_rngs,
)


class _Range(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_ranks_split_the_single_process_order_into_global_batches():
    data = _Range(12)
    single = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=3)
    single.set_epoch(2)
    order = [i for i, _ in single]
    assert sorted(order) == list(range(12)) and order != list(range(12))
    ranks = []
    for r in range(2):
        s = ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3)
        s.set_epoch(2)
        ranks.append([i for i, _ in s])
    batch = 2  # per rank; the single process uses 4
    for step in range(3):
        global_batch = order[4 * step : 4 * step + 4]
        per_rank = (
            ranks[0][batch * step : batch * step + batch] + ranks[1][batch * step : batch * step + batch]
        )
        assert sorted(global_batch) == sorted(per_rank)


def test_set_start_skips_and_seeds_depend_on_epoch_and_index_only():
    data = _Range(10)
    s = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=0)
    s.set_epoch(1)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(2)  # a new epoch starts from its beginning
    assert len(s) == 10
    assert dict(full)[full[0][0]] == sample_seed(0, 1, full[0][0])
    assert sample_seed(0, 1, 5) != sample_seed(0, 2, 5) != sample_seed(1, 1, 5)


def test_seeded_samples_are_reproducible_and_leave_global_state_alone():
    dataset = SeededSamples(ToyDataset(4, occ_size=(2, 2, 2), train=True))
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    torch.manual_seed(1)
    before = (random.random(), np.random.random(), torch.rand(1).item())  # noqa: NPY002
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    torch.manual_seed(1)
    a = dataset[(2, 1234)]["img"]
    b = dataset[(2, 1234)]["img"]
    c = dataset[(2, 99)]["img"]
    after = (random.random(), np.random.random(), torch.rand(1).item())  # noqa: NPY002
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert before == after  # augmentation did not consume the caller's generators


def test_seeded_rngs_restores_state():
    state = torch.get_rng_state()
    with seeded_rngs(5):
        x = torch.rand(3)
    with seeded_rngs(5):
        y = torch.rand(3)
    assert torch.equal(x, y) and torch.equal(torch.get_rng_state(), state)


def test_data_loader_workers_do_not_change_samples():
    dataset = ToyDataset(6, occ_size=(2, 2, 2), train=True)
    sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=0)
    batches = []
    for workers in (0, 2):
        sampler.set_epoch(0)
        loader = DataLoader(
            SeededSamples(dataset), batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate
        )
        batches.append([b["img"] for b in loader])
    assert all(torch.equal(x, y) for x, y in zip(*batches))


def test_contiguous_shards_cover_every_index_once():
    for n in (0, 1, 5, 7, 12):
        for world in (1, 2, 3):
            indices = [i for r in range(world) for i in ContiguousShards(n, num_replicas=world, rank=r)]
            assert indices == list(range(n)), (n, world)
