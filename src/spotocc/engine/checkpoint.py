"""Checkpoints: safetensors weights carrying their config, full training state, atomic and verified.

A training run keeps its checkpoints in ``<work_dir>/checkpoints/``::

    ckpt_000007_step00001200/      one "generation", written whole then renamed into place
        model.safetensors          weights; metadata "spotocc_config" = the resolved config (JSON)
        training_state.pt          optimizer, scheduler, scaler, counters, RNG states, sampler position
        manifest.json              size and sha256 of both files, epoch / step
    last -> ckpt_000007_step00001200   symlinks, flipped atomically
    best -> ckpt_000005_step00001000

A save writes a hidden temporary directory, fsyncs every file, renames the directory into place,
then flips ``last`` (and ``best``), then deletes generations that are neither among the newest
``keep_last`` nor ``best``. A kill at any moment leaves every earlier generation intact, and loading
checks sizes and hashes against the manifest, so a truncated or corrupt file is refused with an
error that names it; :func:`find_resumable` then falls back to the newest generation that verifies.

``model.safetensors`` alone is a complete weights file: eval and predict rebuild the model from its
embedded config. A bare ``.safetensors`` file (e.g. converted released weights) is accepted too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spotocc.engine.atomic import fsync_dir, fsync_file
from spotocc.errors import SpotoccError

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "add_save_hook",
    "find_resumable",
    "load_checkpoint",
    "load_weights_file",
    "remove_save_hook",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_weights_file",
    "verify_checkpoint",
]

FORMAT = "spotocc-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
CONFIG_METADATA_KEY = "spotocc_config"
_GENERATION = re.compile(r"^ckpt_(\d{6})_step(\d+)$")


class CheckpointError(SpotoccError, RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or corrupt (the message names the file)."""


# Hooks called at each stage of a save, ``hook(stage, path)``; tests use them to kill a run mid-save.
# Stages: "files_written" (temporary directory complete), "committed" (renamed into place),
# "pointers_updated" (last/best flipped), "done" (old generations removed).
_SAVE_HOOKS: list[Callable[[str, Path], None]] = []


def add_save_hook(hook: Callable[[str, Path], None]) -> None:
    _SAVE_HOOKS.append(hook)


def remove_save_hook(hook: Callable[[str, Path], None]) -> None:
    _SAVE_HOOKS.remove(hook)


def _run_hooks(stage: str, path: Path) -> None:
    for hook in list(_SAVE_HOOKS):
        hook(stage, path)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path  # the generation directory or the weights file
    model_state: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # resolved Config.to_dict(), if the weights carry one
    training_state: dict[str, Any] | None  # None for a weights-only file or when not requested
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# saving


def save_weights_file(
    path: str | os.PathLike,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``model_state`` as one safetensors file (atomically) with the config in its metadata."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save_file(_cpu_tensors(model_state), str(tmp), metadata=_weights_metadata(config, metadata))
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    training_state: Mapping[str, Any],
    global_step: int,
    info: Mapping[str, Any] | None = None,
    is_best: bool = False,
    keep_last: int = 2,
) -> Path:
    """Write a new checkpoint generation under ``ckpt_dir`` and point ``last`` (and ``best``) at it.

    ``training_state`` must hold only tensors and plain Python values (it is loaded with
    ``weights_only=True``). ``info`` (JSON-serialisable: epoch, metrics, ...) goes into the manifest.
    Returns the generation directory.
    """
    from safetensors.torch import save_file

    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    seq = max((g[0] for g in _generations(root)), default=0) + 1
    name = f"ckpt_{seq:06d}_step{int(global_step):08d}"
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_cpu_tensors(model_state), str(tmp / MODEL_FILE), metadata=_weights_metadata(config, None))
    torch.save(dict(training_state), tmp / STATE_FILE)
    files = {}
    for file_name in (MODEL_FILE, STATE_FILE):
        fsync_file(tmp / file_name)
        files[file_name] = {"size": (tmp / file_name).stat().st_size, "sha256": _sha256(tmp / file_name)}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "global_step": int(global_step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": files,
        "info": dict(info or {}),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    fsync_file(tmp / MANIFEST_FILE)
    fsync_dir(tmp)
    _run_hooks("files_written", tmp)
    final = root / name
    os.rename(tmp, final)  # a new name: atomic, never replaces anything
    fsync_dir(root)
    _run_hooks("committed", final)
    _point(root, "last", name)
    if is_best:
        _point(root, "best", name)
    fsync_dir(root)
    _run_hooks("pointers_updated", final)
    _remove_old_generations(root, keep_last)
    _run_hooks("done", final)
    return final


def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Own contiguous copies: safetensors refuses tensors that share storage (tied weights).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _weights_metadata(config: Mapping[str, Any] | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    metadata = {"format": "pt", "spotocc_format": str(VERSION)}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config)
    metadata.update(extra or {})
    return metadata


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _generations(root: Path) -> list[tuple[int, Path]]:
    """(sequence number, directory) of every committed generation, oldest first."""
    out = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _GENERATION.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                out.append((int(match.group(1)), entry))
    return sorted(out)


def _point(root: Path, pointer: str, target_name: str) -> None:
    link = root / pointer
    if link.exists() and not link.is_symlink():
        raise CheckpointError(f"{link} exists and is not a symlink; move it away so checkpoints can be saved")
    tmp = root / f".{pointer}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target_name, tmp)  # relative: the work dir can be moved
    os.replace(tmp, link)


def _remove_old_generations(root: Path, keep_last: int) -> None:
    generations = _generations(root)
    keep = {path.name for _, path in generations[-max(keep_last, 1) :]}
    for pointer in ("last", "best"):
        link = root / pointer
        if link.is_symlink():
            keep.add(os.readlink(link))
    for _, path in generations:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for entry in root.iterdir():  # leftovers of saves killed midway: temporary directories and links
        if entry.name.startswith(".tmp_ckpt_") and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith((".last.tmp", ".best.tmp")) and entry.is_symlink():
            entry.unlink()


# --------------------------------------------------------------------------------------------------
# loading


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint a user-given path means.

    Accepts a generation directory (or a ``last`` / ``best`` link), a ``.safetensors`` weights file,
    a ``checkpoints`` directory or a training work directory (then ``best`` if present, else ``last``).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"checkpoint {p}: expected a checkpoint directory or a .safetensors file")
        return p
    if (p / MANIFEST_FILE).exists() or (p / MODEL_FILE).exists():
        return p.resolve()
    for root in (p, p / "checkpoints"):
        for pointer in ("best", "last"):
            if (root / pointer).exists():
                return (root / pointer).resolve()
    raise CheckpointError(
        f"checkpoint {p}: neither a checkpoint directory (no {MANIFEST_FILE}) nor a work directory "
        "with checkpoints/best or checkpoints/last"
    )


def verify_checkpoint(path: str | os.PathLike, *, files: tuple[str, ...] = (MODEL_FILE, STATE_FILE)) -> dict:
    """Check a generation directory against its manifest; return the manifest or raise CheckpointError."""
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {root} is incomplete: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {err}") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a spotocc checkpoint manifest")
    if int(manifest.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"checkpoint {root} has format version {manifest.get('version')}; "
            f"this spotocc reads versions up to {VERSION}"
        )
    for name in files:
        expected = manifest["files"].get(name)
        file_path = root / name
        if expected is None:
            raise CheckpointError(f"checkpoint manifest {manifest_path} does not list {name}")
        if not file_path.is_file():
            raise CheckpointError(f"checkpoint file {file_path} is missing")
        size = file_path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"checkpoint file {file_path} is truncated or damaged: "
                f"{size} bytes, expected {expected['size']}"
            )
        if _sha256(file_path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file_path} is corrupt: its sha256 does not match the manifest"
            )
    return manifest


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and embedded config of a ``.safetensors`` file (safetensors checks its own header)."""
    from safetensors import safe_open

    file_path = Path(path)
    if not file_path.is_file():
        raise CheckpointError(f"weights file {file_path} is missing")
    try:
        with safe_open(str(file_path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated / bad headers
        raise CheckpointError(
            f"weights file {file_path} is truncated or not a safetensors file: {err}"
        ) from err
    config = None
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"weights file {file_path}: embedded config is not valid JSON: {err}"
            ) from err
    return state, config


def load_checkpoint(path: str | os.PathLike, *, with_training_state: bool = True) -> LoadedCheckpoint:
    """Load and verify a checkpoint (see :func:`resolve_checkpoint` for the accepted paths)."""
    resolved = resolve_checkpoint(path)
    if resolved.is_file():
        state, config = load_weights_file(resolved)
        if with_training_state:
            raise CheckpointError(f"{resolved} is a weights-only file: it cannot resume training")
        return LoadedCheckpoint(resolved, state, config, None, {})
    files = (MODEL_FILE, STATE_FILE) if with_training_state else (MODEL_FILE,)
    manifest = verify_checkpoint(resolved, files=files)
    state, config = load_weights_file(resolved / MODEL_FILE)
    training_state = None
    if with_training_state:
        try:
            training_state = torch.load(resolved / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"checkpoint file {resolved / STATE_FILE} cannot be read: {err}") from err
    return LoadedCheckpoint(resolved, state, config, training_state, manifest)


def find_resumable(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest generation under ``ckpt_dir`` that verifies, or None; damaged ones are skipped loudly."""
    for _, path in reversed(_generations(Path(ckpt_dir))):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", stacklevel=2)
            continue
        return path
    return None
