import json
import math

import numpy as np
import pytest

from spotocc.data.classes import NUSCENES_OCC_CLASSES, SEMANTIC_KITTI_CLASSES
from spotocc.visualization.charts import (
    class_iou_chart,
    comparison_chart,
    default_labels,
    load_eval_json,
    read_eval_metrics,
    save_figure,
)


def _kitti_metrics(prefix="", offset=0.0):
    data = {f"{prefix}SSC_{n}_IoU": round(i * 1.5 + offset, 2) for i, n in enumerate(SEMANTIC_KITTI_CLASSES)}
    data[f"{prefix}SSC_mIoU"] = 13.27 + offset
    data[f"{prefix}SC_IoU"] = 42.1
    data[f"{prefix}SC_Precision"] = 60.0
    return data


def test_reads_prefixed_keys_and_class_names_from_the_file(tmp_path):
    data = _kitti_metrics("semkitti_")
    data["class_names"] = list(SEMANTIC_KITTI_CLASSES)
    data["config"] = {"name": "spotocc_kitti"}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    result = load_eval_json(path)
    assert result.class_names == SEMANTIC_KITTI_CLASSES[1:]  # class 0 is not charted
    assert result.class_iou == tuple(round(i * 1.5, 2) for i in range(1, 20))
    assert result.miou == 13.27 and result.sc_iou == 42.1 and result.class_set == "semantickitti"


def test_plain_keys_win_over_prefixed_copies_and_class_set_comes_from_the_argument():
    data = {**_kitti_metrics("nuScenes_", offset=100.0)}
    data.update({f"SSC_{n}_IoU": float(i) for i, n in enumerate(NUSCENES_OCC_CLASSES)})
    data["SSC_mIoU"] = 7.5
    result = read_eval_metrics(data, "nuscenes")
    assert result.class_names == NUSCENES_OCC_CLASSES[1:]
    assert result.class_iou == tuple(float(i) for i in range(1, 17)) and result.miou == 7.5


def test_class_set_is_inferred_from_the_keys_or_the_config():
    kitti_only = {"SSC_person_IoU": 1.0, "SSC_road_IoU": 50.0, "SSC_traffic-sign_IoU": 3.0}
    assert read_eval_metrics(kitti_only).class_set == "semantickitti"
    nested = {"config": {"data": {"class_set": "nuscenes"}}, "metrics": {"nuScenes_SSC_car_IoU": 20.0}}
    result = read_eval_metrics(nested)
    assert result.class_set == "nuscenes" and result.class_iou[3] == 20.0
    assert math.isnan(result.class_iou[0])  # barrier missing
    assert result.miou == 20.0  # no SSC_mIoU in the file: the mean of the classes present
    with pytest.raises(ValueError, match="--class-set"):
        read_eval_metrics({"SSC_car_IoU": 1.0})  # a name both benchmarks have


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_eval_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_eval_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no per-class IoU keys"):
        read_eval_metrics({"SSC_mIoU": 3.0}, "semantickitti")
    with pytest.raises(ValueError, match="different prefixes"):
        read_eval_metrics({"a_SSC_car_IoU": 1.0, "b_SSC_car_IoU": 2.0}, "semantickitti")


def test_class_chart_has_one_bar_per_class(tmp_path):
    result = read_eval_metrics(_kitti_metrics(), "semantickitti")
    fig = class_iou_chart(result, title="SPOT-Occ")
    ax = fig.axes[0]
    bars = [p for p in ax.patches]
    assert len(bars) == 19
    np.testing.assert_allclose([b.get_height() for b in bars], [i * 1.5 for i in range(1, 20)])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SEMANTIC_KITTI_CLASSES[1:])
    assert "mIoU 13.27" in ax.get_title() and "SPOT-Occ" in ax.get_title()
    # bars take the class colours: car is (100, 150, 245)
    np.testing.assert_allclose(bars[0].get_facecolor()[:3], (100 / 255, 150 / 255, 245 / 255))
    path = save_figure(fig, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_chart_groups_two_runs():
    spot = read_eval_metrics(_kitti_metrics(offset=1.0), "semantickitti")
    base = read_eval_metrics(_kitti_metrics(), "semantickitti")
    fig = comparison_chart([spot, base], ["SPOT-Occ", "SparseOcc"])
    ax = fig.axes[0]
    assert len(ax.patches) == 38
    heights = np.array([p.get_height() for p in ax.patches]).reshape(2, 19)
    np.testing.assert_allclose(heights[0] - heights[1], 1.0)
    title = ax.get_title()
    assert "SPOT-Occ 14.27" in title and "SparseOcc 13.27" in title and "+1.00" in title
    with pytest.raises(ValueError, match="labels"):
        comparison_chart([spot, base], ["one"])


def test_default_labels():
    assert default_labels(["a/spot.json", "b/base.json"]) == ["spot", "base"]
    assert default_labels(["spot/eval.json", "base/eval.json"]) == ["spot", "base"]


def test_occ3d_files_chart_the_camera_mask_ious():
    metrics = {"mIoU": 30.0, "IoU": 60.0, "RayIoU": 25.0, "others_IoU": 10.0, "car_IoU": 40.0}
    metrics.update({"bus_IoU": None, "unmasked_car_IoU": 1.0, "car_RayIoU@1": 2.0})  # null; not charted
    result = read_eval_metrics({"metrics": metrics})  # told apart by its plain keys
    assert (
        result.class_set == "occ3d" and result.class_names[0] == "others" and result.class_names[4] == "car"
    )
    assert result.class_iou[0] == 10.0 and result.class_iou[4] == 40.0 and math.isnan(result.class_iou[3])
    assert (result.miou, result.sc_iou, result.ray_iou) == (30.0, 60.0, 25.0)
    fig = class_iou_chart(result)
    assert "RayIoU 25.00" in fig.axes[0].get_title() and len(fig.axes[0].patches) == 17
    assert read_eval_metrics({"class_set": "occ3d", "metrics": {"car_IoU": 4.0}}).miou == 4.0
