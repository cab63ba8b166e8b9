"""SSC metrics."""
