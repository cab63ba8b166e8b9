"""``spotocc info``: parameter counts per module against the released runs' totals."""

from __future__ import annotations

import pytest

from spotocc import cli
from spotocc.config import get_config
from spotocc.models.summary import build_meta_model, format_count, parameter_counts

# spec/released-parameters README: per released module, and the whole model (geometry included)
RELEASED_TOTALS = {
    "spotocc_nusc_256": ((23_508_032, 1_967_104, 28_078_913, 42_153_984, 1_330_176, 8_168_274), 105_206_483),
    "spotocc_kitti": ((63_786_960, 1_807_616, 44_077_773, 42_153_984, 1_035_264, 8_169_429), 161_031_026),
    "sparseocc_nusc_256": (
        (23_508_032, 1_967_104, 28_078_913, 42_153_984, 1_330_176, 8_176_931),
        105_215_140,
    ),
    "sparseocc_kitti": ((63_786_960, 1_807_616, 44_077_773, 42_153_984, 1_035_264, 8_177_801), 161_039_398),
}
MODULES = ("image_backbone", "image_neck", "view_transformer", "voxel_encoder", "voxel_neck", "head")


@pytest.mark.parametrize("preset", list(RELEASED_TOTALS))
def test_counts_equal_the_released_totals(preset):
    per_module, total = RELEASED_TOTALS[preset]
    counts = parameter_counts(build_meta_model(get_config(preset)))
    assert [c.name for c in counts] == list(MODULES)
    assert [c.released_count for c in counts] == list(per_module)
    assert sum(c.released_count for c in counts) == total
    # the geometry buffers are the only difference: 9 grid values + the frustum [112, fH, fW, 3]
    frustum = 112 * 3 * (16 * 44 if "nusc" in preset else 24 * 80)
    assert [c.geometry for c in counts] == [0, 0, 9 + frustum, 0, 0, 0]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (8_168_274, "8.2M"),
        (19_200, "19.2K"),
        (576, "0.6K"),
        (192, "0.2K"),
        (100, "100"),
        (105_206_483, "0.1G"),
        (161_031_026, "0.2G"),
        (111_168, "0.1M"),
        (3_474, "3.5K"),
        (20_660, "20.7K"),
    ],
)
def test_rounding_matches_the_released_logs(n, text):
    """Entries of the released logs' parameter tables (spec 03 section 6.1)."""
    assert format_count(n) == text


def test_info_command_prints_config_and_both_totals(capsys):
    assert cli.main(["info", "spotocc_nusc_256", "head.pruning_ratio=0.1"]) == 0
    out = capsys.readouterr().out
    assert "spotocc_nusc_256: SPOT-Occ head" in out and "rho 0.1," in out
    assert "input 256x704, 6 cameras" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "8,168,274" in lines["head"] and "8.2M" in lines["head"] and "pts_bbox_head" in lines["head"]
    assert "27,842,360" in lines["view_transformer"]
    assert "28,078,913" in lines["+"] and "28.1M" in lines["+"]
    total, released_total = out.splitlines()[-2:]
    assert total.startswith("total ") and "104,969,930" in total
    assert released_total.startswith("total as released") and "105,206,483" in released_total
    assert "0.1G" in released_total


def test_info_full_config_is_json(capsys):
    assert cli.main(["info", "sparseocc_kitti", "--full-config"]) == 0
    out = capsys.readouterr().out
    assert '"type": "sparseocc"' in out and "1280, 1 camera\n" in out
