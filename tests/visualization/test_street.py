import numpy as np

from spotocc.visualization.street import street_scene


def test_kitti_street_runs_along_x_and_leaves_the_ego_free():
    labels = street_scene((128, 128, 16), "semantickitti")  # 0.4 m voxels
    assert labels.shape == (128, 128, 16) and labels.dtype == np.uint8
    present = set(np.unique(labels).tolist())
    assert {0, 1, 9, 11, 13, 15, 17}.issubset(
        present
    )  # empty, car, road, sidewalk, building, vegetation, terrain
    # the road (9) is the ground along the x axis at y = 0 (column 64)
    ground = labels[:, 63:65].max(axis=2)
    assert (ground[20:60] == 9).mean() > 0.5
    assert (labels[:3, 62:66, 1:5] == 0).all()  # the ego vehicle's space at x = 0 is empty


def test_nuscenes_street_runs_along_y():
    labels = street_scene((128, 128, 10), "nuscenes")  # 0.8 m voxels
    road_columns = (labels == 11).any(axis=2)  # driveable_surface
    # along the forward axis (y) the road covers the centre column x = 64 almost everywhere
    assert road_columns[63:65, :].any(axis=0).mean() > 0.9
    assert {4, 15, 16}.issubset(set(np.unique(labels).tolist()))  # car, manmade, vegetation
