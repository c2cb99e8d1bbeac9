"""Threshold modes: how an anomaly map (and the latents) become a binary segmentation.

``nfa_tree`` / ``nfa_block`` need no labels and no calibration: a pixel is anomalous where
-log10 NFA exceeds ``log_nfa_threshold`` (0: under one expected false alarm per image).
``normal_quantile`` calibrates on held-out normal images (unsupervised); ``f1_adaptive`` calibrates
on labelled validation images (for comparison only). Calibrated values are buffers, so they travel
in checkpoints and evaluation / prediction reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from uflow_exp.metrics.pixel import PixelHistogram
from uflow_exp.nfa import block_nfa, tree_nfa


class Segmentation(NamedTuple):
    """What ``Threshold.segment`` returns: ``mask`` (B, 1, S, S) bool and ``significance``, the map it
    thresholds (the anomaly map, or -log10 NFA for the NFA modes), of the same shape."""

    mask: Tensor
    significance: Tensor


class Threshold(nn.Module):
    """Base class of the threshold modes.

    ``significance`` names what ``segment`` thresholds (``"neg_log10_nfa"`` or ``"anomaly_map"``) and
    ``level`` is the value it thresholds at, so callers need no knowledge of the mode.
    """

    needs_calibration = False
    needs_labels = False
    significance: str = "anomaly_map"

    @property
    def level(self) -> float:
        raise NotImplementedError

    def segment(self, z: Sequence[Tensor], amap: Tensor) -> Segmentation:
        raise NotImplementedError

    def calibration_update(self, amap: Tensor, mask: Tensor) -> None:
        """Accumulate validation maps (only for calibrated modes)."""

    def calibrate(self) -> None:
        """Set the threshold from what ``calibration_update`` saw, then forget it."""


class _NFAThreshold(Threshold):
    """Pixels whose -log10 NFA exceeds ``log_nfa_threshold`` (0: under one expected false alarm)."""

    significance = "neg_log10_nfa"

    def __init__(self, log_nfa_threshold: float = 0.0) -> None:
        super().__init__()
        self.log_nfa_threshold = log_nfa_threshold

    @property
    def level(self) -> float:
        return float(self.log_nfa_threshold)

    def _neg_log_nfa(self, z: list[Tensor], size: int) -> Tensor:
        raise NotImplementedError

    def segment(self, z, amap):
        significance = self._neg_log_nfa([t.float() for t in z], amap.shape[-1]).to(amap.device)
        return Segmentation(significance > self.log_nfa_threshold, significance)


class NFATreeThreshold(_NFAThreshold):
    """The tree NFA; ``clip_lower_tail`` and ``tests_by_size`` are ``tree_nfa``'s options (both off:
    the reference, exactly)."""

    def __init__(
        self, log_nfa_threshold: float = 0.0, clip_lower_tail: bool = False, tests_by_size: bool = False
    ) -> None:
        super().__init__(log_nfa_threshold)
        self.clip_lower_tail = clip_lower_tail
        self.tests_by_size = tests_by_size

    def _neg_log_nfa(self, z, size):
        return tree_nfa(z, size, clip_lower_tail=self.clip_lower_tail, tests_by_size=self.tests_by_size)


class NFABlockThreshold(_NFAThreshold):
    """The block NFA over ``win_size`` windows of latent pixels beyond the ``probability`` quantile."""

    def __init__(self, log_nfa_threshold: float = 0.0, win_size: int = 5, probability: float = 0.9) -> None:
        super().__init__(log_nfa_threshold)
        self.win_size = win_size
        self.probability = probability

    def _neg_log_nfa(self, z, size):
        return block_nfa(z, size, win_size=self.win_size, probability=self.probability).float()


class _CalibratedThreshold(Threshold):
    needs_calibration = True

    def __init__(self, n_bins: int = 10_000) -> None:
        super().__init__()
        self.histogram = PixelHistogram(n_bins)
        # NaN until calibrated: segmenting with an uncalibrated threshold is refused.
        self.register_buffer("value", torch.tensor(float("nan")))

    def calibration_update(self, amap, mask):
        self.histogram.update(amap, mask)

    def calibrate(self) -> None:
        normal, anomalous = self.histogram.compute()
        self.value.fill_(
            self._choose(normal.cpu().double(), anomalous.cpu().double(), self.histogram.edges())
        )
        self.histogram.reset()

    def _choose(self, normal: Tensor, anomalous: Tensor, edges: Tensor) -> float:
        raise NotImplementedError

    @property
    def level(self) -> float:
        if torch.isnan(self.value):
            raise RuntimeError(
                f"{type(self).__name__} was never calibrated: it needs a validation set "
                "(dataset.val_split) and at least one validation epoch"
            )
        return float(self.value)

    def segment(self, z, amap):
        return Segmentation(amap >= self.level, amap)


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
