"""Reading the released mmcv-era ``.pth`` checkpoints safely, and loading or converting them.

A released checkpoint (mmcv 1.4 ``save_checkpoint``) is a pickle: ``{"meta": {...}, "state_dict":
OrderedDict(name -> tensor), optionally "optimizer": ...}``. Pickles can run code when loaded, and these
files come from a file-sharing site, so they are read with ``torch.load(weights_only=True)``: tensors,
plain containers and, since mmcv's ``meta`` commonly holds them (an epoch counter, a best score), numpy
scalars, arrays and dtypes. Rebuilding those runs numpy's own constructors only (the allow-list is
:func:`spotocc.data.safe_pickle.numpy_globals`, numpy 1.x and 2.x names). A file that needs anything
else is refused with a message naming the Python globals it asks for, and one explicit way on:

- ``allow_unsafe_pickle=True`` (``--allow-unsafe-pickle``): ``weights_only=False``. This EXECUTES
  WHATEVER CODE THE FILE CONTAINS; only for files whose source you trust.

``allow_numpy=False`` refuses the numpy types too. ``--allow-numpy-pickle``, once needed for them, is
still accepted and does nothing.

The weights are then mapped onto spotocc's names by :mod:`spotocc.models.released` (strict, one to one).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotocc.config import Config
from spotocc.models.released import (
    ReleasedCheckpointError,
    ReleasedConversion,
    convert_released_state_dict,
    guess_released_preset,
    spotocc_geometry,
)

__all__ = [
    "ReleasedCheckpoint",
    "ReleasedCheckpointError",
    "ReleasedLoadReport",
    "UnsafeCheckpointError",
    "build_model_from_released",
    "convert_released_checkpoint",
    "is_released_checkpoint_path",
    "load_released_checkpoint",
    "numpy_safe_globals",
    "preset_hint",
    "read_released_checkpoint",
]

# meta entries worth repeating in reports and in the converted file's metadata
_META_SUMMARY_KEYS = ("mmcv_version", "time", "epoch", "iter", "CLASSES")


class UnsafeCheckpointError(ReleasedCheckpointError):
    """A checkpoint that needs more than tensors and plain containers to unpickle (refused by default)."""

    def __init__(
        self, text: str = "", globals_needed: list[str] | None = None, *, message: str | None = None
    ) -> None:
        super().__init__(*((text,) if message is None else ()), message=message)
        self.globals_needed = globals_needed or []


@dataclass
class ReleasedCheckpoint:
    """A released checkpoint as read: tensors by released name, the mmcv ``meta``, and what was ignored."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    ignored: list[str] = field(default_factory=list)  # other top-level entries, e.g. "optimizer"
    stripped_prefix: str | None = None  # "module." when saved from DDP

    def meta_summary(self) -> dict[str, Any]:
        """The informative, JSON-friendly part of ``meta`` (mmcv version, time, epoch, iter, classes)."""
        return {k: _plain(self.meta[k]) for k in _META_SUMMARY_KEYS if k in self.meta}


@dataclass
class ReleasedLoadReport:
    """What loading or converting a released checkpoint did (``summary()`` for humans)."""

    path: Path
    config_name: str
    num_tensors: int
    conversion: ReleasedConversion
    meta: dict[str, Any]
    ignored: list[str]
    stripped_prefix: str | None

    def summary(self) -> str:
        meta = ", ".join(f"{k} {v}" for k, v in self.meta.items() if k != "CLASSES") or "no meta"
        geometry = ", ".join(f"{k} {v:.2g}" for k, v in self.conversion.geometry_max_diff.items())
        lines = [
            f"read {self.path}: {self.num_tensors} released tensors ({meta})",
            f"mapped every one of them to the {len(self.conversion.state)} tensors of {self.config_name} "
            "(one to one, same shapes)",
            f"view-transformer geometry equals spotocc's own (max |diff|: {geometry})",
        ]
        if self.stripped_prefix:
            lines.append(f"stripped the {self.stripped_prefix!r} prefix (a DDP-wrapped save)")
        if self.conversion.cast:
            lines.append(f"cast {len(self.conversion.cast)} tensors to the model's dtype")
        if self.ignored:
            lines.append(f"ignored top-level entries: {', '.join(self.ignored)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# reading


RELEASED_SUFFIXES = (".pth", ".pt")


def is_released_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a torch pickle file (``.pth`` / ``.pt``, e.g. a released checkpoint), not a
    spotocc checkpoint directory or ``.safetensors`` file."""
    p = Path(path)
    return p.is_file() and p.suffix in RELEASED_SUFFIXES


def numpy_safe_globals() -> list[Any]:
    """The numpy arrays, scalars and dtypes a ``meta`` may hold, for ``torch.serialization.safe_globals``.

    Each entry is ``(object, "module.name")`` under both the numpy 1.x (``numpy.core``) and 2.x
    (``numpy._core``) spellings, since the file names the module of the numpy that wrote it; plus
    ``bytes``, which protocol 2 (``torch.save``'s) calls for an empty array's buffer.
    """
    from spotocc.data.safe_pickle import numpy_globals

    entries: list[Any] = [(obj, f"{module}.{name}") for (module, name), obj in numpy_globals().items()]
    return [*entries, (bytes, "builtins.bytes")]


def read_released_checkpoint(
    path: str | os.PathLike, *, allow_numpy: bool = True, allow_unsafe_pickle: bool = False
) -> ReleasedCheckpoint:
    """Read a released ``.pth`` safely (see the module docstring for what is allowed).

    Accepts ``{"state_dict": ..., "meta": ...}`` (mmcv), ``{"model": ...}`` or a bare name -> tensor
    dict; a ``module.`` prefix on every name is stripped. Raises :class:`UnsafeCheckpointError` (which
    names the refused globals) or :class:`ReleasedCheckpointError`.
    """
    p = Path(path)
    if not p.is_file():
        raise ReleasedCheckpointError(f"released checkpoint {p} does not exist")
    data = _torch_load(p, allow_numpy=allow_numpy, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(data, Mapping):
        raise ReleasedCheckpointError(f"{p} holds a {type(data).__name__}, not a checkpoint dict")
    meta: dict[str, Any] = {}
    ignored: list[str] = []
    if isinstance(data.get("state_dict"), Mapping) or isinstance(data.get("model"), Mapping):
        key = "state_dict" if isinstance(data.get("state_dict"), Mapping) else "model"
        state = data[key]
        if isinstance(data.get("meta"), Mapping):
            meta = dict(data["meta"])
        ignored = [str(k) for k in data if k not in (key, "meta")]
    elif all(isinstance(v, torch.Tensor) for v in data.values()):
        state = data
    else:
        raise ReleasedCheckpointError(
            f"{p} has no 'state_dict' entry and is not a dict of tensors (top-level keys: "
            f"{', '.join(map(str, list(data)[:10]))})"
        )
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ReleasedCheckpointError(
            f"{p}: state-dict entries that are not tensors: {', '.join(not_tensors)}"
        )
    state = {str(k): v for k, v in state.items()}
    prefix = None
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
        prefix = "module."
    return ReleasedCheckpoint(path=p, state_dict=state, meta=meta, ignored=ignored, stripped_prefix=prefix)


def _torch_load(path: Path, *, allow_numpy: bool, allow_unsafe_pickle: bool) -> Any:
    mmap = zipfile.is_zipfile(path)  # the legacy (torch < 1.6) format cannot be memory-mapped
    if allow_unsafe_pickle:
        warnings.warn(
            f"loading {path} with weights_only=False (--allow-unsafe-pickle): any code in the file runs",
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:
            raise ReleasedCheckpointError(f"cannot read {path}: {err}") from err
    allowed = numpy_safe_globals() if allow_numpy else []
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            needed = _refused_globals(path, err)
            raise UnsafeCheckpointError(_unsafe_message(path, needed, allow_numpy), needed) from None
        except Exception as err:  # truncated zip, not a torch file, ...
            raise ReleasedCheckpointError(f"cannot read {path} as a torch checkpoint: {err}") from err


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """Every global the weights-only unpickler refuses (static scan), or the one named in ``err``."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the legacy format cannot be scanned: fall back to the error message
        found = []
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", str(err))[:1] or [
            "(unknown: " + str(err).splitlines()[-1] + ")"
        ]
    return sorted(set(found))


def _unsafe_message(path: Path, needed: list[str], allow_numpy: bool) -> str:
    lines = [
        f"refusing to load {path}: besides tensors and plain containers, unpickling it needs these Python "
        f"objects: {', '.join(needed)}. Loading them with full pickle would let the file run code, so "
        "spotocc does not do that by default."
    ]
    if not allow_numpy and set(needed) <= {name for _, name in numpy_safe_globals()}:
        lines.append(
            "They are numpy scalar/array/dtype types (typically in the mmcv 'meta' dict), refused because "
            "allow_numpy=False was given; the default (allow_numpy=True) allows exactly those."
        )
    else:
        lines.append(
            "Some of them are not on spotocc's allow-list. Only if you trust the file's source, rerun with "
            "--allow-unsafe-pickle (Python: allow_unsafe_pickle=True): it loads with weights_only=False and "
            "EXECUTES ANY CODE THE FILE CONTAINS. Converting it once (spotocc convert-checkpoint) gives a "
            "safetensors file that never needs this again."
        )
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars -> Python, tuples -> lists, anything odd -> str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "size", 2) == 1:
        return item()
    return str(value)


# --------------------------------------------------------------------------------------------------
# loading and converting


def load_released_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    config_name: str = "",
    allow_numpy: bool = True,
    allow_unsafe_pickle: bool = False,
) -> ReleasedLoadReport:
    """Load a released ``.pth`` into a built :class:`~spotocc.models.OccupancyModel` (not on ``meta``),
    strictly: every released tensor fills exactly one spotocc tensor and every spotocc tensor is filled.

    The geometry buffers are checked against the model's own. Raises :class:`ReleasedCheckpointError`.
    """
    ckpt = read_released_checkpoint(path, allow_numpy=allow_numpy, allow_unsafe_pickle=allow_unsafe_pickle)
    conversion = convert_released_state_dict(ckpt.state_dict, model, config_name=config_name or None)
    model.load_state_dict(conversion.state, strict=True)
    return _report(ckpt, conversion, config_name or type(model).__name__)


def build_model_from_released(
    cfg: Config, path: str | os.PathLike, *, allow_numpy: bool = True, allow_unsafe_pickle: bool = False
) -> tuple[torch.nn.Module, ReleasedLoadReport]:
    """Build ``cfg``'s model (no pretrained backbone download/load) and load a released ``.pth`` into it."""
    from spotocc.models import build_model

    model = build_model(cfg, load_pretrained=False)
    report = load_released_checkpoint(
        model, path, config_name=cfg.name, allow_numpy=allow_numpy, allow_unsafe_pickle=allow_unsafe_pickle
    )
    return model, report


def convert_released_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Config,
    *,
    allow_numpy: bool = True,
    allow_unsafe_pickle: bool = False,
) -> ReleasedLoadReport:
    """Released ``.pth`` -> spotocc ``.safetensors`` with ``cfg`` embedded (all eval / predict need).

    The model is built on the ``meta`` device (names, shapes and dtypes only, no memory); the geometry
    buffers are checked against :func:`spotocc_geometry`. The file's metadata also records the source
    file name, its sha256 and the mmcv meta summary.
    """
    from spotocc.engine.checkpoint import save_weights_file
    from spotocc.models import build_model

    ckpt = read_released_checkpoint(path, allow_numpy=allow_numpy, allow_unsafe_pickle=allow_unsafe_pickle)
    with torch.device("meta"):
        skeleton = build_model(cfg, load_pretrained=False)
    conversion = convert_released_state_dict(
        ckpt.state_dict, skeleton, geometry=spotocc_geometry(cfg), config_name=cfg.name
    )
    report = _report(ckpt, conversion, cfg.name)
    metadata = {
        "spotocc_source": "released mmcv checkpoint",
        "released_file": ckpt.path.name,
        "released_sha256": _sha256(ckpt.path),
        "released_meta": json.dumps(report.meta),
    }
    embedded = copy.deepcopy(cfg)
    embedded.model.image_backbone.weights = None  # every weight is in the file
    save_weights_file(out, conversion.state, config=embedded.to_dict(), metadata=metadata)
    return report


def _report(ckpt: ReleasedCheckpoint, conversion: ReleasedConversion, config_name: str) -> ReleasedLoadReport:
    return ReleasedLoadReport(
        path=ckpt.path,
        config_name=config_name,
        num_tensors=len(ckpt.state_dict),
        conversion=conversion,
        meta=ckpt.meta_summary(),
        ignored=ckpt.ignored,
        stripped_prefix=ckpt.stripped_prefix,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def preset_hint(path: str | os.PathLike, **read_kwargs: bool) -> str | None:
    """The preset a released file looks like (for error messages), or None if it cannot be told."""
    try:
        return guess_released_preset(list(read_released_checkpoint(path, **read_kwargs).state_dict))
    except ReleasedCheckpointError:
        return None
