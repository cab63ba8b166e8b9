import numpy as np
import pytest
import torch
from PIL import Image

from spotocc.data.transforms import normalize_image
from spotocc.visualization.colors import NUSCENES_OCC_COLORS, SEMANTIC_KITTI_COLORS
from spotocc.visualization.panel import render_prediction_panel, save_prediction_panel
from spotocc.visualization.render import SHADE

VIEW = (240, 150)
SHAPE = (16, 16, 8)
CAR, BUILDING = 1, 13  # SemanticKITTI ids


def _two_tone(height=48, width=160, left=(250, 40, 30), right=(20, 60, 230)):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = left
    image[:, width // 2 :] = right
    return image


def _kitti_sample(image, gt=None):
    sample = {
        "img": normalize_image(Image.fromarray(image), bgr_input=False)[None],  # [1, 3, H, W]
        "meta": {
            "sample_id": "08_000123",
            "dataset": "semantickitti",
            "image_paths": ["s/image_2/000123.png"],
        },
    }
    if gt is not None:
        sample["gt_occ"] = torch.from_numpy(gt)
    return sample


def _grid(label, lo=(5, 5, 1), hi=(9, 11, 4)):
    grid = np.zeros(SHAPE, dtype=np.uint8)
    grid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return grid


def _crop(image, region):
    top, left, height, width = region
    return image[top : top + height, left : left + width]


def _has_colour(pixels, rgb, factor):
    return (pixels.reshape(-1, 3) == np.round(np.asarray(rgb, float) * factor).astype(np.uint8)).all(1).any()


def test_panel_holds_camera_image_ground_truth_and_prediction():
    gt, pred = _grid(CAR), _grid(BUILDING)
    panel = render_prediction_panel(
        pred,
        class_set="semantickitti",
        sample=_kitti_sample(_two_tone(), gt),
        title="SPOT-Occ",
        view_size=VIEW,
    )
    image = panel.image
    assert set(panel.regions) == {"camera0", "gt_3d", "gt_bev", "pred_3d", "pred_bev", "legend"}
    for region in panel.regions.values():  # every part lies inside the picture, none overlap the others
        top, left, height, width = region
        assert top >= 0 and left >= 0 and top + height <= image.shape[0] and left + width <= image.shape[1]
    # camera: the left half is red, the right half blue (away from the caption and the seam)
    cam = _crop(image, panel.regions["camera0"])
    h, w = cam.shape[:2]
    np.testing.assert_allclose(cam[h // 2 :, w // 8 : w // 3].reshape(-1, 3).mean(0), (250, 40, 30), atol=2)
    np.testing.assert_allclose(cam[h // 2 :, 2 * w // 3 :].reshape(-1, 3).mean(0), (20, 60, 230), atol=2)
    car, building = SEMANTIC_KITTI_COLORS[CAR], SEMANTIC_KITTI_COLORS[BUILDING]
    gt_3d, pred_3d = _crop(image, panel.regions["gt_3d"]), _crop(image, panel.regions["pred_3d"])
    assert gt_3d.shape[:2] == (VIEW[1], VIEW[0])
    assert _has_colour(gt_3d, car, SHADE["+z"]) and not _has_colour(gt_3d, building, SHADE["+z"])
    assert _has_colour(pred_3d, building, SHADE["+z"]) and not _has_colour(pred_3d, car, SHADE["+z"])
    # BEV: 16 x 16 cells scaled 9x into a 150 px square; the block's top is at z index 3 of 8
    gt_bev, pred_bev = _crop(image, panel.regions["gt_bev"]), _crop(image, panel.regions["pred_bev"])
    assert gt_bev.shape[:2] == (144, 144)
    shade = 0.7 + 0.3 * np.sqrt(3 / 7)
    # grid x 5..8 -> rows (15 - 8 .. 15 - 5) * 9, grid y 5..10 -> columns (15 - 10 .. 15 - 5) * 9
    expected = np.round(car * shade).astype(np.uint8)
    np.testing.assert_array_equal(
        gt_bev[7 * 9 : 11 * 9, 5 * 9 : 11 * 9], np.broadcast_to(expected, (36, 54, 3))
    )
    assert _has_colour(pred_bev, building, shade)
    legend = _crop(image, panel.regions["legend"])
    assert _has_colour(legend, car, 1.0) and _has_colour(legend, building, 1.0)
    assert (image[:12] == 255).all()  # the top margin stays white; the title sits below it
    assert (image[16:40, 16:200] < 128).any()  # dark title text


def test_prediction_only_panel_has_no_camera_or_ground_truth():
    panel = render_prediction_panel(_grid(CAR), class_set="semantickitti", view_size=VIEW, sample_id="x")
    assert set(panel.regions) == {"pred_3d", "pred_bev", "legend"}


def test_nuscenes_images_are_shown_in_rgb_after_the_bgr_quirk():
    image = _two_tone(90, 160, left=(240, 200, 10), right=(10, 20, 200))
    img = torch.stack([normalize_image(Image.fromarray(image), bgr_input=True)] * 2)  # [2, 3, H, W]
    sample = {"img": img, "meta": {"dataset": "nuscenes-occupancy", "sample_id": "tok"}}
    pred = np.zeros((16, 16, 4), dtype=np.uint8)
    pred[4:8, 4:8, 1] = 4  # car
    panel = render_prediction_panel(pred, class_set="nuscenes", sample=sample, view_size=VIEW)
    for name in ("camera0", "camera1"):
        cam = _crop(panel.image, panel.regions[name])
        h, w = cam.shape[:2]
        np.testing.assert_allclose(
            cam[h // 2 :, w // 8 : w // 3].reshape(-1, 3).mean(0), (240, 200, 10), atol=2
        )
    assert _has_colour(_crop(panel.image, panel.regions["pred_3d"]), NUSCENES_OCC_COLORS[4], SHADE["+z"])


def test_save_prediction_panel_writes_a_png(tmp_path):
    gt = _grid(CAR)
    path = save_prediction_panel(
        tmp_path / "sub" / "p.png", _kitti_sample(_two_tone()), gt, _grid(BUILDING), "semantickitti",
        title="t", view_size=VIEW,
    )  # fmt: skip
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.width == 16 * 2 + VIEW[0] + 12 + VIEW[1]


def test_bad_panel_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="nothing to draw"):
        render_prediction_panel(None, class_set="semantickitti")
    with pytest.raises(ValueError, match="differs from prediction shape"):
        render_prediction_panel(_grid(CAR), gt=np.zeros((8, 8, 8), np.uint8), class_set="semantickitti")
    with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
        render_prediction_panel(np.zeros((4, 4), np.uint8), class_set="semantickitti")
