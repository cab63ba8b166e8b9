"""Checks of a configuration and dataset that need no trained weights (``spotocc diagnose``)."""

from spotocc.diagnostics.coverage import CoverageCounts, CoverageProbe, format_coverage, measure_coverage

__all__ = ["CoverageCounts", "CoverageProbe", "format_coverage", "measure_coverage"]
