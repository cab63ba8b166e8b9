import pytest
import torch

from spotocc.data import collate


def _sample(n_cams=2, h=8, w=16, with_occ=True):
    s = {
        "img": torch.randn(n_cams, 3, h, w),
        "rots": torch.eye(3).repeat(n_cams, 1, 1),
        "trans": torch.zeros(n_cams, 3),
        "intrins": torch.eye(4).repeat(n_cams, 1, 1),
        "post_rots": torch.eye(3).repeat(n_cams, 1, 1),
        "post_trans": torch.zeros(n_cams, 3),
        "bda": torch.eye(4),
        "meta": {"sample_id": "a"},
    }
    if with_occ:
        s["gt_occ"] = torch.zeros(4, 4, 2, dtype=torch.uint8)
    return s


def test_collate_stacks_and_keeps_optional_keys_only_when_all_have_them():
    batch = collate([_sample(), _sample(), _sample()])
    assert batch["img"].shape == (3, 2, 3, 8, 16)
    assert batch["gt_occ"].dtype == torch.uint8 and batch["gt_occ"].shape == (3, 4, 4, 2)
    assert [m["sample_id"] for m in batch["meta"]] == ["a"] * 3
    assert "gt_occ" not in collate([_sample(), _sample(with_occ=False)])


def test_collate_errors_name_the_key():
    with pytest.raises(ValueError, match="'img'"):
        collate([_sample(), _sample(h=9)])
    bad = _sample()
    del bad["bda"]
    with pytest.raises(KeyError, match="bda"):
        collate([_sample(), bad])
