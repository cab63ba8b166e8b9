import pytest
import torch
import torch.multiprocessing as mp
from engine_toys import batchnorm_worker
from torch import nn

from spotocc.engine.distributed import (
    CrossProcessBatchNorm,
    all_gather_objects,
    convert_sync_batchnorm,
    get_rank,
    get_world_size,
    init_distributed,
    reduce_mean,
)


def test_identity_helpers_without_a_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
    t = torch.tensor([1.0, 3.0])
    assert reduce_mean(t) is t and get_rank() == 0 and get_world_size() == 1
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    with pytest.raises(ValueError, match="device"):
        init_distributed("tpu")


def test_cross_process_batchnorm_alone_is_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=None)  # cumulative averaging too
    ours = CrossProcessBatchNorm(4, momentum=None)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5)
    for _ in range(2):
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var) and ours.num_batches_tracked.item() == 2
    ours.eval()
    ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_convert_keeps_parameters_buffers_and_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    model[1].eval()
    model[1].weight.requires_grad_(False)
    weight = model[1].weight
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CrossProcessBatchNorm) and isinstance(
        converted[2][0], CrossProcessBatchNorm
    )
    assert converted[1].weight is weight and not converted[1].training and not weight.requires_grad
    assert set(converted.state_dict()) == set(model.state_dict())
    assert isinstance(converted[1], nn.modules.batchnorm._BatchNorm)  # still a norm for the optimiser


def test_cross_process_batchnorm_equals_one_batchnorm_over_the_global_batch(tmp_path):
    """Two gloo processes with inputs of different sizes (dense 4-D and sparse-style [N, C])."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "dense": [torch.randn(2, 3, 4, 4, generator=g) * 2 + 1, torch.randn(1, 3, 4, 4, generator=g)],
        "sparse": [torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g) - 3],
    }
    weights = {case: [torch.randn(x.shape, generator=g) for x in xs] for case, xs in inputs.items()}
    ref_bn = nn.BatchNorm1d(3, momentum=0.1)
    with torch.no_grad():
        ref_bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
        ref_bn.bias.copy_(torch.tensor([0.0, 0.1, -0.2]))
    state = {k: v.clone() for k, v in ref_bn.state_dict().items()}
    torch.save({"inputs": inputs, "weights": weights, "state": state}, tmp_path / "payload.pt")
    mp.spawn(
        batchnorm_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "payload.pt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case, xs in inputs.items():
        bn = nn.BatchNorm2d(3) if case == "dense" else nn.BatchNorm1d(3)
        bn.load_state_dict(state)
        x = torch.cat(xs).requires_grad_(True)
        y = bn(x)
        (y * torch.cat(weights[case])).sum().backward()
        sizes = [len(t) for t in xs]
        got = {key: [ranks[r][case][key] for r in range(2)] for key in ranks[0][case]}
        assert torch.allclose(torch.cat(got["y"]), y, atol=1e-5), case
        assert torch.allclose(torch.cat(got["x_grad"]), x.grad, atol=1e-5), case
        # parameter gradients: each rank holds its share, DDP sums (then averages) them
        assert torch.allclose(got["weight_grad"][0] + got["weight_grad"][1], bn.weight.grad, atol=1e-5), case
        assert torch.allclose(got["bias_grad"][0] + got["bias_grad"][1], bn.bias.grad, atol=1e-5), case
        for r in range(2):
            assert torch.allclose(got["running_mean"][r], bn.running_mean, atol=1e-6), case
            assert torch.allclose(got["running_var"][r], bn.running_var, atol=1e-6), case
        assert sizes[0] != sizes[1]


def test_reduce_mean_averages_over_a_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        value = torch.tensor([2.0, 6.0])
        reduced = reduce_mean(value)
        assert torch.equal(reduced, value) and reduced is not value
        assert torch.equal(value, torch.tensor([2.0, 6.0]))  # input untouched
    finally:
        dist.destroy_process_group()
