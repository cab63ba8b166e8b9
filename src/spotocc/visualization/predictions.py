"""Reading the prediction files of ``spotocc predict``: one ``<sample_id>.npz`` per sample, key ``labels``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

PREDICTION_KEY = "labels"
PREDICTION_SUFFIXES = (".npz", ".npy")


def load_prediction(path: str | Path) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` labels from a ``.npz`` (key ``labels``) or a plain ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} does not exist")
    try:
        if path.suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as data:
                if PREDICTION_KEY not in data.files:
                    arrays = ", ".join(data.files) or "nothing"
                    raise ValueError(
                        f"prediction file {path} has no {PREDICTION_KEY!r} array (it has: {arrays})"
                    )
                labels = data[PREDICTION_KEY]
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"prediction file {path} is not a readable .npz/.npy file: {err}") from err
    if labels.ndim != 3:
        raise ValueError(f"prediction file {path}: labels must be [X, Y, Z], got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() > 255)
        ):
            raise ValueError(f"prediction file {path}: labels must be integers in 0..255, got {labels.dtype}")
        labels = labels.astype(np.uint8)
    return labels


def list_predictions(directory: str | Path) -> list[Path]:
    """The prediction files of a directory, sorted by name (KITTI ids ``SS_FFFFFF`` sort in time order)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"prediction directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in PREDICTION_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no prediction files (*.npz) in {directory}")
    return files
