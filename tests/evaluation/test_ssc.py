import numpy as np
import pytest
import torch

from spotocc.data.classes import class_set
from spotocc.evaluation import SSCMetrics, format_ssc_table, metric_prefix, with_prefix
from spotocc.evaluation.ssc import round_percent


def released_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, class0_quirk: bool):
    """The released per-sample procedure, voxel by voxel in plain Python (spec 04, section 3.2).

    It zeroes prediction and target in place where the target is 255, then counts SC over the
    (original) valid voxels and SSC per class over every voxel of the modified arrays; without the
    quirk the SSC count runs over the valid voxels only.
    """
    pred, target = pred.reshape(-1).tolist(), target.reshape(-1).tolist()
    valid = [t != 255 for t in target]
    sc = [0, 0, 0]
    for p, t, v in zip(pred, target, valid):
        if v:
            sc[0] += t > 0 and p > 0
            sc[1] += t == 0 and p > 0
            sc[2] += t > 0 and p == 0
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for p, t, v in zip(pred, target, valid):
        if not v:
            if not class0_quirk:
                continue
            p, t = 0, 0  # the in-place zeroing of the released code
        for c in range(num_classes):
            tp[c] += t == c and p == c
            fp[c] += t != c and p == c
            fn[c] += t == c and p != c
    return sc, tp, fp, fn


def expected_results(sc, tp, fp, fn, names):
    tp_, fp_, fn_ = (np.array(x, dtype=np.float64) for x in (tp, fp, fn))
    iou = tp_ / (tp_ + fp_ + fn_ + 1e-5)
    out = {
        "SC_Precision": np.round(100 * sc[0] / (sc[0] + sc[1]), 2),
        "SC_Recall": np.round(100 * sc[0] / (sc[0] + sc[2]), 2),
        "SC_IoU": np.round(100 * sc[0] / (sc[0] + sc[1] + sc[2]), 2),
        "SSC_mIoU": np.round(100 * iou[1:].mean(), 2),
    }
    out.update({f"SSC_{n}_IoU": np.round(100 * v, 2) for n, v in zip(names, iou)})
    out["combined_IoU"] = out["SC_IoU"] + out["SSC_mIoU"]
    return out


def test_hand_made_confusion():
    names = ["empty", "a", "b"]
    target = np.array([0, 0, 1, 1, 2, 2, 255, 255])
    pred = np.array([0, 1, 1, 2, 2, 0, 1, 0])
    metrics = SSCMetrics(names)
    metrics.update(pred, target)
    # valid voxels: (t, p) = (0,0) (0,1) (1,1) (1,2) (2,2) (2,0)
    assert metrics.completion_counts() == (3, 1, 1)  # occupied: TP (1,1)(1,2)(2,2); FP (0,1); FN (2,0)
    tp, fp, fn = metrics.per_class_counts()
    assert tp.tolist() == [1, 1, 1] and fp.tolist() == [1, 1, 1] and fn.tolist() == [1, 1, 1]
    r = metrics.compute()
    assert r["SC_Precision"] == 75.0 and r["SC_Recall"] == 75.0 and r["SC_IoU"] == 60.0
    assert r["SSC_a_IoU"] == 33.33 and r["SSC_b_IoU"] == 33.33 and r["SSC_empty_IoU"] == 33.33
    assert r["SSC_mIoU"] == 33.33  # classes 1..C-1 only
    assert r["combined_IoU"] == 93.33

    quirk = SSCMetrics(names, class0_quirk=True)
    quirk.update(pred, target)
    tp, fp, fn = quirk.per_class_counts()
    assert tp.tolist() == [3, 1, 1]  # both ignored voxels become class-0 true positives
    rq = quirk.compute()
    assert rq["SSC_empty_IoU"] == 60.0  # 3 / (3 + 1 + 1)
    assert {k: v for k, v in rq.items() if k != "SSC_empty_IoU"} == {
        k: v for k, v in r.items() if k != "SSC_empty_IoU"
    }


def test_keys_and_order_and_prefixes():
    names = class_set("nuscenes")[0]
    metrics = SSCMetrics(names)
    metrics.update(np.zeros((2, 3), np.int64), np.ones((2, 3), np.uint8))
    keys = list(metrics.compute())
    assert keys[:4] == ["SC_Precision", "SC_Recall", "SC_IoU", "SSC_mIoU"]
    assert keys[4:-1] == [f"SSC_{n}_IoU" for n in names] and keys[-1] == "combined_IoU"
    assert len(keys) == 4 + 17 + 1
    assert metric_prefix("semantickitti") == "semkitti_" and metric_prefix("nuscenes") == "nuScenes_"
    assert list(with_prefix({"SSC_mIoU": 1.0}, "nuScenes_")) == ["nuScenes_SSC_mIoU"]
    with pytest.raises(ValueError, match="unknown class set"):
        metric_prefix("kitti")


@pytest.mark.parametrize("class0_quirk", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_released_count(class0_quirk, seed):
    rng = np.random.default_rng(seed)
    names = class_set("semantickitti")[0]
    c = len(names)
    metrics = SSCMetrics(names, class0_quirk=class0_quirk)
    sc_sum, tp_sum, fp_sum, fn_sum = np.zeros(3), np.zeros(c), np.zeros(c), np.zeros(c)
    for _ in range(3):  # three samples: counts are summed before dividing
        shape = (2, 6, 5, 3)
        target = rng.choice(np.r_[np.arange(c), [255] * 4], size=shape).astype(np.uint8)
        target[0, 0] = 0  # some guaranteed empty voxels
        pred = rng.integers(0, c, size=shape)
        pred[rng.random(shape) < 0.3] = 0
        for b in range(shape[0]):
            sc, tp, fp, fn = released_counts(pred[b], target[b], c, class0_quirk)
            sc_sum += sc
            tp_sum += tp
            fp_sum += fp
            fn_sum += fn
        metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert metrics.completion_counts() == tuple(int(v) for v in sc_sum)
    tp, fp, fn = metrics.per_class_counts()
    assert (
        tp.tolist() == tp_sum.tolist() and fp.tolist() == fp_sum.tolist() and fn.tolist() == fn_sum.tolist()
    )
    expected = expected_results(sc_sum, tp_sum, fp_sum, fn_sum, names)
    result = metrics.compute()
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(float(expected[key]), abs=1e-9), key


def test_merging_counts_equals_one_pass():
    rng = np.random.default_rng(3)
    names = class_set("nuscenes")[0]
    preds = [rng.integers(0, 17, (4, 4, 2)) for _ in range(5)]
    targets = [rng.choice(np.r_[np.arange(17), 255], size=(4, 4, 2)).astype(np.uint8) for _ in range(5)]
    one = SSCMetrics(names, class0_quirk=True)
    for p, t in zip(preds, targets):
        one.update(p, t)
    part_a, part_b = SSCMetrics(names, class0_quirk=True), SSCMetrics(names, class0_quirk=True)
    for p, t in zip(preds[:2], targets[:2]):
        part_a.update(p, t)
    for p, t in zip(preds[2:], targets[2:]):
        part_b.update(p, t)
    merged = SSCMetrics(names, class0_quirk=True)
    merged.merge_counts(part_a.export_counts())
    merged.merge_counts(part_b.export_counts())
    assert np.array_equal(merged.confusion, one.confusion) and merged.ignored == one.ignored
    assert merged.compute() == one.compute()
    flat = part_a.counts_tensor() + part_b.counts_tensor()  # what all_reduce(SUM) does
    reloaded = SSCMetrics(names, class0_quirk=True)
    reloaded.load_counts_tensor(flat)
    assert reloaded.compute() == one.compute()


def test_rounding_as_released():
    names = ["empty", "a"]
    metrics = SSCMetrics(names)
    # class a: TP 1, FP 2, FN 0 -> IoU 1/3 -> 33.33; SC the same counts
    metrics.update(np.array([1, 1, 1]), np.array([1, 0, 0]))
    r = metrics.compute()
    assert r["SSC_a_IoU"] == 33.33 and r["SC_Precision"] == 33.33 and r["SC_Recall"] == 100.0
    # combined is the sum of the two rounded values (33.33 + 33.33), not the rounded sum of the raw ones
    assert r["combined_IoU"] == 66.66
    # NumPy's rule on the scaled float, as the released code (Python's round would give 0.01 and 12.35)
    assert round_percent(0.00015) == 0.02 and round(0.00015 * 100, 2) == 0.01
    assert round_percent(0.12345) == 12.34


def test_edge_cases_without_nan():
    metrics = SSCMetrics(["empty", "a"])
    metrics.update(np.zeros((3, 3), np.int64), np.zeros((3, 3), np.uint8))  # nothing occupied anywhere
    r = metrics.compute()
    assert r["SC_Precision"] == 0.0 and r["SC_Recall"] == 0.0 and r["SC_IoU"] == 0.0
    assert all(np.isfinite(v) for v in r.values())
    empty = SSCMetrics(["empty", "a"])
    empty.update(np.zeros((0,), np.int64), np.zeros((0,), np.uint8))
    assert all(v == 0.0 for v in empty.compute().values())


def test_bad_input_is_named():
    metrics = SSCMetrics(["empty", "a", "b"])
    with pytest.raises(ValueError, match="shape"):
        metrics.update(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="predictions must lie in 0..2"):
        metrics.update(np.full((2,), 3), np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match="target labels"):
        metrics.update(np.zeros((2,), np.int64), np.array([0, 7], np.uint8))
    with pytest.raises(TypeError, match="integer labels"):
        metrics.update(np.zeros((2,), np.float32), np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match="collides"):
        SSCMetrics(["empty", "a"], ignore_index=1)


def test_large_grid_single_pass_matches_per_class_count():
    names = class_set("nuscenes")[0]
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 17, (1, 64, 64, 16), generator=g).to(torch.uint8)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, 17, target.shape, generator=g)
    metrics = SSCMetrics(names)
    metrics.update(pred, target)
    valid = target != 255
    tp, fp, fn = metrics.per_class_counts()
    for c in range(17):
        assert tp[c] == int(((target == c) & (pred == c) & valid).sum())
        assert fp[c] == int(((target != c) & (pred == c) & valid).sum())
        assert fn[c] == int(((target == c) & (pred != c) & valid).sum())


def test_table_lists_every_class_and_column():
    names = ["empty", "car"]
    a = SSCMetrics(names)
    a.update(np.array([1, 0]), np.array([1, 1]))
    table = format_ssc_table({"model": a.compute(), "baseline": {"SSC_mIoU": 1.5}}, names)
    lines = table.splitlines()
    assert "model" in lines[0] and "baseline" in lines[0]
    assert any(line.strip().startswith("car") and line.split()[1:] == ["50.00", "-"] for line in lines)
    assert any(line.startswith("SSC mIoU") and line.rstrip().endswith("1.50") for line in lines)
    assert any(line.startswith("SC IoU") and line.rstrip().endswith("-") for line in lines)
