"""SSC metrics."""

from spotocc.evaluation.ssc import SSCMetrics, format_ssc_table, metric_prefix, with_prefix

__all__ = ["SSCMetrics", "format_ssc_table", "metric_prefix", "with_prefix"]
