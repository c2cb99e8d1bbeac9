"""Lightning callbacks of the project."""

from uflow_exp.callbacks.epoch_log import EpochLog
from uflow_exp.callbacks.step_limit import ValidateAtStepLimit
from uflow_exp.callbacks.test_images import TestImageLogger
from uflow_exp.callbacks.train_timer import TrainLoopTimer

__all__ = ["EpochLog", "TestImageLogger", "TrainLoopTimer", "ValidateAtStepLimit"]
