import argparse
import json

import numpy as np
import pytest
import torch
from engine_toys import toy_config, toy_dataset_factory, toy_model_factory

from spotocc.commands import eval as eval_cli
from spotocc.commands import predict as predict_cli
from spotocc.engine.checkpoint import CheckpointError, save_weights_file
from spotocc.engine.evaluator import (
    evaluate,
    load_model_from_checkpoint,
    prediction_path,
    read_prediction,
    write_prediction,
)
from spotocc.visualization.charts import load_eval_json


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = toy_config()
    torch.manual_seed(0)
    model = toy_model_factory(cfg)
    path = tmp_path / "toy.safetensors"
    save_weights_file(path, model.state_dict(), config=json.loads(cfg.to_json()))
    return path


def test_predict_then_eval_predictions_equals_direct_eval(tmp_path, checkpoint, capsys):
    factories = {"model_factory": toy_model_factory, "dataset_factory": toy_dataset_factory}
    direct_json, saved_json, preds = tmp_path / "direct.json", tmp_path / "saved.json", tmp_path / "preds"
    argv = [str(checkpoint), "--json", str(direct_json), "--device", "cpu", "--no-progress"]
    assert eval_cli.main(_parse(eval_cli, argv), **factories) == 0
    table = capsys.readouterr().out
    assert "SSC mIoU" in table and "5 samples scored" in table
    quirk = toy_config().eval.class0_quirk
    assert f"class-0 IoU: {'released' if quirk else 'plain'} (eval.class0_quirk={quirk})" in table
    argv = [str(checkpoint), "--input", "toy-5", "--out", str(preds), "--device", "cpu", "--no-progress"]
    assert predict_cli.main(_parse(predict_cli, argv), **factories) == 0
    files = sorted(p.relative_to(preds).as_posix() for p in preds.rglob("*.npz"))
    assert files == ["seq0/0000.npz", "seq0/0002.npz", "seq0/0004.npz", "seq1/0001.npz", "seq1/0003.npz"]
    labels = read_prediction(preds, "seq1/0003")
    assert labels.dtype == np.uint8 and labels.shape == (4, 4, 2)
    assert not [p for p in preds.rglob("*") if p.name.startswith(".")]  # no temporary files left
    argv = [str(checkpoint), "--predictions", str(preds), "--json", str(saved_json), "--no-progress"]
    assert eval_cli.main(_parse(eval_cli, argv), **factories) == 0
    direct, saved = json.loads(direct_json.read_text()), json.loads(saved_json.read_text())
    assert direct["metrics"] == saved["metrics"] and direct["num_samples"] == saved["num_samples"] == 5
    assert "semkitti_SSC_mIoU" in direct["metrics"] and "semkitti_combined_IoU" in direct["metrics"]
    chart_input = load_eval_json(direct_json)  # what `spotocc visualize chart` reads of this file
    assert (
        chart_input.class_set == "semantickitti"
        and chart_input.miou == direct["metrics"]["semkitti_SSC_mIoU"]
    )
    assert chart_input.class_iou[0] == direct["metrics"]["semkitti_SSC_car_IoU"]
    # a preset instead of the checkpoint gives the same scores for saved predictions
    argv = ["synthetic_tiny", *_toy_overrides(), "--predictions", str(preds), "--json", str(saved_json)]
    assert eval_cli.main(_parse(eval_cli, argv), **factories) == 0
    assert json.loads(saved_json.read_text())["metrics"] == direct["metrics"]


def _toy_overrides():
    from engine_toys import TOY_OVERRIDES

    return list(TOY_OVERRIDES)


def test_evaluate_matches_a_metric_fed_by_hand(checkpoint):
    model, cfg = load_model_from_checkpoint(checkpoint, model_factory=toy_model_factory)
    dataset = toy_dataset_factory(cfg, "toy-5", train=False)
    result = evaluate(model, dataset, cfg, device=torch.device("cpu"), batch_size=2, num_workers=0)
    from spotocc.engine.evaluator import build_metrics

    by_hand = build_metrics(cfg)
    with torch.no_grad():
        for i in range(5):
            sample = dataset[i]
            batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in sample.items()}
            by_hand.update(model.predict(batch), sample["gt_occ"][None])
    assert result.metrics == by_hand.compute() and result.num_samples == 5
    assert result.sample_ids == [f"seq{i % 2}/{i:04d}" for i in range(5)]


def test_prediction_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="seq0/0001.npz"):
        read_prediction(tmp_path, "seq0/0001")
    with pytest.raises(ValueError, match="cannot be used"):
        prediction_path(tmp_path, "../escape")
    with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
        write_prediction(tmp_path, "a", np.zeros((2, 2), np.int64))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable"):
        read_prediction(tmp_path, "bad")
    np.savez_compressed(tmp_path / "nolabels.npz", other=np.zeros(2))
    with pytest.raises(ValueError, match="no 'labels'"):
        read_prediction(tmp_path, "nolabels")


def test_checkpoint_must_fit_the_model(tmp_path):
    cfg = toy_config()
    path = tmp_path / "w.safetensors"
    save_weights_file(path, {"unrelated": torch.zeros(1)}, config=json.loads(cfg.to_json()))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_from_checkpoint(path, model_factory=toy_model_factory)
    save_weights_file(path, {"unrelated": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="carries no config"):
        load_model_from_checkpoint(path, model_factory=toy_model_factory)
