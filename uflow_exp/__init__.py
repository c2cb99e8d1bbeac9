"""U-Flow anomaly segmentation experiments."""
