"""Fixtures of the data tests: the hand-made tiny-dataset writers of ``tiny_data.py``."""

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "spotocc_tests_tiny_data"


def load_tiny_data():
    """The ``tests/data/tiny_data.py`` module (tests are not a package under importlib import mode)."""
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("tiny_data.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


@pytest.fixture(scope="session")
def tiny():
    return load_tiny_data()
