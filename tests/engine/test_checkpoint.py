import json
import os
import random

import pytest
import torch

from spotocc.engine import checkpoint as ckpt
from spotocc.engine.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    load_weights_file,
    resolve_checkpoint,
    save_checkpoint,
    save_weights_file,
)


def _state(value: float) -> dict[str, torch.Tensor]:
    tied = torch.full((3, 2), value)
    return {"a.weight": tied, "b.weight": tied, "bn.num_batches_tracked": torch.tensor(7)}  # shared storage


def _save(root, step, value, *, is_best=False, keep_last=2):
    training_state = {
        "step": step,
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "nested": {"lr": [1e-4, 1e-5], "none": None, "name": "x"},
    }
    return save_checkpoint(
        root,
        model_state=_state(value),
        config={"name": "toy", "train": {"lr_steps": [20, 23]}},
        training_state=training_state,
        global_step=step,
        info={"epoch": step},
        is_best=is_best,
        keep_last=keep_last,
    )


def test_round_trip_with_config_and_training_state(tmp_path):
    path = _save(tmp_path, 5, 1.5, is_best=True)
    loaded = load_checkpoint(tmp_path / "last")
    assert loaded.path == path.resolve()
    assert torch.equal(loaded.model_state["a.weight"], torch.full((3, 2), 1.5))
    assert loaded.model_state["bn.num_batches_tracked"].item() == 7
    assert loaded.config == {"name": "toy", "train": {"lr_steps": [20, 23]}}
    assert loaded.training_state["step"] == 5 and loaded.training_state["nested"]["none"] is None
    assert isinstance(loaded.training_state["torch_rng"], torch.Tensor)
    assert loaded.manifest["info"] == {"epoch": 5}
    # the weights file alone carries the config
    state, config = load_weights_file(path / "model.safetensors")
    assert config["name"] == "toy" and set(state) == {"a.weight", "b.weight", "bn.num_batches_tracked"}
    assert os.readlink(tmp_path / "best") == path.name


def test_last_best_and_old_generations(tmp_path):
    first = _save(tmp_path, 1, 1.0, is_best=True)
    _save(tmp_path, 2, 2.0)
    _save(tmp_path, 3, 3.0)
    fourth = _save(tmp_path, 4, 4.0)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt_"))
    # the newest two plus best survive
    assert names == [first.name, "ckpt_000003_step00000003", fourth.name]
    assert os.readlink(tmp_path / "last") == fourth.name and os.readlink(tmp_path / "best") == first.name
    assert resolve_checkpoint(tmp_path) == first.resolve()  # a checkpoints dir: best first
    assert resolve_checkpoint(tmp_path.parent / tmp_path.name / "last") == fourth.resolve()


def test_truncated_file_is_refused_and_previous_still_usable(tmp_path):
    previous = _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        load_checkpoint(tmp_path / "last")
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights_file(weights)  # safetensors' own header check, without a manifest
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        usable = find_resumable(tmp_path)
    assert usable == previous
    loaded = load_checkpoint(usable)
    assert torch.equal(loaded.model_state["a.weight"], torch.full((3, 2), 1.0))


def test_corrupt_state_file_and_missing_manifest(tmp_path):
    path = _save(tmp_path, 1, 1.0)
    state_file = path / "training_state.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{state_file}.*sha256"):
        load_checkpoint(path)
    # the weights alone still load for eval (the damaged file is not needed)
    assert load_checkpoint(path, with_training_state=False).model_state["a.weight"][0, 0] == 1.0
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*manifest.json is missing"):
        load_checkpoint(path)


def test_kill_before_commit_leaves_previous_checkpoint(tmp_path):
    previous = _save(tmp_path, 1, 1.0)

    class Killed(Exception):
        pass

    def hook(stage, path):
        if stage == "files_written":
            raise Killed

    ckpt.add_save_hook(hook)
    try:
        with pytest.raises(Killed):
            _save(tmp_path, 2, 2.0)
    finally:
        ckpt.remove_save_hook(hook)
    assert any(p.name.startswith(".tmp_ckpt_") for p in tmp_path.iterdir())  # the half-done save
    assert find_resumable(tmp_path) == previous
    assert load_checkpoint(tmp_path / "last").model_state["a.weight"][0, 0] == 1.0
    _save(tmp_path, 3, 3.0)  # the next save clears the leftovers
    assert not any(p.name.startswith(".tmp_") for p in tmp_path.iterdir())


def test_weights_file_and_errors(tmp_path):
    file = tmp_path / "w.safetensors"
    save_weights_file(file, _state(2.0), config={"name": "toy"})
    loaded = load_checkpoint(file, with_training_state=False)
    assert loaded.config == {"name": "toy"} and loaded.training_state is None
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(file)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "x.pth").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        resolve_checkpoint(tmp_path / "x.pth")
    manifest = json.loads((_save(tmp_path / "c", 1, 1.0) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "training_state.pt"}
