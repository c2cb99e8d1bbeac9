"""The image score from the scales' peaks, each judged against the normal validation images' peaks."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchmetrics.aggregation import CatMetric

from .anomaly_map import quantile_level

# the fewest normal validation images whose peaks may set a scale's mean and spread: with fewer, the
# standard deviation is too rough to weigh one scale against another, and the score stays the merged map's
MIN_NORMAL_IMAGES = 10
# the share of an image's pixels (at one scale) below the level its relative peak is measured from: the
# pixel map's own level (``model.map_relative_quantile``'s default)
RELATIVE_LEVEL = 0.8

log = logging.getLogger(__name__)


class ScalePeakStandardizer(nn.Module):
    """Per latent scale the image score reads, two peaks of that scale's anomaly map (``1 - likelihood``):
    its maximum, and its maximum above the image's own ``RELATIVE_LEVEL`` level at that scale (how far the
    peak rises above the rest of the image); for each, the mean and standard deviation over the normal
    validation images. An image then scores the largest of its peaks in standard deviations above their
    normal mean, over the scales and the two kinds: a scale whose normal peaks vary widely counts for less
    than one whose normal peaks are steady, a defect that only one scale sees is not averaged away by the
    others, and an image warm all over (another patient's contrast) is judged by its relative peak too.
    Unfitted (fewer than ``MIN_NORMAL_IMAGES`` normal validation images, or none yet), the score is the
    merged map of the same scales, as without it.

    Args:
        scales: how many scales the score reads.
    """

    def __init__(self, scales: int) -> None:
        super().__init__()
        if scales < 1:
            raise ValueError(f"the image score reads at least one scale, got {scales}")
        self.register_buffer("mean", torch.zeros(2, scales))  # rows: absolute, relative peaks
        self.register_buffer("std", torch.ones(2, scales))
        self.register_buffer("normal_images", torch.tensor(0))  # how many set them; 0: unfitted
        self._normal_peaks = CatMetric(nan_strategy="error")  # gathered over processes under DDP

    @property
    def scales(self) -> int:
        return self.mean.shape[1]

    def is_fitted(self) -> bool:
        return int(self.normal_images) > 0

    @staticmethod
    def peaks(scale_maps: torch.Tensor) -> torch.Tensor:
        """(B, 2, scales): each image's absolute and relative peak at each scale of its (B, scales, H, W)
        maps."""
        flat = scale_maps.flatten(2)
        peak = flat.amax(dim=2)
        return torch.stack([peak, peak - quantile_level(flat, RELATIVE_LEVEL)], dim=1)

    def update(self, scale_maps: torch.Tensor) -> None:
        """Take the (B, scales, H, W) per-scale maps of B normal validation images."""
        if len(scale_maps):
            self._normal_peaks.update(self.peaks(scale_maps.float()).flatten(1))

    def fit(self) -> None:
        """Set each peak's mean and standard deviation from the images taken since the last fit; with
        fewer than ``MIN_NORMAL_IMAGES`` images, stay (or become) unfitted and say so."""
        taken = self._normal_peaks
        peaks = taken.compute().reshape(-1, 2, self.scales) if taken.update_called else None
        taken.reset()
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
        # a peak that does not vary at all on normal images must not divide by zero
        self.std.copy_(peaks.std(dim=0).clamp(min=1e-6))
        self.normal_images.fill_(n)

    def score_map(self, scale_maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): at each pixel, the largest over the scales of its map, and of its map above the
        image's own level, in standard deviations above the normal peaks' mean; its maximum is the image
        score. Unfitted: the scales' merged map (their mean, clipped at 0)."""
        if not self.is_fitted():
            return scale_maps.mean(dim=1, keepdim=True).clamp(min=0.0)
        level = quantile_level(scale_maps.flatten(2), RELATIVE_LEVEL)[..., None, None]
        mean, std = self.mean[..., None, None], self.std[..., None, None]
        absolute = (scale_maps - mean[0]) / std[0]
        relative = (scale_maps - level - mean[1]) / std[1]
        return torch.cat([absolute, relative], dim=1).amax(dim=1, keepdim=True)
