"""What a plain-data pickle may reference, and an unpickler that allows exactly that.

Plain data is containers, strings, numbers, bytes, sets, complex numbers and numpy arrays, scalars
and dtypes. Pickle protocols 0 to 5 reach some of these through globals (``__builtin__.set``,
``_codecs.encode`` for bytes at protocols 0-2, ``numpy.core.multiarray._reconstruct`` ...); every
other global is refused before anything is constructed, so a tampered file cannot run code.

Globals are resolved from a fixed table, never by importing the module the stream names: a numpy
1.x name (``numpy.core.*``) maps to the installed numpy's object (``numpy._core.*`` under numpy 2).
"""

from __future__ import annotations

import codecs
import collections
import importlib
import pickle
from typing import Any

import numpy as np

# the builtins reached by globals: containers (set, frozenset), bytes, bytearray and complex numbers;
# protocols 0-2 spell the module "__builtin__", protocols 3-5 "builtins"
_BUILTINS = {"set": set, "frozenset": frozenset, "bytes": bytes, "bytearray": bytearray, "complex": complex}

# numpy functions array and scalar pickles reduce to: (submodule of numpy.core / numpy._core, name)
_NUMPY_FUNCTIONS = (
    ("multiarray", "_reconstruct"),  # arrays, protocols 0-4
    ("multiarray", "scalar"),  # numpy scalars
    ("numeric", "_frombuffer"),  # arrays, protocol 5
)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it for bytes (``encode(text, 'latin1')``), and no other way."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy_core(submodule: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{submodule}")  # numpy >= 2
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{submodule}")


def numpy_globals() -> dict[tuple[str, str], Any]:
    """``(module, name) -> object`` for numpy arrays, scalars and dtypes, under numpy 1.x and 2.x names."""
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for submodule, name in _NUMPY_FUNCTIONS:
        obj = getattr(_numpy_core(submodule), name)
        for package in ("numpy.core", "numpy._core"):
            table[(f"{package}.{submodule}", name)] = obj
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 names each dtype's class here
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            table[("numpy.dtypes", name)] = obj
    return table


def plain_globals() -> dict[tuple[str, str], Any]:
    """Every global a plain-data pickle may reference, as ``(module, name) -> object``."""
    table: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    table.update({(m, n): obj for m in ("builtins", "__builtin__") for n, obj in _BUILTINS.items()})
    table[("_codecs", "encode")] = _latin1_encode
    table.update(numpy_globals())
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`plain_globals` and refuses every other global."""

    _allowed = plain_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only plain containers and numpy arrays are allowed"
            ) from None
