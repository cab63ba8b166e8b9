import argparse
import json

import pytest
from engine_toys import TOY_OVERRIDES, toy_dataset_factory, toy_model_factory

from spotocc.cli import main as cli_main
from spotocc.commands import train as train_cli
from spotocc.engine.checkpoint import load_checkpoint
from spotocc.engine.metrics_log import read_metrics


def _run(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return train_cli.main(args, model_factory=toy_model_factory, dataset_factory=toy_dataset_factory)


def test_train_flags_then_resume_continues(tmp_path, capsys):
    base = ["synthetic_tiny", *TOY_OVERRIDES, "--work-dir", str(tmp_path), "--no-eval", "--no-progress"]
    assert _run(base + ["--max-iters", "2", "--device", "cpu", "--seed", "3"]) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved["train"]["eval_interval"] == 0
        and saved["train"]["max_iters"] == 2
        and saved["train"]["seed"] == 3
    )
    assert load_checkpoint(tmp_path / "checkpoints" / "last").training_state["global_step"] == 2
    assert _run(base + ["--max-iters", "5", "--resume", "train.seed=3"]) == 0  # an override after --resume
    out = capsys.readouterr().out
    assert "resumed from" in out and "done: 5 iterations" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", "PRESET_OR_CONFIG"),
        ("eval", "--predictions"),
        ("predict", "DATA_ROOT_OR_SPLIT"),
        ("quickstart", "--num-val"),
    ],
)
def test_commands_are_wired_into_the_cli(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0 and expected in capsys.readouterr().out
