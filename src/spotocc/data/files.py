"""Reading dataset files with clear errors, shared by the readers and ``spotocc check-data``.

Every function here either returns the file's content or raises :class:`DataFileError` naming the
file and what is wrong with it (missing, truncated, wrong size, not decodable). The readers call
these functions for every file they touch, and ``check-data`` calls the same functions to report
every problem of a dataset at once, so both say the same thing about the same file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from spotocc.data.safe_pickle import RestrictedUnpickler
from spotocc.errors import SpotoccError


class DataFileError(SpotoccError, ValueError):
    """A dataset file is missing, truncated, of the wrong size or not readable.

    ``message=`` alone is a DataLoader worker's re-raise (see :class:`~spotocc.errors.SpotoccError`).
    """

    def __init__(self, path: str | Path = "", problem: str = "", *, message: str | None = None) -> None:
        if message is not None:
            super().__init__(message=message)
            self.path, self.problem = "", str(self)
            return
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingFileError(DataFileError, FileNotFoundError):
    """A dataset file does not exist (also a :class:`FileNotFoundError`)."""

    def __init__(
        self, path: str | Path = "", problem: str = "file is missing", *, message: str | None = None
    ) -> None:
        super().__init__(path, problem, message=message)


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a :class:`Path`, or :class:`MissingFileError` if it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, f"{what} is missing" if not path.exists() else f"{what} is not a file")
    return path


def check_binary_size(
    path: str | Path, dtype: Any, *, what: str, count: int | None = None, row: int = 1
) -> Path:
    """Check a raw binary file's size without reading it (see :func:`read_binary`); returns its path."""
    path = require_file(path, what)
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if count is not None:
        if size != count * itemsize:
            raise DataFileError(
                path,
                f"{what} has {size} bytes, expected {count * itemsize} ({count} values of {np.dtype(dtype)})"
                + (" (truncated)" if size < count * itemsize else ""),
            )
    elif size % (row * itemsize) != 0:
        raise DataFileError(
            path, f"{what} has {size} bytes, not a whole number of {row}-value {np.dtype(dtype)} rows"
        )
    return path


def read_binary(
    path: str | Path, dtype: Any, *, what: str, count: int | None = None, row: int = 1
) -> np.ndarray:
    """A flat array of ``dtype`` from a raw binary file.

    ``count``: the exact number of values the file must hold (else "wrong size"); otherwise the file
    must hold a whole number of rows of ``row`` values.
    """
    path = check_binary_size(path, dtype, what=what, count=count, row=row)
    try:
        return np.fromfile(path, dtype=dtype)
    except OSError as err:
        raise DataFileError(path, f"cannot read {what}: {err}") from err


def read_image(path: str | Path) -> Image.Image:
    """A fully decoded RGB image; a missing or undecodable file raises :class:`DataFileError`."""
    path = require_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataFileError(path, f"image does not decode: {err}") from err


def probe_image(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image after a cheap integrity check (header and, for PNG, checksums).

    Faster than :func:`read_image` but it does not decode the pixels, so some truncated files pass.
    """
    path = require_file(path, "image")
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataFileError(path, f"image does not decode: {err}") from err


def load_npy(path: str | Path, what: str, *, header_only: bool = False) -> np.ndarray:
    """A ``.npy`` array (no pickled objects allowed); ``header_only`` maps it without reading the data."""
    path = require_file(path, what)
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if header_only else None)
    except (ValueError, OSError, EOFError) as err:
        raise DataFileError(path, f"{what} is not a readable .npy array: {err}") from err


def check_matrix(value: Any, shape: tuple[int, ...], where: str, path: str | Path) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape``, else a DataFileError naming ``path``, ``where``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataFileError(path, f"{where} is not numeric: {err}") from err
    if array.shape != shape:
        raise DataFileError(path, f"{where} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise DataFileError(path, f"{where} holds non-finite values")
    return array


# --------------------------------------------------------------------------------------------------
# Restricted unpickling (info files)


def load_restricted_pickle(path: str | Path, what: str = "pickle") -> Any:
    """Unpickle a file that may hold only plain data: containers, strings, numbers, bytes, sets and
    numpy arrays, scalars and dtypes, of any pickle protocol (0-5), numpy 1.x or 2.x names.

    Anything else (a class instance, a function reference) raises :class:`DataFileError` without being
    constructed, so a tampered info file cannot run code (see :mod:`spotocc.data.safe_pickle`).
    """
    path = require_file(path, what)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise DataFileError(path, f"{what} is not a plain pickle: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DataFileError(path, f"{what} is not a readable pickle (truncated?): {err!r}") from err
