"""Evaluation metrics for anomaly segmentation, as torchmetrics ``Metric`` objects with bounded memory."""

from uflow_exp.metrics.anomaly import AnomalyMetrics
from uflow_exp.metrics.image import ImageAUROC
from uflow_exp.metrics.pixel import BestMIoU, PixelAUPRO, PixelAUROC
from uflow_exp.metrics.segmentation import SegmentationMIoU

__all__ = ["AnomalyMetrics", "BestMIoU", "ImageAUROC", "PixelAUPRO", "PixelAUROC", "SegmentationMIoU"]
