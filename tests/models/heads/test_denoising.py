import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spotocc.models.heads.denoising import (
    build_denoising_queries,
    denoising_cross_attn_mask,
    denoising_query_padding_mask,
    denoising_self_attn_mask,
    pool_class_masks,
)


def label_embed(num_classes=5, dims=4):
    torch.manual_seed(0)
    return nn.Embedding(num_classes, dims)


def test_query_layout_batch_two_with_different_gt_counts():
    embed = label_embed()
    labels = [torch.tensor([0, 2, 3]), torch.tensor([1, 4])]
    dn = build_denoising_queries(
        labels, embed, num_queries=4, num_classes=5, scalar=2, noise_scale=0.0, label_noise_ratio=0.0
    )
    assert dn.meta == {"pad_size": 6, "scalar": 2, "max_num_gts": 3, "num_gts_list": [3, 2]}
    w = embed.weight.detach()
    zero = torch.zeros(4)
    expected = torch.stack(
        [
            torch.stack([w[0], w[2], w[3], w[0], w[2], w[3]]),  # group g at slots g*3 + t
            torch.stack([w[1], w[4], zero, w[1], w[4], zero]),  # slot t >= n_b: padding
        ]
    )
    torch.testing.assert_close(dn.content, expected)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 2] = padding[1, 5] = True
    assert torch.equal(dn.query_padding_mask, padding)
    # self-attention: DN groups blind to each other, matching rows blind to all DN columns
    expected_mask = torch.zeros(10, 10, dtype=torch.bool)
    for row in range(10):
        for col in range(6):
            if row >= 6 or row // 3 != col // 3:
                expected_mask[row, col] = True
    assert torch.equal(dn.self_attn_mask, expected_mask)
    assert [t.tolist() for t in dn.labels] == [[0, 2, 3], [1, 4]]


def test_scalar_one_masks():
    mask = denoising_self_attn_mask(max_num_gts=2, scalar=1, num_queries=3)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2:, :2] = True
    assert torch.equal(mask, expected)
    padding = denoising_query_padding_mask([2, 0, 1], scalar=1, num_queries=3)
    assert padding.tolist() == [
        [False, False, False, False, False],
        [True, True, False, False, False],
        [False, True, False, False, False],
    ]


def test_no_ground_truth_means_no_denoising():
    embed = label_embed()
    empty = [torch.zeros(0, dtype=torch.long)] * 2
    kwargs = dict(num_queries=4, num_classes=5, noise_scale=0.1, label_noise_ratio=0.1)
    assert build_denoising_queries(empty, embed, scalar=1, **kwargs) is None
    assert build_denoising_queries([torch.tensor([1])], embed, scalar=0, **kwargs) is None
    dn = build_denoising_queries(
        [torch.zeros(0, dtype=torch.long), torch.tensor([3])], embed, scalar=1, **kwargs
    )
    assert dn.query_padding_mask[:, :1].tolist() == [[True], [False]]
    assert torch.all(dn.content[0] == 0)


def test_label_and_feature_noise_follow_the_generator():
    embed = label_embed()
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([4])]
    gen = torch.Generator().manual_seed(7)
    dn = build_denoising_queries(
        labels,
        embed,
        num_queries=2,
        num_classes=5,
        scalar=1,
        noise_scale=0.2,
        label_noise_ratio=0.5,
        generator=gen,
    )
    # replay the documented draws: per sample, flips, replacement labels, then feature noise
    gen = torch.Generator().manual_seed(7)
    expected = torch.zeros(2, 4, 4)
    for b, lab in enumerate(labels):
        flip = torch.rand(lab.shape, generator=gen) < 0.5
        noisy = lab.clone()
        noisy[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=gen)
        noise = (torch.rand(len(lab), 4, generator=gen) * 2 - 1) * 0.2
        expected[b, : len(lab)] = embed.weight.detach()[noisy] + noise
    torch.testing.assert_close(dn.content, expected)
    assert [t.tolist() for t in dn.labels] == [[0, 1, 2, 3], [4]]  # targets stay clean


def test_pool_class_masks_equals_max_pool():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 16, 8, 10, generator=gen) < 0.05
    for level in [(4, 2, 5), (2, 2, 1), (8, 8, 2)]:
        strides = [g // s for g, s in zip(masks.shape[1:], level)]
        expected = F.max_pool3d(masks.float(), kernel_size=strides, stride=strides) > 0.5
        assert torch.equal(pool_class_masks(masks, level), expected)
    # GT size not a multiple: max_pool would give 5 cells along z (stride 2); the level has 4
    pooled = pool_class_masks(masks, (4, 2, 4))
    expected = F.max_pool3d(masks.float(), kernel_size=(4, 4, 2), stride=(4, 4, 2)) > 0.5
    assert torch.equal(pooled, expected[..., :4])
    with pytest.raises(ValueError, match="coarser"):
        pool_class_masks(masks, (32, 2, 2))


def test_cross_attn_mask_layout():
    pooled = [
        torch.tensor([[[[True, False]], [[False, False]]], [[[False, True]], [[True, True]]]]),  # n_b = 2
        torch.tensor([[[[False, False]], [[False, True]]]]),  # n_b = 1
    ]  # each [n_b, 2, 1, 2] -> K = 4
    mask = denoising_cross_attn_mask(pooled, max_num_gts=2, scalar=2, num_queries=3)
    assert mask.shape == (2, 7, 4)
    allowed0 = [[True, False, False, False], [False, True, True, True]]
    allowed1 = [[False, False, False, True], [False] * 4]  # slot 1: padding, blocked everywhere
    for b, allowed in enumerate([allowed0, allowed1]):
        for slot in range(4):
            assert (~mask[b, slot]).tolist() == allowed[slot % 2]
        assert not mask[b, 4:].any()  # matching queries never masked
