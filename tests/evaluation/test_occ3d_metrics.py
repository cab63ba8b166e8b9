import math

import numpy as np
import pytest
import torch

from spotocc.evaluation.occ3d import OCC3D_CLASS_NAMES, Occ3DMetrics, class_iou, geometry_iou

FREE = 17


def counted_by_hand(pred, gt, mask):
    """Per-class IoU and occupied IoU from boolean sums over the selected voxels, class by class."""
    pred, gt, mask = pred.reshape(-1), gt.reshape(-1), mask.reshape(-1).astype(bool)
    ious = []
    for c in range(18):
        tp = int(np.sum((gt == c) & (pred == c) & mask))
        fp = int(np.sum((gt != c) & (pred == c) & mask))
        fn = int(np.sum((gt == c) & (pred != c) & mask))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    occ_gt, occ_pred = gt != FREE, pred != FREE
    tp = int(np.sum(occ_gt & occ_pred & mask))
    fp = int(np.sum(~occ_gt & occ_pred & mask))
    fn = int(np.sum(occ_gt & ~occ_pred & mask))
    present = [v for v in ious[:FREE] if not math.isnan(v)]
    return ious, sum(present) / len(present), tp / (tp + fp + fn)


def random_scene(seed, shape=(2, 12, 10, 6), classes=18):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, classes, size=shape).astype(np.uint8)
    gt[rng.random(shape) < 0.5] = FREE
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, classes, size=shape)).astype(np.uint8)
    mask = rng.random(shape) < 0.4
    return pred, gt, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_camera_mask_miou_equals_a_count_by_hand(seed):
    pred, gt, mask = random_scene(seed)
    metric = Occ3DMetrics()
    metric.update(pred, gt, mask)
    results = metric.compute()
    ious, miou, iou = counted_by_hand(pred, gt, mask)
    assert results["mIoU"] == round(100 * miou, 2)
    assert results["IoU"] == round(100 * iou, 2)
    for c, name in enumerate(OCC3D_CLASS_NAMES[:FREE]):
        assert results[f"{name}_IoU"] == round(100 * ious[c], 2)
    assert "free_IoU" not in results and "unmasked_free_IoU" not in results
    # the raw, unrounded values equal the hand count too
    np.testing.assert_allclose(class_iou(metric.confusion_masked), ious, rtol=0, atol=1e-15)


def test_unmasked_variant_counts_every_voxel_and_differs_from_the_masked_one():
    pred, gt, mask = random_scene(5)
    metric = Occ3DMetrics()
    metric.update(pred, gt, mask)
    results = metric.compute()
    ious, miou, iou = counted_by_hand(pred, gt, np.ones_like(mask))
    assert results["unmasked_mIoU"] == round(100 * miou, 2)
    assert results["unmasked_IoU"] == round(100 * iou, 2)
    assert results["unmasked_car_IoU"] == round(100 * ious[4], 2)
    assert results["unmasked_mIoU"] != results["mIoU"]
    assert metric.confusion_all.sum() == gt.size
    assert metric.confusion_masked.sum() == mask.sum()


def test_hand_made_example_and_absent_classes():
    # 6 voxels: car right, car predicted as bus, free predicted as bus, barrier missed, two free.
    gt = np.array([4, 4, 17, 1, 17, 17]).reshape(1, 1, 6)
    pred = np.array([4, 3, 3, 17, 17, 17]).reshape(1, 1, 6)
    metric = Occ3DMetrics()
    metric.update(pred, gt, np.ones_like(gt, dtype=bool))
    r = metric.compute()
    assert r["car_IoU"] == 50.0  # TP 1, FN 1
    assert r["bus_IoU"] == 0.0  # predicted, never in the GT: IoU 0, and it counts in the mean
    assert r["barrier_IoU"] == 0.0  # in the GT, never predicted
    assert math.isnan(r["pedestrian_IoU"])  # in neither: NaN, left out of the mean
    assert r["mIoU"] == round(100 * (0.5 + 0 + 0) / 3, 2)
    # occupied vs free: occupied GT {0,1,3}, occupied pred {0,1,2} -> TP 2, FP 1, FN 1
    assert r["IoU"] == 50.0
    assert geometry_iou(metric.confusion_all) == 0.5


def test_batch_numpy_torch_and_split_updates_agree():
    pred, gt, mask = random_scene(7, shape=(3, 8, 8, 4))
    whole = Occ3DMetrics()
    whole.update(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask))
    parts = Occ3DMetrics()
    for i in range(3):
        parts.update(pred[i].astype(np.int64), gt[i].astype(np.int32), mask[i].astype(np.uint8))
    np.testing.assert_array_equal(whole.confusion_masked, parts.confusion_masked)
    np.testing.assert_array_equal(whole.confusion_all, parts.confusion_all)
    assert whole.samples == parts.samples == 3
    merged = Occ3DMetrics()
    merged.merge_counts(whole.export_counts())
    restored = Occ3DMetrics()
    restored.load_counts_tensor(merged.counts_tensor())
    assert restored.compute() == pytest.approx(whole.compute(), nan_ok=True)


def test_ignore_index_is_left_out_of_both_counts():
    pred, gt, mask = random_scene(3, shape=(6, 6, 4))
    gt_ignored = gt.copy()
    gt_ignored[0] = 255
    metric = Occ3DMetrics()
    metric.update(pred, gt_ignored, mask)
    reference = Occ3DMetrics()
    reference.update(pred[1:], gt[1:], mask[1:])
    np.testing.assert_array_equal(metric.confusion_masked, reference.confusion_masked)
    np.testing.assert_array_equal(metric.confusion_all, reference.confusion_all)


@pytest.mark.parametrize(
    ("pred", "gt", "mask", "error", "message"),
    [
        (
            np.zeros((2, 2, 2), int),
            np.zeros((2, 2, 3), int),
            np.ones((2, 2, 2), bool),
            ValueError,
            "one shape",
        ),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), np.ones((2, 2), bool), ValueError, r"\[X, Y, Z\]"),
        (np.full((2, 2, 2), 18), np.zeros((2, 2, 2), int), np.ones((2, 2, 2), bool), ValueError, "0..17"),
        (np.zeros((2, 2, 2), int), np.full((2, 2, 2), 20), np.ones((2, 2, 2), bool), ValueError, r"\[20\]"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int), np.ones((2, 2, 2), bool), TypeError, "integer"),
        (np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), np.full((2, 2, 2), 2), ValueError, "0 and 1"),
        (np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), np.ones((2, 2, 2)), TypeError, "mask_camera"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(pred, gt, mask, error, message):
    with pytest.raises(error, match=message):
        Occ3DMetrics().update(pred, gt, mask)


def test_constructor_checks():
    with pytest.raises(ValueError, match="collides"):
        Occ3DMetrics(ignore_index=17)
    with pytest.raises(ValueError, match="at least 2"):
        Occ3DMetrics(class_names=["free"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_give_the_cpu_counts():
    pred, gt, mask = random_scene(11)
    cpu, gpu = Occ3DMetrics(), Occ3DMetrics()
    cpu.update(pred, gt, mask)
    gpu.update(*(torch.from_numpy(a).cuda() for a in (pred, gt, mask)))
    np.testing.assert_array_equal(cpu.confusion_masked, gpu.confusion_masked)
    np.testing.assert_array_equal(cpu.confusion_all, gpu.confusion_all)
