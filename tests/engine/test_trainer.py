"""Training loop: exact resume after kills, torchrun (gloo) equivalence, AMP, best checkpoint.

Runs that must be killed go through ``engine_driver.py`` in a fresh process (one torch thread, so
runs are bitwise comparable).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_toys import ToyOccupancyModel, toy_config, toy_dataset_factory, toy_model_factory
from safetensors.torch import load_file

from spotocc.engine import trainer as trainer_module
from spotocc.engine.checkpoint import load_checkpoint
from spotocc.engine.evaluator import EvalResult, evaluate, load_model_from_checkpoint
from spotocc.engine.metrics_log import read_metrics
from spotocc.engine.trainer import depth_teacher_weight, total_loss, train
from spotocc.errors import ConfigError

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DRIVER = HERE / "engine_driver.py"
RESUME_OVERRIDES = [
    "train.checkpoint_iter_interval=2",
    "image_backbone.drop_path_rate=0.3",  # toy dropout: the RNG state must be restored too
    "train.epochs=3",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _drive(
    work_dir: Path, *extra: str, overrides=RESUME_OVERRIDES, launcher=None
) -> subprocess.CompletedProcess:
    args = [str(DRIVER), "--work-dir", str(work_dir)]
    for item in overrides:
        args += ["--override", item]
    cmd = (launcher or [sys.executable]) + args + list(extra)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _losses(work_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(work_dir / "metrics.jsonl") if r["type"] == "train"]


def _val(work_dir: Path) -> list[dict]:
    return [r for r in read_metrics(work_dir / "metrics.jsonl") if r["type"] == "val"]


def _weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(work_dir / "checkpoints" / "last" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    work_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = _drive(work_dir)
    assert proc.returncode == 0, proc.stderr
    return work_dir


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert _losses(resumed) == _losses(reference)  # every step, bit for bit
    assert len(_losses(reference)) == 18
    strip = [{k: v for k, v in r.items() if k != "time"} for r in _val(reference)]
    assert [{k: v for k, v in r.items() if k != "time"} for r in _val(resumed)] == strip
    a, b = _weights(resumed), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_toy(cfg, work_dir: Path):
    """The toy model and data, in this process on the CPU, without a progress bar."""
    return train(
        cfg,
        work_dir=work_dir,
        device="cpu",
        model_factory=toy_model_factory,
        dataset_factory=toy_dataset_factory,
        show_progress=False,
    )


def _resumed_step(proc: subprocess.CompletedProcess) -> int:
    assert proc.stdout.count("resumed from") == 1, proc.stdout[-2000:]
    line = proc.stdout.split("resumed from", 1)[1].splitlines()[0]
    return int(line.rsplit("step ", 1)[1])


@pytest.mark.slow
def test_resume_after_kills_mid_step_and_during_checkpoint_saves(tmp_path, uninterrupted):
    """Four processes, three kills; the result equals the uninterrupted run bit for bit.

    Saves happen every 2 steps (6 steps per epoch, 3 epochs). A kill while a save's files are being
    written falls back to the save before; a kill after the new generation is committed but before
    ``last`` points at it resumes from the new one.
    """
    killed = _drive(tmp_path, "--kill-at-step", "9")  # SIGKILL mid-epoch; last save at step 8
    assert killed.returncode == -signal.SIGKILL
    assert max(step for step, _ in _losses(tmp_path)) == 9  # it had logged past its last checkpoint

    # resumes at 8, saves at 10, killed inside its 2nd save (step 12) before the commit
    killed = _drive(tmp_path, "--resume", "--kill-at-save", "2", "--kill-stage", "files_written")
    assert killed.returncode == -signal.SIGKILL and _resumed_step(killed) == 8
    assert any(p.name.startswith(".tmp_ckpt_") for p in (tmp_path / "checkpoints").iterdir())

    # resumes at 10, saves at 12, killed inside its 2nd save (step 14) after the commit
    killed = _drive(tmp_path, "--resume", "--kill-at-save", "2", "--kill-stage", "committed")
    assert killed.returncode == -signal.SIGKILL and _resumed_step(killed) == 10
    assert os.readlink(tmp_path / "checkpoints" / "last").endswith("step00000012")

    finished = _drive(tmp_path, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert _resumed_step(finished) == 14
    _assert_same_run(tmp_path, uninterrupted)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo processes x batch 1 (SyncBN) == 1 process x batch 2; distributed eval counts samples once."""
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _drive(
        dist_dir,
        "--eval-out",
        str(tmp_path / "eval.json"),
        overrides=["data.batch_size=1"],
        launcher=launcher,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x batch 1 = effective batch 2" in proc.stdout

    torch.manual_seed(123)  # the run must not depend on the caller's RNG
    _train_toy(toy_config(["data.batch_size=2"]), single_dir)
    a, b = _weights(dist_dir), _weights(single_dir)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=2e-5), key
    assert "image_backbone.1.running_mean" in a  # the BatchNorm statistics match too
    da, sa = _losses(dist_dir), _losses(single_dir)
    assert [s for s, _ in da] == [s for s, _ in sa] and np.allclose(
        [v for _, v in da], [v for _, v in sa], atol=1e-5
    )

    # distributed evaluation of 5 samples on 2 ranks: every sample once, same counts as one process
    dist_eval = json.loads((tmp_path / "eval.json").read_text())
    assert dist_eval["world_size"] == 2 and dist_eval["num_samples"] == 5
    assert sorted(dist_eval["sample_ids"]) == sorted(f"seq{i % 2}/{i:04d}" for i in range(5))
    model, cfg = load_model_from_checkpoint(
        dist_dir / "checkpoints" / "last", model_factory=toy_model_factory
    )
    single = evaluate(model, toy_dataset_factory(cfg, "toy-5"), cfg, device=torch.device("cpu"), batch_size=1)
    assert dist_eval["confusion"] == single.counts["confusion"].tolist()
    assert dist_eval["ignored"] == int(single.counts["ignored"][0])
    assert dist_eval["metrics"] == single.metrics


def test_total_loss_sums_only_loss_entries():
    losses = {
        "loss_a": torch.tensor(1.0),
        "d0.loss_b": torch.tensor([2.0, 3.0]),
        "accuracy": torch.tensor(9.0),
    }
    assert total_loss(losses).item() == 6.0
    with pytest.raises(ValueError, match="no entry"):
        total_loss({"accuracy": torch.tensor(1.0)})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_and_checkpoints_the_scaler(tmp_path, amp):
    cfg = toy_config([f"train.amp={amp}", "train.max_iters=3", "train.eval_interval=0"])
    result = _train_toy(cfg, tmp_path)
    assert result.global_step == 3
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    state = load_checkpoint(tmp_path / "checkpoints" / "last").training_state
    assert ("scale" in state["scaler"]) == (amp == "fp16")


def test_best_checkpoint_follows_ssc_miou(tmp_path, monkeypatch):
    scores = iter([5.0, 7.0, 6.0])

    def fake_evaluate(model, dataset, cfg, **kwargs):
        return EvalResult(metrics={"SSC_mIoU": next(scores)}, counts={}, num_samples=len(dataset))

    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    result = _train_toy(toy_config(["train.epochs=3"]), tmp_path)
    assert result.best_miou == 7.0
    best = load_checkpoint(tmp_path / "checkpoints" / "best")
    assert best.training_state["global_step"] == 12 and best.training_state["best_miou"] == 7.0
    assert load_checkpoint(tmp_path / "checkpoints" / "last").training_state["global_step"] == 18
    assert [r["semkitti_SSC_mIoU"] for r in _val(tmp_path)] == [5.0, 7.0, 6.0]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    def nan_model(cfg):
        model = toy_model_factory(cfg)
        original = model.forward_train
        model.forward_train = lambda batch: {**original(batch), "loss_nan": torch.tensor(float("nan"))}
        return model

    with pytest.raises(FloatingPointError, match="not finite at step 1"):
        train(
            toy_config(),
            work_dir=tmp_path,
            device="cpu",
            model_factory=nan_model,
            dataset_factory=toy_dataset_factory,
            show_progress=False,
        )


def test_logged_values_are_averaged_over_the_log_interval(tmp_path):
    runs = {}
    for interval in (1, 4):
        cfg = toy_config([f"train.log_interval={interval}", "train.epochs=1", "train.eval_interval=0"])
        work_dir = tmp_path / str(interval)
        _train_toy(cfg, work_dir)
        runs[interval] = [r for r in read_metrics(work_dir / "metrics.jsonl") if r["type"] == "train"]
    every, windowed = runs[1], runs[4]
    assert [r["step"] for r in windowed] == [4, 6]  # every 4 steps and at the epoch end
    for record, steps in zip(windowed, [range(0, 4), range(4, 6)]):
        for key in ("loss", "loss_ce", "d0.loss_aux", "accuracy", "grad_norm"):
            expected = np.mean([every[i][key] for i in steps])
            assert record[key] == pytest.approx(expected, rel=1e-6), key
    assert windowed[0]["loss"] == pytest.approx(windowed[0]["loss_ce"] + windowed[0]["d0.loss_aux"], rel=1e-6)


def test_tensorboard_gets_the_logged_train_and_val_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_config(["train.tensorboard=true", "train.epochs=1", "train.log_interval=2"])
    work_dir = tmp_path / "run"
    _train_toy(cfg, work_dir)
    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = [r for r in read_metrics(work_dir / "metrics.jsonl") if r["type"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in logged]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged])
    val = [r for r in read_metrics(work_dir / "metrics.jsonl") if r["type"] == "val"]
    miou_tags = [t for t in tags if t.startswith("val/") and t.endswith("SSC_mIoU")]
    assert len(miou_tags) == 1 and len(val) == 1, sorted(tags)
    assert events.Scalars(miou_tags[0])[0].value == pytest.approx(val[0][miou_tags[0][4:]])


def test_depth_teacher_forcing_decays_linearly_over_the_run(tmp_path):
    seen = []

    class Recording(ToyOccupancyModel):
        def forward_train(self, batch):
            seen.append(self.depth_teacher_weight)
            return super().forward_train(batch)

    def factory(cfg):
        return Recording(num_classes=cfg.model.head.num_classes, occ_size=cfg.grid.occ_size)

    # 12 samples, batch 2, 2 epochs: 12 iterations; the share reaches 0 at half of them
    cfg = toy_config(["train.depth_teacher_forcing=0.8", "train.depth_teacher_forcing_end=0.5"])
    train(
        cfg,
        work_dir=tmp_path,
        device="cpu",
        model_factory=factory,
        dataset_factory=toy_dataset_factory,
        show_progress=False,
    )
    assert seen == pytest.approx([0.8 * (1 - step / 6) for step in range(6)] + [0.0] * 6)


def test_depth_teacher_weight_is_zero_when_off():
    cfg = toy_config(["train.depth_teacher_forcing=0"])
    assert [depth_teacher_weight(cfg.train, s, 10) for s in range(10)] == [0.0] * 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.depth_teacher_forcing=1.5", "depth_teacher_forcing must be in"),
        ("train.depth_teacher_forcing_end=0", "depth_teacher_forcing_end must be > 0"),
    ],
)
def test_bad_depth_teacher_forcing_is_a_config_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _train_toy(toy_config([override]), tmp_path)
