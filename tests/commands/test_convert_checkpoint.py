"""``spotocc convert-checkpoint`` and released .pth files in ``spotocc eval`` / ``predict``."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from spotocc import cli
from spotocc.commands import eval as eval_cli
from spotocc.commands import predict as predict_cli
from spotocc.config import get_config
from spotocc.engine.checkpoint import CheckpointError, load_weights_file
from spotocc.engine.evaluator import load_model_from_checkpoint
from spotocc.engine.released_checkpoint import build_model_from_released

# the pickle global numpy scalars reduce to: numpy.core.multiarray.scalar (numpy 1), numpy._core.* (2)
NUMPY_SCALAR = f"{np.int64(0).__reduce__()[0].__module__}.scalar"


def _load_layout():
    name = "spotocc_tests_released_layout"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "data" / "released_parameters" / "released_layout.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


rl = _load_layout()
PRESET = "spotocc_nusc_256"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A full-size released-layout nuScenes SPOT checkpoint whose meta holds a numpy scalar (as mmcv's
    best-score bookkeeping leaves it) and which still carries its optimizer state."""
    root = tmp_path_factory.mktemp("release")
    state = rl.released_state_dict(PRESET, seed=11)
    checkpoint = rl.mmcv_checkpoint(state, hook_msgs={"best_score": np.float64(0.1372)})
    checkpoint["optimizer"] = {"state": {}, "param_groups": [{"lr": 2e-4}]}
    path = root / "spot_nusc.pth"
    torch.save(checkpoint, path)
    yield path, state
    for file in root.iterdir():  # ~0.4 GB each
        file.unlink()


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_code_in_a_release_still_needs_the_unsafe_flag(tmp_path, capsys):
    path, marker = tmp_path / "evil.pth", tmp_path / "code_ran"
    torch.save({"meta": {"epoch": np.int64(1), "x": _Exec(marker)}, "state_dict": {}}, path)
    out = tmp_path / "converted.safetensors"
    for flags in ([], ["--allow-numpy-pickle"]):  # the old numpy flag opens nothing more
        argv = ["convert-checkpoint", str(path), str(out), "--preset", PRESET, *flags]
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and not out.exists() and not marker.exists()
        assert "builtins.exec" in err and "--allow-unsafe-pickle" in err and NUMPY_SCALAR not in err
        assert err.startswith("spotocc convert-checkpoint: error: refusing to load") and err.count("\n") == 1


def test_convert_writes_safetensors_that_eval_loads_alone(release, tmp_path, capsys):
    path, state = release
    out = tmp_path / "converted.safetensors"
    argv = [
        "convert-checkpoint",
        str(path),
        str(out),
        "--preset",
        PRESET,
        "data.root=/d",
    ]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "ignored top-level entries: optimizer" in stdout and f"spotocc eval {out}" in stdout

    converted, config = load_weights_file(out)
    assert Counter(map(rl.fingerprint, converted.values())) == Counter(map(rl.fingerprint, state.values()))
    assert torch.equal(
        converted["head.layers.2.cross_attn.alpha"],
        state["pts_bbox_head.transformer_decoder.layers.2.spot_cross_attn.alpha"],
    )
    assert torch.equal(
        converted["image_backbone.body.layer1.0.bn1.running_mean"],
        state["img_backbone.layer1.0.bn1.running_mean"],
    )
    expected = get_config(PRESET, ["data.root=/d"])
    expected.model.image_backbone.weights = None
    assert config == json.loads(expected.to_json())

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["released_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(metadata["released_meta"])["epoch"] == 24

    model, cfg = load_model_from_checkpoint(out)  # no --config: the file carries it
    assert cfg.name == PRESET and cfg.data.root == "/d"
    own = model.state_dict()
    assert sorted(own) == sorted(converted)
    assert all(torch.equal(own[k], v) for k, v in converted.items())


def test_eval_and_predict_load_a_released_pth_with_config(release):
    path, state = release
    with pytest.raises(CheckpointError, match=r"--config \(it looks like spotocc_nusc_256\)"):
        load_model_from_checkpoint(path)
    model, cfg = load_model_from_checkpoint(path, config=PRESET)
    assert cfg.name == PRESET and not model.training
    own = model.state_dict()
    assert torch.equal(
        own["voxel_encoder.aggregation3.pool.weight"],
        state["img_bev_encoder_backbone.aggreBlock3.pool.weight"],
    )
    assert torch.equal(own["head.query_pos.weight"], state["pts_bbox_head.query_embed.weight"])
    assert Counter(map(rl.fingerprint, own.values())) == Counter(map(rl.fingerprint, state.values()))


def test_build_model_from_released(release):
    path, state = release
    model, report = build_model_from_released(get_config(PRESET), path)
    own = model.state_dict()
    assert report.config_name == PRESET and report.ignored == ["optimizer"]
    assert report.meta["epoch"] == 24
    assert torch.equal(own["image_neck.deblocks.3.0.weight"], state["img_neck.deblocks.3.0.weight"])
    assert Counter(map(rl.fingerprint, own.values())) == Counter(map(rl.fingerprint, state.values()))


class _NoSamples(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


def test_eval_cli_routes_a_released_pth_and_its_pickle_flags(release, capsys):
    path, _ = release
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    # the numpy scalar in meta needs no flag; --allow-numpy-pickle is still accepted (and does nothing)
    for flags in ([], ["--allow-numpy-pickle"]):
        args = parser.parse_args(
            [str(path), "--config", PRESET, "--num-workers", "0", "--no-progress", *flags]
        )
        assert eval_cli.main(args, dataset_factory=lambda cfg, split, train=None: _NoSamples()) == 0
        assert f"0 samples scored, from {path}" in capsys.readouterr().out

    parser = argparse.ArgumentParser()
    predict_cli.add_arguments(parser)
    args = parser.parse_args([str(path), "--input", "val", "--out", "x", "--allow-unsafe-pickle"])
    assert args.allow_unsafe_pickle and not args.allow_numpy_pickle


def test_wrong_preset_is_refused_naming_the_right_one(release, tmp_path, capsys):
    path, _ = release
    out = tmp_path / "converted.safetensors"
    argv = [
        "convert-checkpoint",
        str(path),
        str(out),
        "--preset",
        "sparseocc_nusc_256",
        "--allow-numpy-pickle",
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and not out.exists()
    assert "they look like preset 'spotocc_nusc_256'" in err
    assert "spot_cross_attn.alpha" in err  # listed among the released tensors no rule maps


def test_output_must_be_safetensors(release, tmp_path, capsys):
    path, _ = release
    code, _, err = run_cli(
        ["convert-checkpoint", str(path), str(tmp_path / "x.pth"), "--preset", PRESET], capsys
    )
    assert code == 2 and ".safetensors" in err
