"""Tasks: instantiate from a config, run, return the metrics."""
