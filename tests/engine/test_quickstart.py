import json

import numpy as np
import pytest
import torch
from engine_toys import toy_config, toy_dataset_factory, toy_model_factory
from PIL import Image
from torch.utils.data import Dataset

from spotocc.engine.quickstart import most_frequent_label_baseline, run_quickstart, score_fixed_prediction


class _GroundTruthOnly(Dataset):
    """Samples with the required batch keys (zeros) and the given gt_occ grids."""

    def __init__(self, grids):
        self.grids = [torch.as_tensor(np.asarray(g, dtype=np.uint8)) for g in grids]

    def __len__(self):
        return len(self.grids)

    def __getitem__(self, i):
        return {
            "img": torch.zeros(1, 3, 2, 2),
            "rots": torch.eye(3)[None],
            "trans": torch.zeros(1, 3),
            "intrins": torch.eye(4)[None],
            "post_rots": torch.eye(3)[None],
            "post_trans": torch.zeros(1, 3),
            "bda": torch.eye(4),
            "gt_occ": self.grids[i],
            "meta": {"sample_id": str(i)},
        }


def test_most_frequent_label_per_voxel():
    # 4 voxels as a [1, 2, 2] grid; voxel 3 is only ever ignored -> empty (0)
    grids = [
        [[[1, 2], [0, 255]]],
        [[[1, 3], [2, 255]]],
        [[[4, 3], [2, 255]]],
    ]
    fixed = most_frequent_label_baseline(_GroundTruthOnly(grids), num_classes=5)
    assert fixed.dtype == np.uint8 and fixed.tolist() == [[[1, 3], [2, 0]]]
    tie = most_frequent_label_baseline(_GroundTruthOnly([[[[4]]], [[[2]]]]), num_classes=5)
    assert tie.tolist() == [[[2]]]  # ties go to the smaller label


def test_fixed_prediction_scores_like_the_metric():
    cfg = toy_config()
    grids = [[[[1, 0], [0, 255]]], [[[1, 1], [0, 0]]]]
    metrics = score_fixed_prediction(np.array([[[1, 0], [0, 0]]]), _GroundTruthOnly(grids), cfg)
    # SC: TP 2, FP 0, FN 1 (voxel 1 of the second grid)
    assert metrics["SC_Precision"] == 100.0 and metrics["SC_Recall"] == pytest.approx(66.67)


def test_quickstart_stages_with_toys(tmp_path, capsys):
    calls = []

    def fake_generate(out_dir, **kwargs):
        calls.append((out_dir, kwargs))

    def toy_splits(cfg, split, *, train=None):
        return toy_dataset_factory(cfg, {"train": "toy-12", "val": "toy-5"}[split], train=train)

    cfg = toy_config(
        ["data.train_split=train", "data.val_split=val", "train.epochs=1", "train.eval_interval=0"]
    )
    results = run_quickstart(
        cfg,
        work_dir=tmp_path,
        num_train=12,
        num_val=5,
        device="cpu",
        generate_fn=fake_generate,
        model_factory=toy_model_factory,
        dataset_factory=toy_splits,
        show_progress=False,
    )
    assert calls[0][0] == tmp_path / "data"
    assert calls[0][1]["format"] == "semantickitti" and calls[0][1]["grid"] == cfg.grid
    assert calls[0][1]["num_train"] == 12 and calls[0][1]["num_val"] == 5
    assert calls[0][1]["image_size"] == tuple(cfg.data.input_size)  # written at the network input size
    out = capsys.readouterr().out
    assert "image-blind baseline" in out and "SSC mIoU: model" in out and "SC IoU:   model" in out
    saved = json.loads((tmp_path / "quickstart.json").read_text())
    assert {k: saved[k] for k in results} == results
    assert set(saved["seconds"]) == {"generate", "train", "evaluate", "total"}
    # the first held-out sample's prediction, drawn beside its ground truth
    assert sorted(str(p.relative_to(tmp_path / "predictions")) for p in tmp_path.rglob("*.npz")) == [
        f"seq{i % 2}/{i:04d}.npz" for i in (0, 2, 4, 1, 3)
    ]
    picture = Image.open(tmp_path / "quickstart.png")
    assert picture.width > 200 and picture.height > 200
    assert set(results) == {"model", "baseline"} and "SSC_mIoU" in results["baseline"]


def test_quickstart_end_to_end_with_the_real_generator_model_and_readers(tmp_path, capsys):
    """The real pipeline at a tiny scale: scenes on disk, a few training steps, held-out metrics that
    equal scoring the saved predictions again, and the picture."""
    from spotocc.config import get_config
    from spotocc.engine.evaluator import default_dataset_factory, evaluate_predictions

    cfg = get_config(
        "synthetic_tiny",
        [
            "grid.occ_size=[32,32,16]",
            "data.input_size=[64,192]",
            "head.num_layers=2",
            "head.num_points=512",
            "train.epochs=1",
            "train.max_iters=2",
            "train.eval_interval=0",
            "train.tensorboard=false",
        ],
    )
    results = run_quickstart(
        cfg, work_dir=tmp_path, num_train=4, num_val=2, device="cpu", show_progress=False
    )
    assert (tmp_path / "data" / "dataset" / "sequences" / "08").is_dir()
    assert (tmp_path / "train" / "checkpoints" / "last").exists()
    cfg.data.root = str(tmp_path / "data")
    val_set = default_dataset_factory(cfg, "val", train=False)
    rescored = evaluate_predictions(tmp_path / "predictions", val_set, cfg).metrics
    assert rescored == results["model"]
    assert Image.open(tmp_path / "quickstart.png").width > 200
    assert "wall time" in capsys.readouterr().out


def test_quickstart_command_skips_per_epoch_validation_unless_asked():
    # The quickstart scores the last checkpoint itself; the user's override still wins.
    from spotocc.commands.quickstart import quickstart_config
    from spotocc.config import get_config

    cfg = quickstart_config([], epochs=None, seed=3)
    assert get_config("synthetic_tiny").train.eval_interval == 1  # `spotocc train` still validates
    assert cfg.train.eval_interval == 0 and cfg.train.seed == 3
    assert cfg.train.epochs == get_config("synthetic_tiny").train.epochs
    cfg = quickstart_config(["train.eval_interval=2"], epochs=5, seed=0)
    assert cfg.train.eval_interval == 2 and cfg.train.epochs == 5
