"""Fixtures of the command tests: the hand-made tiny-dataset writers of ``tests/data/tiny_data.py``."""

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


@pytest.fixture(scope="session")
def generated_scenes(tmp_path_factory):
    """A factory: (synthetic_tiny overrides, folder name[, num_train]) -> (config, root, scenes): generated
    SemanticKITTI-layout training scenes (two by default) at the config's sizes, read without
    augmentation."""
    from spotocc.config import apply_overrides, get_config
    from spotocc.data import build_dataset
    from spotocc.data.synthetic import generate, source_image_size
    from spotocc.diagnostics.memorise import without_augmentation

    def make(overrides, name, num_train=2):
        cfg = get_config("synthetic_tiny", overrides)
        root = tmp_path_factory.mktemp(name)
        generate(root, "semantickitti", num_train=num_train, num_val=0, seed=3, grid=cfg.grid,
                 image_size=source_image_size(cfg.data), lidar_azimuth_steps=128)  # fmt: skip
        cfg = apply_overrides(cfg, [f"data.root={root}"])
        dataset = build_dataset(without_augmentation(cfg), "train", train=True)
        return cfg, root, [dataset[i] for i in range(len(dataset))]

    return make
