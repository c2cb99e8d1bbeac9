"""One object that accumulates every evaluation metric of a test run."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryF1Score, BinaryStatScores

from uflow_exp.metrics.image import ImageAUROC, best_recall
from uflow_exp.metrics.pixel import DEFAULT_N_BINS, DEFAULT_WARN_BOUND, BestMIoU, PixelAUPRO, PixelAUROC
from uflow_exp.metrics.segmentation import SegmentationMIoU


class AnomalyMetrics(nn.Module):
    """Image AUROC, pixel AUROC, pixel AUPRO@0.3, best single-threshold mIoU and, given segmentations,
    mIoU, pixel F1 and the operating point of "any pixel detected" as an image decision: its false-alarm
    rate on normal images with its 95 % (Clopper-Pearson) interval, its precision and recall on
    anomalous ones, the best recall any image-score threshold reaches with as few false alarms (an
    oracle: it reads the test labels), and the mIoU over anomalous images alone.

    Inputs per batch: ``anomaly_map`` (B, 1, H, W) float in [0, 1], ``gt_mask`` (B, 1, H, W) bool or 0/1 at
    the same size, ``labels`` (B,) 1 for anomalous images, optionally ``has_mask`` (B,) bool (False for an
    anomalous image whose pixels are unlabelled; default: all True) and ``segmentation`` (B, 1, H, W)
    bool. Either every batch of a run comes with a segmentation or none does. Image AUROC uses every
    image and its label; the pixel metrics use the images with pixel truth, and are left out of
    ``compute`` when the anomalous images came without masks (image-level labels only). Memory is
    bounded by ``n_bins`` except for two numbers per image kept by the exact image AUROC. See
    ``PixelAUROC`` and ``PixelAUPRO`` for the binning error bounds.

    Each member is a torchmetrics ``Metric`` whose states reduce by sum or concatenation, so under DDP
    ``compute()`` (called on every rank) syncs them and returns what a single process would.
    Metrics undefined for the data (AUROC or AUPRO without both classes) come back as NaN with a warning.
    """

    def __init__(
        self,
        n_bins: int = DEFAULT_N_BINS,
        max_fpr: float = 0.3,
        warn_bound: float = DEFAULT_WARN_BOUND,
    ) -> None:
        super().__init__()
        self.image_auroc = ImageAUROC()
        self.pixel_auroc = PixelAUROC(n_bins, warn_bound=warn_bound)
        self.pixel_aupro = PixelAUPRO(n_bins, max_fpr=max_fpr, warn_bound=warn_bound)
        self.best_miou = BestMIoU(n_bins)
        self.miou = SegmentationMIoU()
        # F1 = 2TP / (2TP + FP + FN) is 0/0 when nothing is anomalous and nothing is detected; scoring that
        # perfect agreement 1 matches the mIoU convention.
        self.pixel_f1 = BinaryF1Score(zero_division=1, validate_args=False)
        # an image is called anomalous when any of its pixels is detected; counted over every image's label
        self.detection = BinaryStatScores(validate_args=False)
        self.miou_anomalous = SegmentationMIoU()
        # anomalous images with and without a mask: when none has one, pixel metrics measure nothing
        self.masked_anomalous = SumMetric()
        self.unmasked_anomalous = SumMetric()
        self._with_segmentation: bool | None = None

    def update(
        self,
        anomaly_map: Tensor,
        gt_mask: Tensor,
        segmentation: Tensor | None = None,
        *,
        labels: Tensor,
        has_mask: Tensor | None = None,
        score_map: Tensor | None = None,
    ) -> None:
        with_segmentation = segmentation is not None
        if self._with_segmentation is None:
            self._with_segmentation = with_segmentation
        elif self._with_segmentation != with_segmentation:
            raise ValueError("segmentation must be given for every batch of a run or for none")
        # the image score: the maximum of score_map (e.g. the coarse scales' map), else of the map
        self.image_auroc.update(anomaly_map if score_map is None else score_map, labels)
        if segmentation is not None:
            detected = segmentation.flatten(1).any(dim=1).long()
            self.detection.update(detected, labels.to(detected.device).long())
        keep = torch.ones(len(labels), dtype=torch.bool) if has_mask is None else has_mask.bool()
        keep, anomalous = keep.to(anomaly_map.device), labels.to(anomaly_map.device).bool()
        self.unmasked_anomalous.update((anomalous & ~keep).sum().float())
        if not bool(keep.all()):
            anomaly_map, gt_mask, labels = anomaly_map[keep], gt_mask[keep], labels[keep]
            segmentation = None if segmentation is None else segmentation[keep]
        self.masked_anomalous.update(labels.sum().float())
        if not len(anomaly_map):
            return
        self.pixel_auroc.update(anomaly_map, gt_mask)
        self.pixel_aupro.update(anomaly_map, gt_mask)
        self.best_miou.update(anomaly_map, gt_mask)
        if segmentation is not None:
            self.miou.update(segmentation, gt_mask)
            if labels.any():
                self.miou_anomalous.update(segmentation[labels.bool()], gt_mask[labels.bool()])
            self.pixel_f1.update(segmentation.flatten().long(), gt_mask.flatten().long())

    def compute(self) -> dict[str, float]:
        metrics = {"image_auroc": self.image_auroc}
        values = self._detection_rates() if self._with_segmentation else {}
        if self.masked_anomalous.compute() == 0 and self.unmasked_anomalous.compute() > 0:
            # image-level labels only: there is no pixel truth to score
            return values | {name: float(metric.compute()) for name, metric in metrics.items()}
        metrics |= {
            "pixel_auroc": self.pixel_auroc,
            "pixel_aupro": self.pixel_aupro,
            "best_miou": self.best_miou,
        }
        if self._with_segmentation:
            metrics |= {"miou": self.miou, "pixel_f1": self.pixel_f1}
            if self.masked_anomalous.compute() > 0:
                metrics["miou_anomalous"] = self.miou_anomalous
        return values | {name: float(metric.compute()) for name, metric in metrics.items()}

    def _detection_rates(self) -> dict[str, float]:
        """False-alarm rate (normal images with any detection) with its exact 95 % binomial interval
        over the normal test images, precision and recall of "any pixel detected", and the oracle
        recall at the same number of false alarms; NaN where undefined (no normal images, no
        detections, no anomalous images)."""
        from scipy.stats import binomtest

        tp, fp, tn, fn, _ = (int(x) for x in self.detection.compute())
        ratio = lambda num, den: num / den if den else float("nan")  # noqa: E731
        low = high = float("nan")
        if fp + tn:
            low, high = binomtest(fp, fp + tn).proportion_ci(confidence_level=0.95, method="exact")
        return {
            "false_alarm_rate": ratio(fp, fp + tn),
            "false_alarm_rate_ci_low": float(low),
            "false_alarm_rate_ci_high": float(high),
            "detection_precision": ratio(tp, tp + fp),
            "detection_recall": ratio(tp, tp + fn),
            "oracle_recall_at_false_alarms": best_recall(*self.image_auroc.scores_and_labels(), fp),
        }

    def curves(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The pixel ROC (``roc``: FPR, TPR) and PRO (``pro``: FPR, PRO) curves, synced across processes
        (every rank must call this); a curve undefined for the data is left out."""
        curves = {}
        for name, metric in (("roc", self.pixel_auroc), ("pro", self.pixel_aupro)):
            with metric.sync_context():
                curve = metric.curve()
            if curve is not None:
                curves[name] = curve
        return curves

    def reset(self) -> None:
        for metric in (
            self.image_auroc,
            self.pixel_auroc,
            self.pixel_aupro,
            self.best_miou,
            self.miou,
            self.pixel_f1,
            self.detection,
            self.miou_anomalous,
            self.masked_anomalous,
            self.unmasked_anomalous,
        ):
            metric.reset()
        self._with_segmentation = None
