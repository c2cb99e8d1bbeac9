"""Threshold modes: how an anomaly map (and the latents) become a binary segmentation.

``nfa_tree`` / ``nfa_block`` need no labels: a pixel is anomalous where -log10 NFA exceeds
``log_nfa_threshold`` (0: under one expected false alarm per image), or, with
``calibrate_on_normal``, the largest -log10 NFA of the held-out normal images if that is higher (or,
with ``false_alarm_rate``, the level that flags at most that share of new normal images).
``normal_quantile`` calibrates on held-out normal images (unsupervised); ``f1_adaptive`` calibrates
on labelled validation images (for comparison only). Calibrated values are buffers, so they travel
in checkpoints and evaluation / prediction reuse them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from uflow_exp.metrics.pixel import PixelHistogram
from uflow_exp.nfa import block_nfa, tree_nfa

log = logging.getLogger(__name__)


class Segmentation(NamedTuple):
    """What ``Threshold.segment`` returns: ``mask`` (B, 1, S, S) bool and ``significance``, the map it
    thresholds (the anomaly map, or -log10 NFA for the NFA modes), of the same shape."""

    mask: Tensor
    significance: Tensor


def conformal_rank(n: int, rate: float) -> int:
    """The rank k (1 = smallest) of the n held-out normal scores to threshold at ("flagged: score
    above the k-th smallest") so that a new normal image, exchangeable with them, is flagged with
    probability at most ``rate``: that probability is at most (n + 1 - k) / (n + 1), so
    k = ceil((n + 1)(1 - rate)). A rate below 1 / (n + 1) needs k > n, which n images cannot support:
    then k = n (the largest score), which promises 1 / (n + 1)."""
    if n < 1:
        raise ValueError("no normal validation image to calibrate on")
    return min(n, math.ceil((n + 1) * (1.0 - rate) - 1e-9))  # - 1e-9: (n + 1)(1 - rate) may round up


def threshold_override(node: Mapping[str, Any] | None) -> tuple[dict | None, float | None]:
    """What ``threshold=<mode>`` and ``threshold.false_alarm_rate=R`` on an evaluate or predict
    command ask for: a whole mode's config (with ``_target_``; the rate, if any, inside it), or only
    a rate for the checkpoint's own mode (None: keep the checkpoint's)."""
    node = dict(node or {})
    rate = node.pop("false_alarm_rate", None)
    if "_target_" not in node:
        return None, rate
    return (node if rate is None else {**node, "false_alarm_rate": rate}), None


def refine_regions(mask: Tensor, amap: Tensor, fraction: float) -> Tensor:
    """Shrink each flagged region (8-connected, per image) to the pixels where the anomaly map rises at
    least ``fraction`` of the way from the image's median (its normal level) to the region's maximum
    (0.5: the region's width at half maximum). Every region keeps its maximum, so no detection is lost
    or added: only the mask's extent changes. ``mask`` (B, 1, H, W) bool, ``amap`` the same shape.

    Hand-written with scipy's labelling: no library refines a given mask by its own map's peaks."""
    from scipy import ndimage

    refined = mask.clone()
    for i in range(mask.shape[0]):
        flagged = mask[i, 0].cpu().numpy()
        if not flagged.any():
            continue
        scores = amap[i, 0].detach().float().cpu().numpy()
        labels, count = ndimage.label(flagged, structure=np.ones((3, 3), dtype=bool))
        peaks = np.asarray(ndimage.maximum(scores, labels, index=np.arange(1, count + 1)))
        base = float(np.median(scores))
        floor = base + fraction * (peaks - base)  # per region; a peak below the median keeps its region
        keep = flagged & (scores >= np.concatenate([[np.inf], np.minimum(floor, peaks)])[labels])
        refined[i, 0] = torch.from_numpy(keep).to(mask.device)
    return refined


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

    def significance_map(self, z: Sequence[Tensor], amap: Tensor, tests: int = 1) -> Tensor:
        """What ``decide`` thresholds, the shape of ``amap``: here the anomaly map itself. ``tests``:
        how many such maps make up one image (its tiles), for the modes that count their tests."""
        return amap

    def decide(self, significance: Tensor, amap: Tensor) -> Segmentation:
        """The segmentation of a ``significance`` map (and the anomaly map it came with)."""
        return Segmentation(significance >= self.level, significance)

    def segment(self, z: Sequence[Tensor], amap: Tensor) -> Segmentation:
        """Latents and anomaly map -> segmentation: ``decide(significance_map(z, amap), amap)``."""
        return self.decide(self.significance_map(z, amap), amap)

    def calibration_update(self, significance: Tensor, amap: Tensor, mask: Tensor) -> None:
        """Accumulate a validation batch: significance and anomaly maps, masks (calibrated modes)."""

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
    images whose mask is empty. ``false_alarm_rate`` (with ``calibrate_on_normal``) lowers it to the
    level that flags at most that share of new normal images, by the finite-sample (conformal) rank
    of the normal validation images' largest -log10 NFA (``conformal_rank``); None: the largest.

    ``scales``: the NFA tests the ``scales`` finest latent scales only (None: all). A latent pixel of
    the coarsest scale of a deep backbone covers 32 x 32 image pixels, so when that scale is tested its
    blocks make the mask, however small the defect; the anomaly map still uses every scale.
    """

    significance = "neg_log10_nfa"

    def __init__(
        self,
        log_nfa_threshold: float = 0.0,
        calibrate_on_normal: bool = False,
        scales: int | None = None,
        false_alarm_rate: float | None = None,
        refine_fraction: float | None = None,
    ) -> None:
        super().__init__()
        if scales is not None and scales < 1:
            raise ValueError(
                f"threshold.scales must be a positive number of latent scales or null, got {scales}"
            )
        if refine_fraction is not None and not 0.0 <= refine_fraction < 1.0:
            raise ValueError(
                f"threshold.refine_fraction must lie in [0, 1) or be null, got {refine_fraction}"
            )
        self.refine_fraction = refine_fraction
        self.log_nfa_threshold = log_nfa_threshold
        self.scales = scales
        self.calibrate_on_normal = calibrate_on_normal
        self.false_alarm_rate = self._checked_rate(false_alarm_rate)
        # the largest significance of a normal validation image; NaN until calibrated. In checkpoints
        # only when used, so that those of uncalibrated NFA modes (all, before the option) still load.
        self.register_buffer("calibrated_level", torch.tensor(float("nan")), persistent=calibrate_on_normal)
        # every normal validation image's largest significance, sorted: a checkpoint keeps them, so that
        # another false_alarm_rate needs no validation pass (empty in checkpoints written before)
        self.register_buffer("normal_scores", torch.empty(0), persistent=calibrate_on_normal)
        self._normal_scores = CatMetric(nan_strategy="error")  # concatenated over processes under DDP

    def _checked_rate(self, rate: float | None) -> float | None:
        if rate is None:
            return None
        if not self.calibrate_on_normal:
            raise ValueError(
                "threshold.false_alarm_rate sets the level on held-out normal images: it needs "
                "threshold.calibrate_on_normal=true"
            )
        if not 0.0 < float(rate) < 1.0:
            raise ValueError(f"threshold.false_alarm_rate must lie in (0, 1) (images per image), got {rate}")
        return float(rate)

    def set_false_alarm_rate(self, rate: float | None) -> None:
        """Another share of normal images to flag, from the stored normal scores (no validation pass)."""
        self.false_alarm_rate = self._checked_rate(rate)
        if self.calibrated:
            self._normal_level()  # refuses a checkpoint without the scores now, not at the first image

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the stored scores' count is the calibration set's; checkpoints written before have none
        key = prefix + "normal_scores"
        if self.calibrate_on_normal:
            self.normal_scores = torch.empty_like(state_dict.setdefault(key, torch.empty(0)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        return max(float(self.log_nfa_threshold), self._normal_level())

    def _normal_level(self) -> float:
        if self.false_alarm_rate is None:
            return float(self.calibrated_level)
        n = self.normal_scores.numel()
        if n == 0:
            raise RuntimeError(
                "threshold.false_alarm_rate: this checkpoint keeps only the largest normal validation "
                "score (it was calibrated before the option existed): recalibrate it with "
                "`python -m uflow_exp.evaluate ckpt_path=... threshold.false_alarm_rate=...`"
            )
        return float(self.normal_scores[conformal_rank(n, self.false_alarm_rate) - 1])

    @property
    def promised_false_alarm_rate(self) -> float:
        """The share of new normal images the calibrated level flags at most (``(n + 1 - k) / (n + 1)``
        for the k-th of n normal scores; NaN without calibration on normal images). A level raised to
        ``log_nfa_threshold`` flags fewer."""
        n = self.normal_scores.numel()
        if not self.calibrate_on_normal or n == 0:
            return float("nan")
        k = n if self.false_alarm_rate is None else conformal_rank(n, self.false_alarm_rate)
        return (n + 1 - k) / (n + 1)

    def _neg_log_nfa(self, z: list[Tensor], size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def significance_map(self, z, amap, tests=1):
        """-log10 NFA at the anomaly map's size; with ``tests`` maps (tiles) per image, each one's
        number of tests counts all of them (NFA x ``tests``), so that the level bounds the expected
        false alarms per image, not per tile."""
        z = [t.float() for t in z[: self.scales]]
        significance = self._neg_log_nfa(z, tuple(amap.shape[-2:])).to(amap.device)
        return significance - math.log10(tests) if tests > 1 else significance

    def decide(self, significance, amap):
        mask = significance > self.level
        if self.refine_fraction is not None:
            mask = refine_regions(mask, amap, self.refine_fraction)
        return Segmentation(mask, significance)

    def calibration_update(self, significance, amap, mask):
        if not self.calibrate_on_normal:
            return
        normal = ~mask.flatten(1).any(1)
        if normal.any():
            self._normal_scores.update(significance[normal].flatten(1).amax(dim=1))

    def calibrate(self) -> None:
        if not self.calibrate_on_normal:
            return
        if not self._normal_scores.update_called:
            raise RuntimeError(
                f"{type(self).__name__}: the validation set held no normal image to calibrate on"
            )
        scores = self._normal_scores.compute().reshape(-1).float().sort().values
        self._normal_scores.reset()
        self.normal_scores = scores.to(self.calibrated_level.device)
        self.calibrated_level.fill_(float(scores[-1]))
        self._log_promise()

    @rank_zero_only
    def _log_promise(self) -> None:
        n, rate = self.normal_scores.numel(), self.false_alarm_rate
        promised = self.promised_false_alarm_rate
        if rate is not None and rate < promised:
            log.warning(
                "threshold.false_alarm_rate=%g cannot be promised with %d normal validation images (at "
                "least %d are needed): using the strictest level they support, which flags at most %.3g "
                "of new normal images", rate, n, math.ceil(1.0 / rate - 1.0 - 1e-9), promised,
            )  # fmt: skip
        log.info(
            "%s: level %.4g (-log10 NFA) from %d normal validation images flags at most %.3g of new "
            "normal images", type(self).__name__, self.level, n, promised,
        )  # fmt: skip


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
        false_alarm_rate: float | None = None,
        refine_fraction: float | None = None,
    ) -> None:
        super().__init__(log_nfa_threshold, calibrate_on_normal, scales, false_alarm_rate, refine_fraction)
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
        false_alarm_rate: float | None = None,
        refine_fraction: float | None = None,
    ) -> None:
        super().__init__(log_nfa_threshold, calibrate_on_normal, scales, false_alarm_rate, refine_fraction)
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

    def calibration_update(self, significance, amap, mask):
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
