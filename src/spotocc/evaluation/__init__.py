"""SSC metrics, and the Occ3D-nuScenes metrics (camera-mask mIoU, RayIoU)."""

from spotocc.evaluation.occ3d import OCC3D_CLASS_NAMES, Occ3DMetrics
from spotocc.evaluation.ray_iou import RayIoU, lidar_origins_in_ego, select_ray_origins
from spotocc.evaluation.ssc import SSCMetrics, format_ssc_table, metric_prefix, with_prefix

__all__ = [
    "OCC3D_CLASS_NAMES",
    "Occ3DMetrics",
    "RayIoU",
    "SSCMetrics",
    "format_ssc_table",
    "lidar_origins_in_ego",
    "metric_prefix",
    "select_ray_origins",
    "with_prefix",
]
