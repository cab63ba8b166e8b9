import torch

from spotocc.models.heads.targets import occupancy_to_class_masks


def test_class_masks_skip_ignore_and_keep_empty_class():
    gt = torch.tensor([[[0, 3], [255, 3]], [[0, 0], [7, 255]]], dtype=torch.uint8)
    labels, masks = occupancy_to_class_masks(gt, num_classes=5)  # 7 >= num_classes: ignored as well
    assert labels.tolist() == [0, 3]
    assert masks.shape == (2, 2, 2, 2)
    assert torch.equal(masks[0], gt == 0) and torch.equal(masks[1], gt == 3)
