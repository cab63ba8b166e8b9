"""Headless pictures of occupancy: 3D voxel renders, bird's-eye views, sample panels, animations, charts.

Everything draws with numpy, PIL and matplotlib's Agg canvas: no display, no OpenGL, no mayavi.
"""

from spotocc.visualization.animation import save_animation, save_prediction_animation
from spotocc.visualization.charts import (
    EvalResult,
    class_iou_chart,
    comparison_chart,
    load_eval_json,
    save_figure,
)
from spotocc.visualization.colors import class_colors, label_lut
from spotocc.visualization.panel import Panel, render_prediction_panel, save_prediction_panel
from spotocc.visualization.predictions import list_predictions, load_prediction
from spotocc.visualization.render import (
    Camera,
    SceneFrame,
    bev_image,
    default_camera,
    rasterize_voxels,
    render_3d,
    scene_frame,
)
from spotocc.visualization.street import street_scene

__all__ = [
    "Camera",
    "EvalResult",
    "Panel",
    "SceneFrame",
    "bev_image",
    "class_colors",
    "class_iou_chart",
    "comparison_chart",
    "default_camera",
    "label_lut",
    "list_predictions",
    "load_eval_json",
    "load_prediction",
    "rasterize_voxels",
    "render_3d",
    "render_prediction_panel",
    "save_animation",
    "save_figure",
    "save_prediction_animation",
    "save_prediction_panel",
    "scene_frame",
    "street_scene",
]
