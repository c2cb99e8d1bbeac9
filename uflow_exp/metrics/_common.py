"""Input checks and binned-curve helpers shared by the metrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn


def as_image_batch(anomaly_map: Tensor, gt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a batch and return it as ``(B, H, W)`` float scores and ``(B, H, W)`` bool masks.

    Accepts ``(B, 1, H, W)`` or ``(B, H, W)`` tensors of equal shape; ``gt_mask`` may be bool or 0/1 valued.
    """
    if anomaly_map.shape != gt_mask.shape:
        raise ValueError(f"anomaly_map {tuple(anomaly_map.shape)} and gt_mask {tuple(gt_mask.shape)} differ")
    if anomaly_map.ndim == 4:
        if anomaly_map.shape[1] != 1:
            raise ValueError(f"expected a single channel, got shape {tuple(anomaly_map.shape)}")
        anomaly_map, gt_mask = anomaly_map[:, 0], gt_mask[:, 0]
    elif anomaly_map.ndim != 3:
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W), got shape {tuple(anomaly_map.shape)}")
    if not anomaly_map.is_floating_point():
        raise TypeError(f"anomaly_map must be floating point, got {anomaly_map.dtype}")
    # A NaN score has no rank; silently binning it would corrupt every threshold's counts.
    if torch.isnan(anomaly_map).any():
        raise ValueError("anomaly_map contains NaN")
    return anomaly_map, gt_mask.bool()


def bin_index(scores: Tensor, n_bins: int) -> Tensor:
    """Bin ``k = floor(score * n_bins)`` of each score, with 1.0 in the last bin.

    Scores outside [0, 1] are clamped into the end bins. The map is monotone in the score, which is all the
    error bounds below rely on.
    """
    return (scores.float().clamp(0.0, 1.0) * n_bins).long().clamp_(max=n_bins - 1)


def pixel_histogram(scores: Tensor, gt: Tensor, n_bins: int) -> Tensor:
    """(2, n_bins) int64 counts of the pixels' score bins: row 0 normal pixels, row 1 anomalous ones."""
    index = bin_index(scores, n_bins) + n_bins * gt.long()
    return torch.bincount(index.flatten(), minlength=2 * n_bins).view(2, n_bins)


def curve_from_top(per_bin: Tensor, total: Tensor) -> Tensor:
    """Fraction of the mass at or above each bin cut, ordered from the highest cut (0) to the lowest (1).

    ``per_bin`` holds one count per bin; the result has ``n_bins + 1`` points: for a cut between bins this is
    the rate of "score >= threshold" at a threshold placed there.
    """
    cumulative = per_bin.double().flip(0).cumsum(0)
    return torch.cat([cumulative.new_zeros(1), cumulative]) / total


def partial_area(x: Tensor, y: Tensor, limit: float) -> tuple[Tensor, Tensor]:
    """Area under a piecewise-linear curve over ``x`` in ``[0, limit]`` and its binning error bound.

    ``x`` and ``y`` are non-decreasing, start at ``x = 0`` and are the exact curve's values at the bin cuts.
    Between two cuts the exact curve is an unknown monotone path inside the box spanned by the two points,
    while the binned curve is the chord, so the areas differ by at most half the box (``dx * dy / 2``); in the
    box cut by ``limit`` only the part left of it counts, bounded by ``w * dy`` for its width ``w``.
    Both results are divided by ``limit``.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    dx, dy = x1 - x0, y1 - y0
    x_end = x1.clamp(max=limit)
    width = (x_end - x0).clamp(min=0.0)
    frac = torch.where(dx > 0, width / dx.clamp(min=torch.finfo(dx.dtype).tiny), torch.zeros_like(dx))
    y_end = y0 + frac * dy
    area = (width * (y0 + y_end) / 2).sum()
    error = torch.where(x1 <= limit, dx * dy / 2, width * dy).sum()
    return area / limit, error / limit


def warn_undefined(name: str, reason: str) -> Tensor:
    """Warn (once, on rank zero) that a metric is undefined for the accumulated data and return NaN."""
    rank_zero_warn(f"{name} is undefined: {reason}; returning NaN.", UserWarning)
    return torch.tensor(float("nan"))
