"""Command-line tools: data preparation and checks, visualisation, checkpoint conversion, info."""
