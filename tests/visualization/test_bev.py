import numpy as np
import pytest

from spotocc.visualization.colors import BACKGROUND, EGO_COLOR, NUSCENES_OCC_COLORS, SEMANTIC_KITTI_COLORS
from spotocc.visualization.render import (
    BEV_SHADE_LOW,
    bev_ego_box,
    bev_height_shade,
    bev_image,
    draw_bev_ego,
    scene_frame,
)


def _grid():
    """X=4, Y=3, Z=5 with hand-placed columns: (x, y) -> list of (z, label)."""
    labels = np.zeros((4, 3, 5), dtype=np.uint8)
    labels[0, 0, 0] = 9  # road at the bottom
    labels[0, 0, 3] = 1  # car above it: the top one is shown
    labels[1, 2, 4] = 13  # building at the top
    labels[2, 1, 1] = 255  # ignore only
    labels[2, 1, 0] = 17  # terrain below the ignored voxel
    labels[3, 0, 2] = 255  # ignore only
    return labels


# expected top (label, z) per (x, y) column, written out by hand; without ignore shown
TOPS = {(0, 0): (1, 3), (1, 2): (13, 4), (2, 1): (17, 0)}
TOPS_WITH_IGNORE = {(0, 0): (1, 3), (1, 2): (13, 4), (2, 1): (255, 1), (3, 0): (255, 2)}


def _expected(tops, palette, forward, shading, z=5):
    nx, ny = 4, 3
    rows, cols = (nx, ny) if forward == "+x" else (ny, nx)
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    for r in range(rows):
        for c in range(cols):
            x, y = (nx - 1 - r, ny - 1 - c) if forward == "+x" else (c, ny - 1 - r)
            if (x, y) in tops:
                label, k = tops[(x, y)]
                color = palette[label].astype(float)
                factor = BEV_SHADE_LOW + (1 - BEV_SHADE_LOW) * np.sqrt(k / (z - 1)) if shading else 1.0
                out[r, c] = np.round(color * factor).astype(np.uint8)
    return out


def _palette(base):
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(base)] = base
    table[255] = (200, 200, 200)
    return table


@pytest.mark.parametrize("forward", ["+x", "+y"])
@pytest.mark.parametrize("shading", [False, True])
def test_bev_is_exact_per_pixel(forward, shading):
    got = bev_image(_grid(), "semantickitti", forward=forward, height_shading=shading)
    np.testing.assert_array_equal(got, _expected(TOPS, _palette(SEMANTIC_KITTI_COLORS), forward, shading))


def test_bev_shows_ignore_on_request_and_scales():
    got = bev_image(_grid(), "semantickitti", show_ignore=True, height_shading=False, scale=3)
    expected = _expected(TOPS_WITH_IGNORE, _palette(SEMANTIC_KITTI_COLORS), "+x", False)
    np.testing.assert_array_equal(got, expected.repeat(3, axis=0).repeat(3, axis=1))


def test_bev_uses_the_class_set_palette():
    labels = np.zeros((2, 2, 2), dtype=np.uint8)
    labels[1, 1, 1] = 4  # nuScenes car
    got = bev_image(labels, "nuscenes", forward="+y", height_shading=False)
    # forward +y: row 0 is y = 1, column 1 is x = 1
    np.testing.assert_array_equal(got[0, 1], NUSCENES_OCC_COLORS[4])
    assert (got[1, :] == BACKGROUND).all() and (got[0, 0] == BACKGROUND).all()


def test_height_shade_bounds():
    assert bev_height_shade(0, 32) == pytest.approx(BEV_SHADE_LOW)
    assert bev_height_shade(31, 32) == pytest.approx(1.0)


def test_ego_marker_sits_where_the_ego_is():
    kitti = scene_frame("semantickitti")  # ego at x = 0 (bottom edge), y = 0 (middle)
    r0, c0, r1, c1 = bev_ego_box(kitti, (256, 256, 32))
    # x in [-2.1, 2.1] m -> rows 256 - 10.5 .. 256 + 10.5; y in [-0.9, 0.9] m -> columns 123.5 .. 132.5
    assert (r0, r1) == (245, 266) and (c0, c1) == (123, 132)
    image = np.full((256, 256, 3), 255, dtype=np.uint8)
    marked = draw_bev_ego(image, kitti, (256, 256, 32))
    assert (marked[250, 128] == EGO_COLOR).all() and (marked[200, 128] == 255).all()
    nusc = scene_frame("nuscenes")  # ego at the centre, forward +y: long side vertical
    r0, c0, r1, c1 = bev_ego_box(nusc, (512, 512, 40))
    assert r1 - r0 > c1 - c0 and r0 < 256 < r1 and c0 < 256 < c1
