"""Threshold modes: how an anomaly map (and the latents) become a binary segmentation.

``nfa_tree`` / ``nfa_block`` need no labels: a pixel is anomalous where -log10 NFA exceeds
``log_nfa_threshold`` (0: under one expected false alarm per image), or, with
``calibrate_on_normal``, the largest -log10 NFA of the held-out normal images if that is higher.
``normal_quantile`` calibrates on held-out normal images (unsupervised); ``f1_adaptive`` calibrates
on labelled validation images (for comparison only). Calibrated values are buffers, so they travel
in checkpoints and evaluation / prediction reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MaxMetric

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
    def calibrated(self) -> bool:
        """Whether ``level`` is known (always, for modes that need no calibration)."""
        return True

    @property
    def level(self) -> float:
        raise NotImplementedError

    def segment(self, z: Sequence[Tensor], amap: Tensor) -> Segmentation:
        raise NotImplementedError

    def calibration_update(self, z: Sequence[Tensor], amap: Tensor, mask: Tensor) -> None:
        """Accumulate a validation batch: latents, anomaly maps and masks (only calibrated modes)."""

    def calibrate(self) -> None:
        """Set the threshold from what ``calibration_update`` saw, then forget it."""


class _NFAThreshold(Threshold):
    """Pixels whose -log10 NFA exceeds ``log_nfa_threshold`` (0: under one expected false alarm).

    The NFA counts false alarms under the null model "normal latents are independent standard
    normals". A flow trained on real images breaks it in places (latents of neighbouring pixels are
    correlated; unseen patients, parts or lighting shift them), and then normal images come out
    significant. With ``calibrate_on_normal`` the level is raised to the largest -log10 NFA of any
    held-out normal validation image (never lowered below ``log_nfa_threshold``): no validation image
    without a defect is flagged, and the NFA keeps ranking the regions. Unsupervised: it uses only
    images whose mask is empty.

    ``scales``: the NFA tests the ``scales`` finest latent scales only (None: all). A latent pixel of
    the coarsest scale of a deep backbone covers 32 x 32 image pixels, so when that scale is tested its
    blocks make the mask, however small the defect; the anomaly map still uses every scale.
    """

    significance = "neg_log10_nfa"

    def __init__(
        self, log_nfa_threshold: float = 0.0, calibrate_on_normal: bool = False, scales: int | None = None
    ) -> None:
        super().__init__()
        if scales is not None and scales < 1:
            raise ValueError(
                f"threshold.scales must be a positive number of latent scales or null, got {scales}"
            )
        self.log_nfa_threshold = log_nfa_threshold
        self.scales = scales
        self.calibrate_on_normal = calibrate_on_normal
        # the largest significance of a normal validation image; NaN until calibrated. In checkpoints
        # only when used, so that those of uncalibrated NFA modes (all, before the option) still load.
        self.register_buffer("calibrated_level", torch.tensor(float("nan")), persistent=calibrate_on_normal)
        self._normal_max = MaxMetric(nan_strategy="error")  # synced over processes under DDP

    @property
    def needs_calibration(self) -> bool:
        return self.calibrate_on_normal

    @property
    def calibrated(self) -> bool:
        return not self.calibrate_on_normal or not bool(torch.isnan(self.calibrated_level))

    @property
    def level(self) -> float:
        if not self.calibrate_on_normal:
            return float(self.log_nfa_threshold)
        if torch.isnan(self.calibrated_level):
            raise RuntimeError(
                f"{type(self).__name__} with calibrate_on_normal was never calibrated: it needs normal "
                "validation images (dataset.val_split) and one validation epoch; or set "
                "threshold.calibrate_on_normal=false for the uncalibrated level"
            )
        return max(float(self.log_nfa_threshold), float(self.calibrated_level))

    def _neg_log_nfa(self, z: list[Tensor], size: int) -> Tensor:
        raise NotImplementedError

    def _significance(self, z: Sequence[Tensor], size: int, device: torch.device) -> Tensor:
        return self._neg_log_nfa([t.float() for t in z[: self.scales]], size).to(device)

    def segment(self, z, amap):
        significance = self._significance(z, amap.shape[-1], amap.device)
        return Segmentation(significance > self.level, significance)

    def calibration_update(self, z, amap, mask):
        if not self.calibrate_on_normal:
            return
        normal = ~mask.flatten(1).any(1)
        if normal.any():
            significance = self._significance([t[normal] for t in z], amap.shape[-1], amap.device)
            self._normal_max.update(significance.amax())

    def calibrate(self) -> None:
        if not self.calibrate_on_normal:
            return
        if not self._normal_max.update_called:
            raise RuntimeError(
                f"{type(self).__name__}: the validation set held no normal image to calibrate on"
            )
        self.calibrated_level.fill_(float(self._normal_max.compute()))
        self._normal_max.reset()


class NFATreeThreshold(_NFAThreshold):
    """The tree NFA; ``clip_lower_tail`` and ``tests_by_size`` are ``tree_nfa``'s options (every
    option off and ``scales`` None: the reference, exactly)."""

    def __init__(
        self,
        log_nfa_threshold: float = 0.0,
        clip_lower_tail: bool = False,
        tests_by_size: bool = False,
        calibrate_on_normal: bool = False,
        scales: int | None = None,
    ) -> None:
        super().__init__(log_nfa_threshold, calibrate_on_normal, scales)
        self.clip_lower_tail = clip_lower_tail
        self.tests_by_size = tests_by_size

    def _neg_log_nfa(self, z, size):
        return tree_nfa(z, size, clip_lower_tail=self.clip_lower_tail, tests_by_size=self.tests_by_size)


class NFABlockThreshold(_NFAThreshold):
    """The block NFA over ``win_size`` windows of latent pixels beyond the ``probability`` quantile."""

    def __init__(
        self,
        log_nfa_threshold: float = 0.0,
        win_size: int = 5,
        probability: float = 0.9,
        calibrate_on_normal: bool = False,
        scales: int | None = None,
    ) -> None:
        super().__init__(log_nfa_threshold, calibrate_on_normal, scales)
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

    def calibration_update(self, z, amap, mask):
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
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.value))

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
