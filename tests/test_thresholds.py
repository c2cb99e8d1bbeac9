"""Threshold modes: calibrated values against brute force, the refusal to segment uncalibrated, and
the NFA adapters against the NFA functions they wrap."""

import numpy as np
import pytest
import torch

from uflow_exp.nfa import block_nfa, tree_nfa
from uflow_exp.thresholds import (
    F1AdaptiveThreshold,
    NFABlockThreshold,
    NFATreeThreshold,
    NormalQuantileThreshold,
    Segmentation,
    conformal_rank,
    refine_regions,
)

N_BINS = 1000


def random_maps(seed: int, n_images: int = 6, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps in [0, 1] whose anomalous pixels (a square per odd image) score higher on average."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n_images, 1, side, side, dtype=torch.bool)
    mask[1::2, :, 4:9, 5:11] = True
    maps = torch.rand(mask.shape, generator=g) * 0.7 + mask * 0.25 * torch.rand(mask.shape, generator=g)
    return maps, mask


def calibrated(threshold, maps: torch.Tensor, mask: torch.Tensor, batch: int = 4):
    for start in range(0, len(maps), batch):
        part = maps[start : start + batch]
        threshold.calibration_update(part, part, mask[start : start + batch])
    threshold.calibrate()
    return threshold


@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("seed", range(3))
def test_normal_quantile_flags_at_most_one_minus_quantile_of_normal_pixels(quantile, seed):
    maps, mask = random_maps(seed)
    threshold = calibrated(NormalQuantileThreshold(quantile, n_bins=N_BINS), maps, mask)
    normal = maps[~mask]
    flagged = (normal >= threshold.level).double().mean().item()
    assert flagged <= 1 - quantile + 1e-12
    # ...and no more conservative than one bin: a bin lower would flag more than 1 - quantile
    one_bin_lower = (normal >= threshold.level - 1 / N_BINS).double().mean().item()
    assert one_bin_lower > 1 - quantile or threshold.level - 1 / N_BINS < 0
    exact = np.quantile(normal.numpy(), quantile)
    assert exact - 1e-9 <= threshold.level <= exact + 2 / N_BINS


def test_normal_quantile_ignores_anomalous_validation_pixels():
    maps, mask = random_maps(0)
    alone = calibrated(
        NormalQuantileThreshold(0.9, n_bins=N_BINS),
        maps[~mask][None, None, None],
        mask[~mask][None, None, None],
    )
    mixed = calibrated(NormalQuantileThreshold(0.9, n_bins=N_BINS), maps, mask)
    assert alone.level == mixed.level


@pytest.mark.parametrize("seed", range(3))
def test_f1_adaptive_picks_the_best_bin_edge_by_brute_force(seed):
    maps, mask = random_maps(seed)
    threshold = calibrated(F1AdaptiveThreshold(n_bins=N_BINS), maps, mask)
    scores, truth = maps.flatten().double().numpy(), mask.flatten().numpy()

    def f1(level: float) -> float:
        # the binned decision: score in a bin at or above the level's bin
        hit = np.floor(np.clip(scores, 0, 1) * N_BINS).clip(max=N_BINS - 1) >= round(level * N_BINS)
        tp, fp, fn = (hit & truth).sum(), (hit & ~truth).sum(), (~hit & truth).sum()
        return 2 * tp / (2 * tp + fp + fn)

    best = max(f1(k / N_BINS) for k in range(N_BINS))
    assert f1(threshold.level) == pytest.approx(best, abs=1e-12)
    segmentation = threshold.segment([], maps)
    assert torch.equal(segmentation.mask, maps >= threshold.level)


def test_calibrated_value_travels_in_the_state_dict():
    maps, mask = random_maps(1)
    source = calibrated(NormalQuantileThreshold(0.99, n_bins=N_BINS), maps, mask)
    target = NormalQuantileThreshold(0.99, n_bins=N_BINS)
    target.load_state_dict(source.state_dict())
    assert target.level == source.level


@pytest.mark.parametrize("mode", [NormalQuantileThreshold, F1AdaptiveThreshold])
def test_an_uncalibrated_threshold_refuses_to_segment(mode):
    threshold = mode(n_bins=N_BINS)
    with pytest.raises(RuntimeError, match=f"{mode.__name__} was never calibrated.*val_split"):
        threshold.segment([], torch.rand(1, 1, 4, 4))


def test_calibration_without_the_pixels_it_needs_is_refused():
    maps, mask = random_maps(0)
    with pytest.raises(RuntimeError, match="no normal pixels"):
        calibrated(NormalQuantileThreshold(0.9), maps[:, :, 4:9, 5:11][1::2], mask[:, :, 4:9, 5:11][1::2])
    with pytest.raises(RuntimeError, match="val_split=test"):
        calibrated(F1AdaptiveThreshold(), maps[::2], mask[::2])


def latents(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 8, 8, generator=g)]
    z[0][1, :, 3:9, 3:9] *= 3  # a planted anomaly in the second image
    return z


@pytest.mark.parametrize("options", [{}, {"clip_lower_tail": True, "tests_by_size": True}])
def test_tree_adapter_thresholds_tree_nfa_at_its_level(options):
    z = latents(0)
    amap = torch.rand(2, 1, 32, 32)
    result = NFATreeThreshold(log_nfa_threshold=1.5, **options).segment(z, amap)
    expected = tree_nfa(z, 32, **options)
    assert isinstance(result, Segmentation)
    assert torch.equal(result.significance, expected) and torch.equal(result.mask, expected > 1.5)
    assert result.mask[1].any() and not result.mask[0].any()


@pytest.mark.parametrize("mode", [NFATreeThreshold, NFABlockThreshold])
def test_scales_tests_the_finest_latent_scales_only(mode):
    z = latents(0)
    z[1][0] *= 3  # the coarse scale alone finds an anomaly in the first image
    amap = torch.rand(2, 1, 32, 32)
    finest = mode(scales=1).segment(z, amap)
    assert torch.equal(finest.significance, mode().segment(z[:1], amap).significance)
    assert not finest.mask[0].any() and mode().segment(z, amap).mask[0].any()
    assert torch.equal(mode(scales=5).segment(z, amap).significance, mode().segment(z, amap).significance)
    with pytest.raises(ValueError, match="threshold.scales.*got 0"):
        mode(scales=0)


def test_block_adapter_thresholds_block_nfa_at_its_level():
    z = latents(1)
    threshold = NFABlockThreshold(log_nfa_threshold=0.5, win_size=3, probability=0.8)
    result = threshold.segment(z, torch.rand(2, 1, 32, 32))
    expected = block_nfa(z, 32, win_size=3, probability=0.8).float()
    assert result.significance.dtype == torch.float32
    assert torch.equal(result.significance, expected) and torch.equal(result.mask, expected > 0.5)
    assert threshold.level == 0.5 and threshold.significance == "neg_log10_nfa"


def test_calibrated_modes_threshold_the_anomaly_map():
    maps, mask = random_maps(2)
    threshold = calibrated(NormalQuantileThreshold(0.9, n_bins=N_BINS), maps, mask)
    assert threshold.significance == "anomaly_map"
    result = threshold.segment([], maps)
    assert result.significance is maps and torch.equal(result.mask, maps >= threshold.level)


def noisy_latents(seed: int, n_images: int = 6, spread: float = 1.0) -> list[torch.Tensor]:
    """Latents ``spread`` times wider than the null's, as a flow gives on unseen normal images."""
    g = torch.Generator().manual_seed(seed)
    return [
        spread * torch.randn(n_images, 8, 16, 16, generator=g),
        spread * torch.randn(n_images, 8, 8, 8, generator=g),
    ]


@pytest.mark.parametrize("mode", [NFATreeThreshold, NFABlockThreshold])
def test_calibrate_on_normal_takes_the_largest_significance_of_normal_validation_images(mode):
    z = noisy_latents(0, spread=1.4)
    z[0][1, :, 3:9, 3:9] *= 3  # image 1 holds a defect, and its mask says so: it must not count
    mask = torch.zeros(6, 1, 32, 32, dtype=torch.bool)
    mask[1, :, 6:18, 6:18] = True
    options = {"clip_lower_tail": True, "tests_by_size": True} if mode is NFATreeThreshold else {}
    threshold = mode(calibrate_on_normal=True, **options)
    assert threshold.needs_calibration
    for start in (0, 4):  # two validation batches
        part, amap = [t[start : start + 4] for t in z], torch.rand(len(mask[start : start + 4]), 1, 32, 32)
        threshold.calibration_update(threshold.significance_map(part, amap), amap, mask[start : start + 4])
    threshold.calibrate()
    plain = mode(**options).segment(z, torch.rand(6, 1, 32, 32)).significance
    normal_max = plain[[0, 2, 3, 4, 5]].max().item()
    assert plain[1].max().item() > normal_max > 0  # the defect is more significant than any normal image
    assert threshold.level == pytest.approx(normal_max, rel=1e-6)
    result = threshold.segment(z, torch.rand(6, 1, 32, 32))
    assert torch.equal(result.significance, plain)
    assert not result.mask[[0, 2, 3, 4, 5]].any() and result.mask[1].any()
    target = mode(calibrate_on_normal=True, **options)
    target.load_state_dict(threshold.state_dict())
    assert target.level == threshold.level


@pytest.mark.parametrize(
    ("n", "rate", "rank"),
    [(99, 0.01, 99), (70, 0.05, 68), (19, 0.05, 19), (9, 0.05, 9), (9, 0.5, 5), (1, 0.4, 1)],
)
def test_the_conformal_rank_of_a_false_alarm_rate(n, rate, rank):
    assert conformal_rank(n, rate) == rank


@pytest.mark.parametrize(("n", "rate"), [(50, 0.1), (20, 0.2), (70, 0.05)])
def test_a_new_normal_image_is_flagged_at_most_at_the_promised_rate(n, rate):
    """Exchangeable normal scores: thresholding at the conformal rank of n of them flags a new one
    with probability (n + 1 - k) / (n + 1) <= rate (a rank one lower would break the promise)."""
    scores = torch.rand(40_000, n + 1, generator=torch.Generator().manual_seed(n))
    k = conformal_rank(n, rate)
    flagged = (scores[:, n] > scores[:, :n].sort(dim=1).values[:, k - 1]).double().mean().item()
    promised = (n + 1 - k) / (n + 1)
    assert promised <= rate and promised + 1 / (n + 1) > rate  # the least strict level that keeps it
    assert flagged == pytest.approx(promised, abs=0.006)


def calibrated_on(scores: list[float], **options) -> NFATreeThreshold:
    """A calibrated tree-NFA threshold whose normal validation images scored ``scores``."""
    threshold = NFATreeThreshold(calibrate_on_normal=True, **options)
    threshold._normal_scores.update(torch.tensor(scores))
    threshold.calibrate()
    return threshold


def test_a_false_alarm_rate_sets_the_level_from_the_stored_normal_scores(caplog):
    scores = [float(s) for s in torch.linspace(1.0, 20.0, 20)]  # 1, 2, ..., 20
    strictest = calibrated_on(scores)
    assert strictest.level == 20.0 and strictest.promised_false_alarm_rate == pytest.approx(1 / 21)
    threshold = calibrated_on(scores, false_alarm_rate=0.2)
    # k = ceil(21 * 0.8) = 17: flagged above the 17th smallest score, at most 4/21 of normal images
    assert threshold.level == 17.0 and threshold.promised_false_alarm_rate == pytest.approx(4 / 21)
    assert threshold.normal_scores.tolist() == scores and float(threshold.calibrated_level) == 20.0
    # another rate on a loaded checkpoint: no validation pass, the stored scores decide
    loaded = NFATreeThreshold(calibrate_on_normal=True)
    loaded.load_state_dict(threshold.state_dict())
    loaded.set_false_alarm_rate(0.5)
    assert loaded.level == 11.0  # k = ceil(21 * 0.5) = 11
    segmented = loaded.segment(noisy_latents(0, spread=1.6), torch.rand(6, 1, 32, 32))
    assert torch.equal(segmented.mask, segmented.significance > 11.0)
    # a rate n images cannot support: the strictest level, and the log says how many are needed
    caplog.set_level("INFO", logger="uflow_exp.thresholds")
    strict = calibrated_on(scores, false_alarm_rate=0.01)
    assert strict.level == 20.0 and strict.promised_false_alarm_rate == pytest.approx(1 / 21)
    assert "cannot be promised with 20 normal validation images (at least 99 are needed)" in caplog.text


def test_a_false_alarm_rate_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="needs threshold.calibrate_on_normal=true"):
        NFATreeThreshold(false_alarm_rate=0.05)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\).*got 5"):
        NFATreeThreshold(calibrate_on_normal=True, false_alarm_rate=5)
    # a checkpoint calibrated before the scores were stored: its largest score still works ...
    old = NFATreeThreshold(calibrate_on_normal=True)
    old.load_state_dict({"calibrated_level": torch.tensor(7.5)})
    assert old.level == 7.5 and old.normal_scores.numel() == 0
    with pytest.raises(RuntimeError, match="recalibrate it with `python -m uflow_exp.evaluate"):
        old.set_false_alarm_rate(0.05)  # ... a rate needs them, and is refused at once


def test_calibrate_on_normal_never_lowers_the_nfa_level():
    z = noisy_latents(1, spread=0.5)  # under-dispersed: nothing significant on any image
    threshold = NFATreeThreshold(log_nfa_threshold=0.0, calibrate_on_normal=True, clip_lower_tail=True)
    amap = torch.rand(6, 1, 32, 32)
    threshold.calibration_update(
        threshold.significance_map(z, amap), amap, torch.zeros(6, 1, 32, 32, dtype=torch.bool)
    )
    threshold.calibrate()
    assert float(threshold.calibrated_level) < 0 and threshold.level == 0.0


def test_calibrate_on_normal_refuses_without_calibration_or_normal_images():
    threshold = NFATreeThreshold(calibrate_on_normal=True)
    with pytest.raises(RuntimeError, match="never calibrated.*calibrate_on_normal=false"):
        threshold.segment(noisy_latents(0), torch.rand(6, 1, 32, 32))
    amap = torch.rand(6, 1, 32, 32)
    threshold.calibration_update(
        threshold.significance_map(noisy_latents(0), amap), amap, torch.ones(6, 1, 32, 32, dtype=torch.bool)
    )
    with pytest.raises(RuntimeError, match="no normal image"):
        threshold.calibrate()


@pytest.mark.parametrize("mode", [NFATreeThreshold, NFABlockThreshold])
def test_uncalibrated_nfa_modes_keep_the_state_dict_of_older_checkpoints(mode):
    assert mode().state_dict() == {}  # checkpoints written before calibrate_on_normal load strictly
    mode().load_state_dict({})
    assert list(mode(calibrate_on_normal=True).state_dict()) == ["calibrated_level", "normal_scores"]


def test_refined_regions_keep_what_rises_to_half_of_their_own_peak():
    """Two flagged regions of one image, each around its own bump of the map: each shrinks to the pixels
    at least halfway from the image's median (0.1) to its own peak (0.9 and 0.5), and keeps its peak;
    an image without detections stays empty, so image-level decisions do not change."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = lambda cy, cx, peak: (peak - 0.1) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8)  # noqa: E731
    amap = torch.full((2, 1, 32, 32), 0.1)
    amap[0, 0] += bump(8, 8, 0.9) + bump(24, 24, 0.5)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 2:15, 2:15] = True  # max-tree blocks, much larger than the bumps
    mask[0, 0, 18:31, 18:31] = True
    refined = refine_regions(mask, amap, 0.5)
    first, second = amap[0, 0, :16, :16], amap[0, 0, 16:, 16:]
    assert torch.equal(
        refined[0, 0, :16, :16], (first >= 0.1 + 0.5 * (first.max() - 0.1)) & mask[0, 0, :16, :16]
    )
    assert torch.equal(
        refined[0, 0, 16:, 16:], (second >= 0.1 + 0.5 * (second.max() - 0.1)) & mask[0, 0, 16:, 16:]
    )
    assert refined[0, 0, 8, 8] and refined[0, 0, 24, 24]  # each region keeps its peak ...
    assert 0 < refined.sum() < mask.sum() / 4  # ... and far less than the blocks
    assert not refined[1].any() and torch.equal(refine_regions(mask, amap, 0.0), mask & (amap >= 0.1))


def test_the_nfa_threshold_refines_its_masks_only_when_asked():
    z = noisy_latents(0, spread=1.6)
    amap = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = NFATreeThreshold(clip_lower_tail=True, tests_by_size=True).segment(z, amap)
    refined = NFATreeThreshold(clip_lower_tail=True, tests_by_size=True, refine_fraction=0.5).segment(z, amap)
    assert plain.mask.any() and torch.equal(refined.significance, plain.significance)
    assert torch.equal(refined.mask, refine_regions(plain.mask, amap, 0.5))
    assert torch.equal(refined.mask.flatten(1).any(1), plain.mask.flatten(1).any(1))
    with pytest.raises(ValueError, match="refine_fraction must lie in"):
        NFATreeThreshold(refine_fraction=1.5)
