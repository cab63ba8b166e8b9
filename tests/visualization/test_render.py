import numpy as np
import pytest

from spotocc.visualization.colors import BACKGROUND, EGO_COLOR, SEMANTIC_KITTI_COLORS
from spotocc.visualization.render import (
    EDGE_SHADE,
    EGO_ID,
    ORIENTATIONS,
    SHADE,
    Camera,
    default_camera,
    rasterize_voxels,
    render_3d,
    scene_frame,
)

KITTI = scene_frame("semantickitti")  # range (0, -25.6, -2) .. (51.2, 25.6, 4.4)
SHAPE = (16, 16, 8)  # voxels of 3.2 x 3.2 x 0.8 m


def _voxel_box(index, shape=SHAPE, rng=KITTI.point_cloud_range):
    size = np.array([(rng[k + 3] - rng[k]) / shape[k] for k in range(3)])
    lo = np.array(rng[:3]) + np.asarray(index) * size
    return lo, lo + size


def _block():
    """A 2x2x2 block of cars (class 1) at voxels x 6..7, y 7..8, z 2..3."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[6:8, 7:9, 2:4] = 1
    return labels


def test_block_top_face_shows_its_colour_and_far_pixels_are_background():
    camera = default_camera(KITTI, width=320, height=200)
    r = rasterize_voxels(_block(), "semantickitti", camera=camera, ego=False)
    assert r.image.shape == (200, 320, 3) and r.image.dtype == np.uint8
    # centres of one voxel's faces (the block's centre lines are voxel edges, drawn darker)
    lo, hi = _voxel_box((6, 7, 3))
    top_centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])
    u, v, depth = camera.project(top_centre)
    row, col = int(v), int(u)
    car = SEMANTIC_KITTI_COLORS[1].astype(float)
    assert r.label[row, col] == 1
    assert ORIENTATIONS[r.orientation[row, col]] == "+z"
    np.testing.assert_array_equal(r.image[row, col], np.round(car * SHADE["+z"]).astype(np.uint8))
    assert r.depth[row, col] == pytest.approx(depth, rel=1e-2)
    # the rear face (normal -x, towards the camera behind the ego) is darker by its factor
    lo, hi = _voxel_box((6, 8, 2))
    rear_centre = np.array([lo[0], (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2])
    u, v, _ = camera.project(rear_centre)
    assert ORIENTATIONS[r.orientation[int(v), int(u)]] == "-x"
    np.testing.assert_array_equal(r.image[int(v), int(u)], np.round(car * SHADE["-x"]).astype(np.uint8))
    # the line between two voxels of the top is drawn as an outline, EDGE_SHADE darker
    _, hi = _voxel_box((6, 7, 3))
    u, v, _ = camera.project(np.array([hi[0], (lo[1] + hi[1]) / 2, hi[2]]))
    outline = np.round(car * SHADE["+z"] * EDGE_SHADE).astype(np.uint8)
    np.testing.assert_array_equal(r.image[int(v), int(u)], outline)
    # far from the block: background
    for row, col in ((0, 0), (199, 319), (5, 160), (100, 10)):
        assert r.label[row, col] == -1
        np.testing.assert_array_equal(r.image[row, col], BACKGROUND)
    assert (r.label >= 0).sum() > 100  # the block covers a visible area


def test_empty_grid_renders_background_and_ego_marker():
    camera = default_camera(KITTI, width=200, height=120)
    empty = np.zeros(SHAPE, dtype=np.uint8)
    r = rasterize_voxels(empty, "semantickitti", camera=camera, ego=False)
    assert (r.image == BACKGROUND).all() and (r.label == -1).all()
    r = rasterize_voxels(empty, "semantickitti", camera=camera, ego=True)
    assert set(np.unique(r.label)) == {-1, EGO_ID}
    u, v, _ = camera.project(np.array(KITTI.ego_center) + [0, 0, KITTI.ego_size[2] / 2])
    np.testing.assert_array_equal(r.image[int(v), int(u)], np.round(EGO_COLOR * SHADE["+z"]).astype(np.uint8))


def test_ignore_voxels_are_drawn_only_when_asked():
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:10, 4:12, 1] = 255
    camera = default_camera(KITTI, width=160, height=100)
    assert (rasterize_voxels(labels, "semantickitti", camera=camera, ego=False).label == -1).all()
    shown = rasterize_voxels(labels, "semantickitti", camera=camera, ego=False, show_ignore=True)
    assert (shown.label == 255).sum() > 50


def test_nearer_block_hides_the_one_behind():
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3, 7:9, 0:6] = 13  # building wall close to the camera
    labels[10, 7:9, 0:2] = 1  # a low car behind it
    camera = Camera.look_at((-10.0, 0.0, 0.5), (40.0, 0.0, 0.5), width=120, height=80, focal=200.0)
    r = rasterize_voxels(labels, "semantickitti", camera=camera, ego=False)
    assert (r.label == 13).sum() > 0 and (r.label == 1).sum() == 0


def _brute_force(labels, camera, rng):
    """Per pixel, the label of the first voxel its ray enters (slab test against every voxel)."""
    occupied = np.argwhere((labels > 0) & (labels < 20))  # [V, 3]
    shape = labels.shape
    size = np.array([(rng[k + 3] - rng[k]) / shape[k] for k in range(3)])
    lo = np.array(rng[:3]) + occupied * size  # [V, 3]
    hi = lo + size
    rows, cols = np.divmod(np.arange(camera.width * camera.height), camera.width)
    d = np.stack(camera.ray_directions(cols.astype(float), rows.astype(float)), axis=1)  # [P, 3]
    eye = np.asarray(camera.eye)
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo[None] - eye) / d[:, None]  # [P, V, 3]
        t1 = (hi[None] - eye) / d[:, None]
    t_near = np.nanmax(np.minimum(t0, t1), axis=2)
    t_far = np.nanmin(np.maximum(t0, t1), axis=2)
    hit = (t_near <= t_far) & (t_far > 0)
    t_near = np.where(hit, t_near, np.inf)
    first = np.argmin(t_near, axis=1)
    depth = t_near[np.arange(len(first)), first]
    label = np.where(np.isfinite(depth), labels[tuple(occupied[first].T)].astype(np.int64), -1)
    return label.reshape(camera.height, camera.width), depth.reshape(camera.height, camera.width)


@pytest.mark.parametrize(
    "eye",
    [
        None,  # the default view from behind and above
        (70.0, 35.0, 25.0),  # front-left, above: +x, +y, +z faces
        (20.0, -45.0, -25.0),  # right, below: -y, -z faces
    ],
)
def test_rasteriser_matches_brute_force_ray_casting(eye):
    rng = np.random.default_rng(0)
    shape = (10, 9, 5)
    labels = np.where(rng.random(shape) < 0.3, rng.integers(1, 20, shape), 0).astype(np.uint8)
    frame = scene_frame("semantickitti")
    if eye is None:
        camera = default_camera(frame, width=96, height=64)
    else:
        corners = np.array(np.meshgrid(*[frame.point_cloud_range[k::3] for k in range(3)])).reshape(3, -1).T
        camera = Camera.look_at(eye, (25.6, 0.0, 1.2), width=96, height=64, focal=1.0).fitted(corners)
    r = rasterize_voxels(labels, "semantickitti", camera=camera, ego=False)
    expected_label, expected_depth = _brute_force(labels, camera, frame.point_cloud_range)
    agree = r.label == expected_label
    # rays through a shared voxel edge may pick either voxel: allow a handful of such pixels
    assert (~agree).sum() <= 3, (~agree).sum()
    hit = agree & (expected_label >= 0)
    assert hit.sum() > 500
    np.testing.assert_allclose(r.depth[hit], expected_depth[hit], rtol=1e-5)


def test_render_3d_returns_the_image_and_checks_its_input():
    camera = default_camera(KITTI, width=64, height=40)
    image = render_3d(_block(), "semantickitti", camera=camera)
    assert image.shape == (40, 64, 3)
    with pytest.raises(ValueError, match="label grid"):
        render_3d(np.zeros((4, 4), np.uint8), "semantickitti")
    with pytest.raises(ValueError, match="0..255"):
        render_3d(np.full((2, 2, 2), 300), "semantickitti")


def test_default_camera_sees_the_whole_range_for_both_benchmarks():
    for class_set in ("semantickitti", "nuscenes"):
        frame = scene_frame(class_set)
        camera = default_camera(frame, width=400, height=260)
        rng = frame.point_cloud_range
        ground = frame.ego_center[2] - frame.ego_size[2] / 2
        corners = np.array([[x, y, z] for x in rng[0::3] for y in rng[1::3] for z in (ground, rng[5])])
        u, v, depth = camera.project(corners)
        assert (depth > 0).all()
        assert (u >= 0).all() and (u <= 400).all() and (v >= 0).all() and (v <= 260).all()
        # the ego is seen from behind: the camera is behind it along the forward axis and above
        f = frame.forward_axis
        assert camera.eye[f] < frame.ego_center[f] and camera.eye[2] > rng[5]


def test_scene_frame_conventions():
    kitti, nusc = scene_frame("semantickitti"), scene_frame("nuscenes")
    assert kitti.forward == "+x" and nusc.forward == "+y"
    assert kitti.point_cloud_range == (0.0, -25.6, -2.0, 51.2, 25.6, 4.4)
    assert nusc.point_cloud_range == (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    with pytest.raises(ValueError, match="point_cloud_range"):
        scene_frame("nuscenes", (0, 0, 0, -1, 1, 1))


def test_zoom_frames_the_area_around_the_ego():
    frame = scene_frame("nuscenes")
    camera = default_camera(frame, width=400, height=260, zoom=2.0)
    ground = frame.ego_center[2] - frame.ego_size[2] / 2
    near = np.array([[x, y, ground] for x in (-25.6, 25.6) for y in (-25.6, 25.6)])  # the range / 2
    u, v, _ = camera.project(near)
    assert (u >= 0).all() and (u <= 400).all() and (v >= 0).all() and (v <= 260).all()
    sides = np.array([[x, 0.0, ground] for x in (-51.2, 51.2)])  # the whole range's sides beside the ego
    u, _, _ = camera.project(sides)
    assert u[0] < 0 and u[1] > 400
    with pytest.raises(ValueError, match="zoom"):
        default_camera(frame, zoom=0)


def test_supersampling_keeps_face_colours_and_smooths_silhouettes():
    camera = default_camera(KITTI, width=160, height=100)
    point = np.array([[10.0, 3.0, 1.0]])
    u1, v1, _ = camera.project(point)
    u2, v2, _ = camera.scaled(2).project(point)
    np.testing.assert_allclose((u2, v2), (2 * u1, 2 * v1))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:13, 3:13, 0] = 9  # a flat 10 x 10 road slab: one colour seen from above
    sharp = render_3d(labels, "semantickitti", camera=camera, ego=False, edges=False)
    smooth = render_3d(labels, "semantickitti", camera=camera, ego=False, edges=False, supersample=2)
    assert smooth.shape == sharp.shape
    road = np.round(SEMANTIC_KITTI_COLORS[9] * SHADE["+z"]).astype(np.uint8)
    inside = (sharp == road).all(-1)
    interior = (
        inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    )
    assert interior.sum() > 100
    np.testing.assert_array_equal(smooth[1:-1, 1:-1][interior], sharp[1:-1, 1:-1][interior])
    palette = {
        tuple(road),
        tuple(BACKGROUND),
        tuple(np.round(SEMANTIC_KITTI_COLORS[9] * SHADE["-x"]).astype(int)),
    }
    blended = [tuple(p) for p in smooth.reshape(-1, 3).tolist() if tuple(p) not in palette]
    assert len(blended) > 10  # silhouette pixels mix the slab and the background
    with pytest.raises(ValueError, match="supersample"):
        render_3d(labels, "semantickitti", camera=camera, supersample=0)
