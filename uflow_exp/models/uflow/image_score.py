"""The image score from the scales' peaks, each judged against the normal validation images' peaks."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchmetrics.aggregation import CatMetric

# the fewest normal validation images whose peaks may set a scale's mean and spread: with fewer, the
# standard deviation is too rough to weigh one scale against another, and the score stays the merged map's
MIN_NORMAL_IMAGES = 10

log = logging.getLogger(__name__)


class ScalePeakStandardizer(nn.Module):
    """Per latent scale the image score reads, the mean and standard deviation of that scale's peak (the
    maximum of its anomaly map, ``1 - likelihood``) over the normal validation images. An image then
    scores the largest, over those scales, of its own peak's distance above that mean in standard
    deviations: a scale whose normal peaks vary widely counts for less than one whose normal peaks are
    steady, and a defect that only one scale sees is not averaged away by the others. Unfitted (fewer
    than ``MIN_NORMAL_IMAGES`` normal validation images, or none yet), the score is the merged map of the
    same scales, as without it.

    Args:
        scales: how many scales the score reads.
    """

    def __init__(self, scales: int) -> None:
        super().__init__()
        if scales < 1:
            raise ValueError(f"the image score reads at least one scale, got {scales}")
        self.register_buffer("mean", torch.zeros(scales))
        self.register_buffer("std", torch.ones(scales))
        self.register_buffer("normal_images", torch.tensor(0))  # how many set them; 0: unfitted
        self._peaks = CatMetric(nan_strategy="error")  # gathered over processes under DDP

    def is_fitted(self) -> bool:
        return int(self.normal_images) > 0

    def update(self, scale_maps: torch.Tensor) -> None:
        """Take the (B, scales, H, W) per-scale maps of B normal validation images."""
        if len(scale_maps):
            self._peaks.update(scale_maps.flatten(2).amax(dim=2).float())

    def fit(self) -> None:
        """Set each scale's mean and standard deviation from the peaks taken since the last fit; with
        fewer than ``MIN_NORMAL_IMAGES`` images, stay (or become) unfitted and say so."""
        peaks = self._peaks.compute().reshape(-1, self.mean.numel()) if self._peaks.update_called else None
        self._peaks.reset()
        n = 0 if peaks is None else len(peaks)
        if n < MIN_NORMAL_IMAGES:
            log.warning(
                "Image score: %d normal validation image(s), fewer than the %d that set each scale's peak "
                "statistics; the score is the maximum of the scales' merged map",
                n,
                MIN_NORMAL_IMAGES,
            )
            self.normal_images.fill_(0)
            return
        self.mean.copy_(peaks.mean(dim=0))
        # a scale whose normal peaks do not vary at all must not divide by zero
        self.std.copy_(peaks.std(dim=0).clamp(min=1e-6))
        self.normal_images.fill_(n)

    def score_map(self, scale_maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): at each pixel, the largest of the scales' maps in standard deviations above
        their normal peaks' mean; its maximum is the image score."""
        standardized = (scale_maps - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return standardized.amax(dim=1, keepdim=True)
