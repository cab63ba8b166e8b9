"""Occ3D scoring in the evaluation loop, ``spotocc eval`` and ``spotocc visualize chart``.

On generated Occ3D scenes (50 x 50 x 4 voxels of 1.6 m, so RayIoU applies): predictions equal to the
GT score 100 everywhere; a known error gives exactly what Occ3DMetrics and RayIoU report when fed by
hand with the files' own labels; counts summed over two "ranks" give the one-process result.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spotocc.cli import main as cli_main
from spotocc.config import GridConfig, get_config
from spotocc.data import build_dataset
from spotocc.data.classes import model_to_occ3d_ids
from spotocc.data.occ3d_nuscenes import read_labels
from spotocc.data.synthetic import generate
from spotocc.data.synthetic.geometry import NUSCENES_LIDAR_TO_EGO_TRANSLATION
from spotocc.data.synthetic.occ3d_format import INFO_FILES, ROOT
from spotocc.engine.evaluator import default_dataset_factory, evaluate_predictions, write_prediction
from spotocc.evaluation import Occ3DMetrics, RayIoU
from spotocc.evaluation.occ3d_eval import Occ3DEvaluation
from spotocc.visualization.charts import load_eval_json

GRID = GridConfig(point_cloud_range=(-40.0, -40.0, -1.0, 40.0, 40.0, 5.4), occ_size=(50, 50, 4))
CAR, TRUCK, FREE = 5, 11, 0  # model ids


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("occ3d_eval")
    generate(out, "occ3d-nuscenes", num_train=1, num_val=2, seed=4, grid=GRID, image_size=(18, 32))
    root = out / ROOT
    overrides = [
        "data.format=occ3d-nuscenes",
        "data.class_set=occ3d",
        "model.head.num_classes=18",
        f"data.root={root}",
        f"data.occ_root={root / 'gts'}",
        f"data.train_info={root / INFO_FILES['train']}",
        f"data.val_info={root / INFO_FILES['val']}",
        f"grid.point_cloud_range={GRID.point_cloud_range}",
        f"grid.occ_size={GRID.occ_size}",
        "data.input_size=(16, 32)",
        "data.num_workers=0",
        "data.gt_mask=camera",  # as the presets train; evaluation reads the labels unmasked
    ]
    cfg = get_config("spotocc_nusc_256", overrides)
    dataset = default_dataset_factory(cfg, "val", train=False)
    return {"out": out, "cfg": cfg, "overrides": overrides, "dataset": dataset}


def _write(folder: Path, dataset, change=None) -> list[np.ndarray]:
    """Write every sample's GT (model ids) as its prediction, after ``change(i, labels)``."""
    preds = []
    for i in range(len(dataset)):
        sample = dataset[i]
        labels = sample["gt_occ"].numpy().copy()
        if change is not None:
            change(i, labels)
        write_prediction(folder, sample["meta"]["sample_id"], labels)
        preds.append(labels)
    return preds


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_predictions_equal_to_the_gt_score_100(tree, tmp_path):
    dataset = tree["dataset"]
    assert dataset.gt_mask == "none"  # the evaluation set is read unmasked
    _write(tmp_path, dataset)
    result = evaluate_predictions(tmp_path, dataset, tree["cfg"])
    m = result.metrics
    for key in ("mIoU", "IoU", "unmasked_mIoU", "unmasked_IoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4"):
        assert m[key] == 100.0, key
    assert m["ray_samples"] == 2 and m["ray_origins_per_sample"] == 1.0
    assert result.num_samples == 2 and result.counts["confusion_masked"].sum() > 0


def _known_error(i: int, labels: np.ndarray) -> None:
    labels[labels == CAR] = TRUCK  # every car a truck
    if i == 0:
        labels[:10, :, 0] = FREE  # a strip of the ground missed


def test_a_known_error_gives_the_independently_counted_value(tree, tmp_path):
    dataset = tree["dataset"]
    preds = _write(tmp_path, dataset, _known_error)
    result = evaluate_predictions(tmp_path, dataset, tree["cfg"])
    voxels = Occ3DMetrics()
    rays = RayIoU(pc_min=GRID.point_cloud_range[:3], voxel_size=1.6)
    for record, pred in zip(dataset.records, preds):
        semantics, _, mask_camera = read_labels(record.gt_path, GRID.occ_size)  # the files' own ids
        voxels.update(model_to_occ3d_ids(pred), semantics, mask_camera)
        rays.update(model_to_occ3d_ids(pred), semantics, torch.tensor([NUSCENES_LIDAR_TO_EGO_TRANSLATION]))
    expected = {**voxels.compute(), **rays.compute()}
    assert _same(result.metrics, expected)
    assert result.metrics["mIoU"] < 100 and result.metrics["RayIoU"] < 100
    assert result.metrics["car_IoU"] == 0.0 and result.metrics["unmasked_mIoU"] < 100
    assert (result.counts["confusion_masked"] == voxels.confusion_masked).all()


def test_counts_summed_over_ranks_give_the_one_process_result(tree, tmp_path):
    dataset = tree["dataset"]
    _write(tmp_path, dataset, _known_error)
    whole = evaluate_predictions(tmp_path, dataset, tree["cfg"])
    parts = []
    for i in range(len(dataset)):
        batch = {k: v[None] for k, v in dataset[i].items() if k in ("gt_occ", "mask_camera")}
        meta = dataset[i]["meta"]
        part = Occ3DEvaluation(GRID.point_cloud_range, GRID.occ_size)
        pred = torch.from_numpy(np.load(tmp_path / f"{meta['sample_id']}.npz")["labels"])[None]
        part.update(pred, batch["gt_occ"], batch["mask_camera"], [meta["ray_origins"]])
        parts.append(part.counts_tensor())
    merged = Occ3DEvaluation(GRID.point_cloud_range, GRID.occ_size)
    merged.load_counts_tensor(parts[0] + parts[1])  # what all_reduce(sum) does
    assert _same(merged.compute(), whole.metrics)


def test_masked_gt_is_refused_by_ray_iou_but_scores_without_it(tree, tmp_path):
    masked = build_dataset(tree["cfg"], "val", train=False)  # gt_mask=camera: 255 outside the mask
    _write(tmp_path, tree["dataset"])
    with pytest.raises(ValueError, match="data.gt_mask=none"):
        evaluate_predictions(tmp_path, masked, tree["cfg"])
    result = evaluate_predictions(tmp_path, masked, tree["cfg"], ray_iou=False)
    assert result.metrics["mIoU"] == 100.0 and "RayIoU" not in result.metrics


def _strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_spotocc_eval_and_chart_on_saved_predictions(tree, tmp_path, capsys):
    preds = tmp_path / "preds"
    _write(preds, tree["dataset"], _known_error)
    out = tmp_path / "eval.json"
    args = ["eval", "spotocc_nusc_256", *tree["overrides"], "--predictions", str(preds), "--json", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "mask_camera" in printed and "RayIoU@4" in printed and "vegetation" in printed
    data = _strict(out.read_text())
    metrics = data["metrics"]
    assert data["class_set"] == "occ3d" and data["num_samples"] == 2
    assert {"mIoU", "IoU", "unmasked_mIoU", "RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4"} <= metrics.keys()
    assert any(v is None for v in metrics.values())  # a class in neither GT nor prediction: null
    chart = load_eval_json(out)
    assert chart.class_set == "occ3d" and chart.miou == metrics["mIoU"] and chart.ray_iou == metrics["RayIoU"]
    assert len(chart.class_names) == 17 and chart.sc_iou == metrics["IoU"]
    png = tmp_path / "chart.png"
    assert cli_main(["visualize", "chart", str(out), "--out", str(png)]) == 0
    both = tmp_path / "both.png"
    assert cli_main(["visualize", "chart", str(out), str(out), "--labels", "a", "b", "--out", str(both)]) == 0
    assert png.stat().st_size > 0 and both.stat().st_size > 0


class _EchoModel(torch.nn.Module):
    """Predicts the batch's own GT (model ids), with every car a truck."""

    def predict(self, batch: dict) -> torch.Tensor:
        labels = batch["gt_occ"].long()  # [B, X, Y, Z]
        return torch.where(labels == CAR, TRUCK, labels)


def test_evaluate_scores_model_batches_like_saved_predictions(tree, tmp_path):
    from spotocc.engine.evaluator import evaluate

    dataset = tree["dataset"]
    result = evaluate(
        _EchoModel(), dataset, tree["cfg"], device=torch.device("cpu"), batch_size=2, predictions_dir=tmp_path
    )
    from_files = evaluate_predictions(tmp_path, dataset, tree["cfg"])
    assert result.num_samples == 2 and _same(result.metrics, from_files.metrics)
    assert result.metrics["car_IoU"] == 0.0 and result.metrics["RayIoU"] < 100


def test_image_blind_prior_gets_the_occ3d_metrics_of_its_prediction_files(tree, tmp_path):
    # the quickstart's prior scored on an Occ3D config: the same numbers spotocc eval --predictions
    # gives for that one prediction written as every sample's file (camera-mask, unmasked, RayIoU)
    from spotocc.engine.quickstart import most_frequent_label_baseline, score_fixed_prediction

    cfg, dataset = tree["cfg"], tree["dataset"]
    train_set = default_dataset_factory(cfg, "train", train=False)
    prior = most_frequent_label_baseline(train_set, 18)
    for i in range(len(dataset)):
        write_prediction(tmp_path, dataset[i]["meta"]["sample_id"], prior)
    expected = evaluate_predictions(tmp_path, dataset, cfg).metrics
    got = score_fixed_prediction(prior, dataset, cfg)
    assert "mIoU" in got and "RayIoU" in got and "SSC_mIoU" not in got
    assert _same(got, expected)
    assert "RayIoU" not in score_fixed_prediction(prior, dataset, cfg, ray_iou=False)
