import json
import os

import numpy as np
import pytest
from PIL import Image

from spotocc.cli import main as cli_main
from spotocc.data.classes import SEMANTIC_KITTI_CLASSES
from spotocc.visualization.colors import SEMANTIC_KITTI_COLORS


def _kitti_setup(tmp_path, tiny, frames=("000000", "000005", "000010")):
    root = tiny.make_kitti_dataset(tmp_path / "kitti", sequences=("08",), frames=frames)
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, frame in enumerate(frames):
        labels = np.zeros(tiny.KITTI_OCC_SIZE, dtype=np.uint8)
        labels[:, :, 0] = 9  # road
        labels[4 + i : 7 + i, 6:9, 1:3] = 1  # a car that moves forward
        np.savez_compressed(preds / f"08_{frame}.npz", labels=labels)
    data = ["--preset", "spotocc_kitti", "--data", str(root), "--split", "val"]
    data += [
        "--set",
        f"grid.occ_size={tuple(tiny.KITTI_OCC_SIZE)}",
        "--set",
        f"data.input_size={tiny.KITTI_INPUT_SIZE}",
    ]
    return root, preds, data


def _colour_count(path, rgb):
    image = np.asarray(Image.open(path).convert("RGB"))
    return int((image.reshape(-1, 3) == np.asarray(rgb, dtype=np.uint8)).all(1).sum())


def test_module_forces_a_headless_matplotlib_backend():
    import spotocc.commands.visualize  # noqa: F401

    assert os.environ["MPLBACKEND"] == "Agg"


def test_scene_of_a_prediction_file_alone(tmp_path, tiny, capsys):
    _, preds, _ = _kitti_setup(tmp_path, tiny)
    out = tmp_path / "pred.png"
    args = ["visualize", "scene", "--pred", str(preds / "08_000005.npz"), "--class-set", "semantickitti"]
    assert cli_main([*args, "--size", "200", "120", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert _colour_count(out, SEMANTIC_KITTI_COLORS[1]) > 0  # the car's top faces, unshaded


def test_scene_with_dataset_sample_and_prediction(tmp_path, tiny):
    _, preds, data = _kitti_setup(tmp_path, tiny)
    out = tmp_path / "scene.png"
    args = ["visualize", "scene", "--pred", str(preds), "--sample-id", "08_000005", *data, "--zoom", "1.5"]
    assert cli_main([*args, "--size", "240", "150", "--out", str(out)]) == 0
    with Image.open(out) as im:
        # title + camera + GT row + prediction row + legend: taller than two 150 px rows
        assert im.width == 2 * 16 + 240 + 12 + 150 and im.height > 2 * 150 + 100
    # the tiny dataset's image is grey (90) with a green gradient: some pixel shows it
    image = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    assert ((np.abs(image[:, 0] - 90) <= 2) & (np.abs(image[:, 2] - 90) <= 2) & (image[:, 1] > 150)).any()


def test_scene_of_ground_truth_only_by_index(tmp_path, tiny):
    _, _, data = _kitti_setup(tmp_path, tiny)
    out = tmp_path / "gt.png"
    assert (
        cli_main(["visualize", "scene", *data, "--index", "1", "--size", "160", "100", "--out", str(out)])
        == 0
    )
    assert out.is_file()


def test_sequence_gif_has_one_frame_per_prediction(tmp_path, tiny, capsys):
    _, preds, data = _kitti_setup(tmp_path, tiny)
    out = tmp_path / "seq.gif"
    args = ["visualize", "sequence", "--pred", str(preds), *data, "--size", "160", "100", "--fps", "2"]
    assert cli_main([*args, "--out", str(out)]) == 0
    assert "(3 frames)" in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.n_frames == 3
    out2 = tmp_path / "every.gif"
    args = ["visualize", "gif", "--pred", str(preds), "--class-set", "semantickitti", "--every", "2"]
    assert cli_main([*args, "--size", "120", "80", "--out", str(out2)]) == 0
    with Image.open(out2) as gif:
        assert gif.n_frames == 2


def test_chart_of_one_and_two_eval_files(tmp_path):
    names = SEMANTIC_KITTI_CLASSES
    for run, offset in (("spot", 1.0), ("base", 0.0)):
        metrics = {f"semkitti_SSC_{n}_IoU": i + offset for i, n in enumerate(names)}
        metrics |= {"semkitti_SSC_mIoU": 10.0 + offset, "class_names": list(names)}
        (tmp_path / f"{run}.json").write_text(json.dumps(metrics))
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert cli_main(["visualize", "chart", str(tmp_path / "spot.json"), "--out", str(one)]) == 0
    args = ["visualize", "chart", str(tmp_path / "spot.json"), str(tmp_path / "base.json")]
    assert cli_main([*args, "--labels", "SPOT-Occ", "SparseOcc", "--out", str(two)]) == 0
    for path in (one, two):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 600


def test_clear_errors(tmp_path, tiny, capsys):
    _, preds, data = _kitti_setup(tmp_path, tiny)
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="needs --preset"):
        cli_main(["visualize", "scene", "--pred", str(preds), "--data", str(tmp_path), "--out", out])
    with pytest.raises(SystemExit, match="no prediction for sample '08_999999'"):
        cli_main(["visualize", "scene", "--pred", str(preds), "--sample-id", "08_999999", "--out", out])
    with pytest.raises(SystemExit, match="cannot tell the class set"):
        cli_main(["visualize", "scene", "--pred", str(preds / "08_000000.npz"), "--out", out])
    np.savez_compressed(tmp_path / "wrong.npz", logits=np.zeros((2, 2, 2)))
    args = [
        "visualize",
        "scene",
        "--pred",
        str(tmp_path / "wrong.npz"),
        "--class-set",
        "nuscenes",
        "--out",
        out,
    ]
    assert cli_main(args) == 1
    assert "has no 'labels' array" in capsys.readouterr().err
