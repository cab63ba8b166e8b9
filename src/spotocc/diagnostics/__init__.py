"""Checks of a configuration, a dataset or a trained checkpoint (``spotocc diagnose``)."""

from spotocc.diagnostics.coverage import CoverageCounts, CoverageProbe, format_coverage, measure_coverage
from spotocc.diagnostics.depth import DepthAccuracy, format_depth_accuracy, measure_depth_accuracy

__all__ = [
    "CoverageCounts",
    "CoverageProbe",
    "DepthAccuracy",
    "format_coverage",
    "format_depth_accuracy",
    "measure_coverage",
    "measure_depth_accuracy",
]
