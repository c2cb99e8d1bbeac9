"""Threshold modes: how an anomaly map (and the latents) become a binary segmentation.

``nfa_tree`` / ``nfa_block`` need no labels and no calibration: a pixel is anomalous where
-log10 NFA exceeds ``log_nfa_threshold`` (0: under one expected false alarm per image).
``normal_quantile`` calibrates on held-out normal images (unsupervised); ``f1_adaptive`` calibrates
on labelled validation images (for comparison only). Calibrated values are buffers, so they travel
in checkpoints and evaluation / prediction reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from uflow_exp.nfa import block_nfa, tree_nfa


class ScoreHistogram(Metric):
    """Counts of normal and anomalous pixel scores in equal bins over [0, 1] (DDP-synced sums)."""

    full_state_update = False

    def __init__(self, n_bins: int = 10_000) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.add_state("normal", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("anomalous", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, mask: Tensor) -> None:
        bins = (scores.detach().flatten().clamp(0, 1) * self.n_bins).long().clamp_max(self.n_bins - 1)
        positive = mask.flatten() > 0.5
        self.normal += torch.bincount(bins[~positive], minlength=self.n_bins).to(self.normal)
        self.anomalous += torch.bincount(bins[positive], minlength=self.n_bins).to(self.anomalous)

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.normal, self.anomalous

    def edges(self) -> Tensor:
        """Lower edge of each bin: a threshold there keeps that bin and all above it."""
        return torch.arange(self.n_bins, dtype=torch.float64) / self.n_bins


class Threshold(nn.Module):
    """Base class. ``segment`` returns ``(mask, significance)``: a (B, 1, S, S) bool mask and the
    map it thresholds (the anomaly map or -log10 NFA)."""

    needs_calibration = False
    needs_labels = False

    def segment(self, z: Sequence[Tensor], amap: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def calibration_update(self, amap: Tensor, mask: Tensor) -> None:
        """Accumulate validation maps (only for calibrated modes)."""

    def calibrate(self) -> None:
        """Set the threshold from what ``calibration_update`` saw, then forget it."""


class NFATreeThreshold(Threshold):
    """The tree NFA; ``clip_lower_tail`` and ``tests_by_size`` are ``tree_nfa``'s options (both off:
    the reference, exactly)."""

    def __init__(
        self, log_nfa_threshold: float = 0.0, clip_lower_tail: bool = False, tests_by_size: bool = False
    ) -> None:
        super().__init__()
        self.log_nfa_threshold = log_nfa_threshold
        self.clip_lower_tail = clip_lower_tail
        self.tests_by_size = tests_by_size

    def segment(self, z, amap):
        significance = tree_nfa(
            [t.float() for t in z],
            amap.shape[-1],
            clip_lower_tail=self.clip_lower_tail,
            tests_by_size=self.tests_by_size,
        ).to(amap.device)
        return significance > self.log_nfa_threshold, significance


class NFABlockThreshold(Threshold):
    def __init__(self, log_nfa_threshold: float = 0.0, win_size: int = 5, probability: float = 0.9) -> None:
        super().__init__()
        self.log_nfa_threshold = log_nfa_threshold
        self.win_size = win_size
        self.probability = probability

    def segment(self, z, amap):
        significance = block_nfa(
            [t.float() for t in z], amap.shape[-1], win_size=self.win_size, probability=self.probability
        ).to(amap.device, torch.float32)
        return significance > self.log_nfa_threshold, significance


class _CalibratedThreshold(Threshold):
    needs_calibration = True

    def __init__(self, n_bins: int = 10_000) -> None:
        super().__init__()
        self.histogram = ScoreHistogram(n_bins)
        # NaN until calibrated: segmenting with an uncalibrated threshold is refused.
        self.register_buffer("value", torch.tensor(float("nan")))

    def calibration_update(self, amap, mask):
        self.histogram.update(amap, mask)

    def calibrate(self) -> None:
        normal, anomalous = self.histogram.compute()
        self.value.fill_(self._choose(normal.cpu(), anomalous.cpu(), self.histogram.edges()))
        self.histogram.reset()

    def _choose(self, normal: Tensor, anomalous: Tensor, edges: Tensor) -> float:
        raise NotImplementedError

    def segment(self, z, amap):
        if torch.isnan(self.value):
            raise RuntimeError(
                f"{type(self).__name__} was never calibrated: it needs a validation set "
                "(dataset.val_split) and at least one validation epoch"
            )
        return amap >= self.value, amap


class NormalQuantileThreshold(_CalibratedThreshold):
    """The ``quantile`` of held-out normal pixels' anomaly scores: about ``1 - quantile`` of normal
    pixels are flagged. Unsupervised: anomalous validation pixels, if any, are ignored."""

    def __init__(self, quantile: float = 0.999, n_bins: int = 10_000) -> None:
        super().__init__(n_bins)
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"threshold.quantile must lie in (0, 1), got {quantile}")
        self.quantile = quantile

    def _choose(self, normal, anomalous, edges):
        if normal.sum() == 0:
            raise RuntimeError("normal_quantile: the validation set held no normal pixels")
        cdf = normal.cumsum(0) / normal.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(self.quantile, dtype=cdf.dtype)))
        # Upper edge of the bin holding the quantile: at most 1 - quantile of normal pixels lie above.
        return float(edges[min(index, len(edges) - 1)] + 1.0 / len(edges))


class F1AdaptiveThreshold(_CalibratedThreshold):
    """The threshold of best pixel F1 on labelled validation images (uses labels: for comparison)."""

    needs_labels = True

    def _choose(self, normal, anomalous, edges):
        if anomalous.sum() == 0:
            raise RuntimeError(
                "f1_adaptive needs anomalous pixels in the validation set: use dataset.val_split=test"
            )
        tp = anomalous.flip(0).cumsum(0).flip(0)  # anomalous pixels at or above each bin
        fp = normal.flip(0).cumsum(0).flip(0)
        f1 = 2 * tp / (2 * tp + fp + (anomalous.sum() - tp))
        return float(edges[int(torch.argmax(f1))])
