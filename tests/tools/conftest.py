"""Fixtures of the tool tests: the hand-made tiny-dataset writers of ``tests/data/tiny_data.py``."""

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "spotocc_tests_tiny_data"


@pytest.fixture(scope="session")
def tiny():
    if _NAME not in sys.modules:
        path = Path(__file__).parents[1] / "data" / "tiny_data.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]
