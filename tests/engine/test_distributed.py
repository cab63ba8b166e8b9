import torch
import torch.distributed as dist

from spotocc.engine.distributed import reduce_mean


def test_reduce_mean_is_the_identity_without_a_process_group():
    value = torch.tensor(3.5)
    assert reduce_mean(value) is value


def test_reduce_mean_averages_over_a_single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        value = torch.tensor([2.0, 6.0])
        reduced = reduce_mean(value)
        assert torch.equal(reduced, value) and reduced is not value
        assert torch.equal(value, torch.tensor([2.0, 6.0]))  # input untouched
    finally:
        dist.destroy_process_group()
