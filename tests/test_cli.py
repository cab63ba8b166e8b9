"""``spotocc <command>``: user and data errors are one line and exit status 2; bugs keep their traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from spotocc import cli
from spotocc.config import get_config
from spotocc.data.files import DataFileError, MissingFileError
from spotocc.errors import ConfigError


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_error_line(err: str, command: str, message: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"spotocc {command}: error: "), err
    assert message in err, err


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("SPOTOCC_DEBUG", raising=False)


def test_bad_override(tmp_path, capsys):
    code, err = run(["train", "synthetic_tiny", "head.nosuch=3", "--work-dir", str(tmp_path / "w")], capsys)
    assert code == 2
    assert_one_error_line(err, "train", "override 'head.nosuch=3': unknown key 'model.head.nosuch'")
    code, err = run(["info", "synthetic_tiny", "head.num_queries=many"], capsys)
    assert code == 2 and err.startswith("spotocc info: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.voxel_neck.feat_channels=20", "feat_channels 20 is not divisible by num_groups 8"),
        ("model.view_transformer.depth_distance_weighting=-1", "depth_distance_weighting must be >= 0"),
    ],
)
def test_a_model_value_the_modules_refuse_is_a_one_line_error(tmp_path, capsys, override, message):
    argv = ["train", "synthetic_tiny", override, "--work-dir", str(tmp_path / "w"), "--no-eval"]
    code, err = run([*argv, "data.root=" + str(tmp_path)], capsys)
    assert code == 2
    assert_one_error_line(err, "train", message)
    assert "config 'synthetic_tiny': " in err


def test_unknown_preset(tmp_path, capsys):
    code, err = run(["train", "no_such_preset", "--work-dir", str(tmp_path / "w")], capsys)
    assert code == 2
    assert_one_error_line(err, "train", "unknown preset 'no_such_preset'; available: ")
    code, err = run(["info", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "config file" in err and "does not exist" in err and err.count("\n") == 1


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    code, err = run(["eval", str(missing), "--data", str(tmp_path)], capsys)
    assert code == 2
    assert_one_error_line(err, "eval", f"checkpoint {missing} does not exist")
    missing_pth = tmp_path / "none.pth"
    argv = [
        "convert-checkpoint",
        str(missing_pth),
        str(tmp_path / "o.safetensors"),
        "--preset",
        "synthetic_tiny",
    ]
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "convert-checkpoint", f"released checkpoint {missing_pth} does not exist")


def test_missing_dataset_folder(tmp_path, capsys):
    root = tmp_path / "no_dataset"
    argv = [
        "train",
        "synthetic_tiny",
        f"data.root={root}",
        "--work-dir",
        str(tmp_path / "w"),
        "--device",
        "cpu",
    ]
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_error_line(
        err, "train", f"{root}/dataset/sequences: SemanticKITTI sequences folder is missing"
    )


@pytest.fixture(scope="module")
def truncated_dataset(tmp_path_factory):
    """One generated synthetic_tiny training scene whose label file lost its last 1000 bytes."""
    from spotocc.data.synthetic import generate, source_image_size

    cfg = get_config("synthetic_tiny")
    root = tmp_path_factory.mktemp("truncated")
    generate(root, "semantickitti", num_train=1, num_val=0, seed=0, grid=cfg.grid,
             image_size=source_image_size(cfg.data), lidar_azimuth_steps=64)  # fmt: skip
    label = root / "labels" / "00" / "000000_1_1.npy"
    label.write_bytes(label.read_bytes()[:-1000])
    return root, label


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_label_file(tmp_path, capsys, truncated_dataset, workers):
    """In the main process and in a DataLoader worker (which torch re-raises as the same type)."""
    root, label = truncated_dataset
    argv = ["train", "synthetic_tiny", f"data.root={root}", f"data.num_workers={workers}", "--max-iters", "1",
            "--no-eval", "--work-dir", str(tmp_path / "w"), "--device", "cpu", "--no-progress"]  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "train", f"{label}: preprocessed label file is not a readable .npy array")
    assert "Traceback" not in err and "worker" not in err


@pytest.mark.parametrize("how", ["flag first", "flag last", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    argv = ["train", "no_such_preset", "--work-dir", str(tmp_path / "w")]
    if how == "env":
        monkeypatch.setenv("SPOTOCC_DEBUG", "1")
    argv = ["--debug", *argv] if how == "flag first" else [*argv, "--debug"] if how == "flag last" else argv
    code, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("Traceback (most recent call last):") and "ConfigError: unknown preset" in err
    assert err.splitlines()[-1].startswith("spotocc train: error: unknown preset 'no_such_preset'")


def test_debug_shows_a_workers_traceback(monkeypatch, capsys):
    from torch._utils import ExceptionWrapper

    try:
        raise MissingFileError("/data/x.bin")
    except MissingFileError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")

    def main(args):
        wrapped.reraise()  # what the DataLoader does in the main process

    monkeypatch.setattr("spotocc.commands.info.main", main)
    code, err = run(["info", "synthetic_tiny"], capsys)
    assert code == 2 and err == "spotocc info: error: /data/x.bin: file is missing\n"
    code, err = run(["info", "synthetic_tiny", "--debug"], capsys)
    assert code == 2 and "Caught MissingFileError in DataLoader worker process 3" in err


def test_bugs_keep_their_traceback_whatever_the_message(monkeypatch, capsys):
    """Classified by type: a plain ValueError with a user-error text is still a bug."""

    def buggy(args):
        raise ValueError("unknown preset 'x'")

    monkeypatch.setattr("spotocc.commands.info.main", buggy)
    with pytest.raises(ValueError, match="unknown preset"):
        cli.main(["info", "synthetic_tiny"])
    monkeypatch.setattr("spotocc.commands.info.main", lambda args: np.zeros(2)[5])
    with pytest.raises(IndexError):
        cli.main(["info", "synthetic_tiny"])
    assert capsys.readouterr().err == ""


def test_project_errors_are_user_errors():
    from spotocc.engine.checkpoint import CheckpointError
    from spotocc.errors import SpotoccError, UsageError
    from spotocc.models.released import ReleasedCheckpointError

    for cls in (
        ConfigError,
        DataFileError,
        MissingFileError,
        CheckpointError,
        ReleasedCheckpointError,
        UsageError,
    ):
        assert issubclass(cls, SpotoccError)
    assert issubclass(ConfigError, ValueError) and issubclass(MissingFileError, FileNotFoundError)


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse exits itself
        cli.main(["predict", "ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "predict", "the following arguments are required: --input, --out")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spotocc: error: argument COMMAND: invalid choice")


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPOTOCC_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "spotocc.cli", "info", "synthetic_tiny", "head.nosuch=3"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "spotocc info: error: override 'head.nosuch=3': unknown key 'model.head.nosuch'\n"
