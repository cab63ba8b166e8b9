import numpy as np
import pytest

from spotocc.data.classes import NUSCENES_OCC_CLASSES, SEMANTIC_KITTI_CLASSES
from spotocc.visualization.colors import (
    IGNORE_COLOR,
    NUSCENES_OCC_COLORS,
    SEMANTIC_KITTI_COLORS,
    class_colors,
    classes_present,
    label_lut,
)


def test_palettes_cover_every_class():
    assert SEMANTIC_KITTI_COLORS.shape == (len(SEMANTIC_KITTI_CLASSES), 3)
    assert NUSCENES_OCC_COLORS.shape == (len(NUSCENES_OCC_CLASSES), 3)
    assert SEMANTIC_KITTI_COLORS.dtype == NUSCENES_OCC_COLORS.dtype == np.uint8


def test_semantic_kitti_colours_are_the_yaml_bgr_reversed():
    # semantic-kitti.yaml color_map (B, G, R): car 10 -> [245, 150, 100], road 40 -> [255, 0, 255],
    # building 50 -> [0, 200, 255], vegetation 70 -> [0, 175, 0], trunk 71 -> [0, 60, 135]
    colors = dict(zip(SEMANTIC_KITTI_CLASSES, map(tuple, SEMANTIC_KITTI_COLORS.tolist())))
    assert colors["car"] == (100, 150, 245)
    assert colors["road"] == (255, 0, 255)
    assert colors["building"] == (255, 200, 0)
    assert colors["vegetation"] == (0, 175, 0)
    assert colors["trunk"] == (135, 60, 0)
    assert colors["person"] == (255, 30, 30)
    assert colors["traffic-sign"] == (255, 0, 0)


def test_nuscenes_colours_follow_the_openoccupancy_palette():
    colors = dict(zip(NUSCENES_OCC_CLASSES, map(tuple, NUSCENES_OCC_COLORS.tolist())))
    assert colors["car"] == (0, 150, 245)
    assert colors["driveable_surface"] == (255, 0, 255)
    assert colors["vegetation"] == (0, 175, 0)
    assert colors["pedestrian"] == (255, 0, 0)


def test_label_lut_draws_classes_but_not_empty_and_ignore_only_on_request():
    colors, drawn = label_lut("nuscenes")
    assert colors.shape == (256, 3) and drawn.shape == (256,)
    assert not drawn[0] and drawn[1:17].all() and not drawn[17:].any()
    _, drawn = label_lut("nuscenes", show_ignore=True)
    assert drawn[255] and not drawn[0]
    assert (colors[255] == IGNORE_COLOR).all()
    assert (class_colors("semantickitti") == SEMANTIC_KITTI_COLORS).all()


def test_classes_present_skips_empty_and_ignore():
    labels = np.array([[[0, 3, 255], [3, 19, 0]]], dtype=np.uint8)
    assert classes_present(labels, "semantickitti") == [3, 19]
    assert classes_present(labels, "nuscenes") == [3]  # 19 is no nuScenes class


def test_unknown_class_set_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown class set"):
        class_colors("waymo")
