"""Metrics of a given binary segmentation (e.g. the automatic NFA segmentation)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def iou(intersection: Tensor, union: Tensor) -> Tensor:
    """``intersection / union`` per image, and 1 where the union is empty (nothing to find, nothing
    flagged): a normal image left alone scores 1, a normal image with any detection 0, exactly."""
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


class SegmentationMIoU(Metric):
    """Mean over images of the IoU (``iou``) between a binary segmentation and the ground truth.

    Written here because torchmetrics' ``MeanIoU`` skips images whose union is empty instead of
    scoring them 1, which would hide how well the segmentation leaves normal images alone.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, segmentation: Tensor, gt_mask: Tensor) -> None:
        if segmentation.shape != gt_mask.shape:
            raise ValueError(
                f"segmentation {tuple(segmentation.shape)} and gt_mask {tuple(gt_mask.shape)} differ"
            )
        seg, gt = segmentation.flatten(1).bool(), gt_mask.flatten(1).bool()
        intersection = (seg & gt).sum(dim=1).double()
        union = (seg | gt).sum(dim=1).double()
        self.iou_sum += iou(intersection, union).sum()
        self.n_images += seg.shape[0]

    def compute(self) -> Tensor:
        return self.iou_sum / self.n_images
