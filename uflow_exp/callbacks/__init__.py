"""Lightning callbacks of the project."""

from uflow_exp.callbacks.test_images import TestImageLogger

__all__ = ["TestImageLogger"]
