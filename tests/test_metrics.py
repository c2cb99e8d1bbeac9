import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage.measure import label as sk_label
from torchmetrics.classification import BinaryAUROC

from uflow_exp.metrics import (
    AnomalyMetrics,
    BestMIoU,
    ImageAUROC,
    PixelAUPRO,
    PixelAUROC,
    SegmentationMIoU,
)


def image_labels(gt):
    """Labels of hand-made test batches: an image is anomalous where its mask has a pixel."""
    return gt.flatten(1).any(dim=1)


def toy_two_regions():
    """One 4x4 image: region A (2 px, top row) and region B (4 px, bottom row), 10 normal pixels.

    A scores (0.95, 0.95), B scores (0.95, 0.75, 0.05, 0.05), normal pixels: one 0.85, two 0.55, seven 0.05.
    PRO curve, from the highest threshold: (0, 0) -> (0, 0.625) -> (0.1, 0.625) -> (0.1, 0.75) -> (0.3, 0.75)
    -> (1, 1), so AUPRO@0.3 = (0.1 * 0.625 + 0.2 * 0.75) / 0.3 = 17/24. Pixel-pooled overlap would give 2/3
    instead of 0.75 on the (0.55, 0.75] step, so the value also pins down the per-region averaging.
    """
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0, :2] = True
    gt[0, 0, 3, :] = True
    scores = torch.zeros(1, 1, 4, 4)
    scores[0, 0, 0, :2] = 0.95
    scores[0, 0, 3] = torch.tensor([0.95, 0.75, 0.05, 0.05])
    scores[~gt] = torch.tensor([0.85, 0.55, 0.55] + [0.05] * 7)
    return scores, gt


def random_batch(n_images=8, size=40, seed=0):
    """Continuous scores in [0, 1], higher on average on anomalous pixels; half the images are normal."""
    gen = torch.Generator().manual_seed(seed)
    gt = torch.zeros(n_images, 1, size, size, dtype=torch.bool)
    for i in range(0, n_images, 2):
        for _ in range(1 + i % 3):
            y, x = torch.randint(0, size - 8, (2,), generator=gen).tolist()
            h, w = torch.randint(2, 9, (2,), generator=gen).tolist()
            gt[i, 0, y : y + h, x : x + w] = True
    noise = torch.rand(gt.shape, generator=gen)
    scores = (0.7 * noise + 0.3 * gt.float() * torch.rand(gt.shape, generator=gen)).clamp(0, 1)
    return scores, gt


def exact_aupro(scores, gt, max_fpr=0.3):
    """Unbinned reference: the PRO curve at every distinct score, regions labelled by skimage."""
    scores, gt = scores[:, 0].double().numpy(), gt[:, 0].numpy()
    normal = np.sort(scores[~gt])
    regions = []
    for image_scores, mask in zip(scores, gt, strict=True):
        labels = sk_label(mask, connectivity=2)
        regions += [np.sort(image_scores[labels == r]) for r in range(1, labels.max() + 1)]

    def rate_at_or_above(sorted_values, thresholds):
        return 1.0 - np.searchsorted(sorted_values, thresholds, side="left") / len(sorted_values)

    thresholds = np.unique(scores)[::-1]
    fpr = np.concatenate([[0.0], rate_at_or_above(normal, thresholds)])
    pro = np.concatenate([[0.0], np.mean([rate_at_or_above(r, thresholds) for r in regions], axis=0)])
    end = np.searchsorted(fpr, max_fpr, side="right")
    x, y = fpr[:end], pro[:end]
    if end < len(fpr):
        t = (max_fpr - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
        x = np.append(x, max_fpr)
        y = np.append(y, pro[end - 1] + t * (pro[end] - pro[end - 1]))
    return float(np.trapezoid(y, x) / max_fpr)


def compute_quietly(metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute()


# --- hand-computed cases -------------------------------------------------------------------------------


def test_two_region_toy_by_hand():
    scores, gt = toy_two_regions()
    aupro, auroc, best = PixelAUPRO(n_bins=10), PixelAUROC(n_bins=10), BestMIoU(n_bins=10)
    for metric in (aupro, auroc, best):
        metric.update(scores, gt)
    assert aupro.compute().item() == pytest.approx(17 / 24, abs=1e-12)
    # The only bin shared by the classes (0.05) lies beyond FPR 0.3, so the AUPRO bound is exactly zero.
    assert aupro.error_bound().item() == 0.0
    # Mann-Whitney with ties: 3 * 10 wins for the 0.95s, 9 for the 0.75, 2 * 7 half-ties at 0.05.
    with pytest.warns(UserWarning, match="share bins"):
        assert auroc.compute().item() == pytest.approx(46 / 60, abs=1e-12)
    # Bound = 1/2 * (anomalous fraction 2/6) * (normal fraction 7/10) in the shared bin.
    assert auroc.error_bound().item() == pytest.approx(0.5 * (2 / 6) * (7 / 10), abs=1e-12)
    # Best threshold in (0.55, 0.75]: I = 4 of the 6 anomalous pixels, one false positive, U = 7.
    assert best.compute().item() == pytest.approx(4 / 7, abs=1e-6)


def test_regions_are_8_connected_within_an_image_only():
    gt = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0, 0] = gt[0, 0, 1, 1] = gt[0, 0, 1, 2] = True  # diagonal link: one 3-pixel region
    gt[1, 0, 0, 0] = True  # same position in the next image: a separate region
    scores = torch.full(gt.shape, 0.55)
    scores[gt] = 0.05
    scores[0, 0, 0, 0] = 0.95
    metric = PixelAUPRO(n_bins=10)
    metric.update(scores, gt)
    assert metric.n_regions.item() == 2
    # FPR jumps 0 -> 1 across the 0.55 bin while PRO stays at mean(1/3, 0); 4-connectivity would give 0.5/2.
    assert metric.compute().item() == pytest.approx((1 / 3 + 0) / 2, abs=1e-12)


def test_perfect_maps_score_one():
    _, gt = random_batch(6)
    seg = gt.clone()
    metrics = AnomalyMetrics(n_bins=100)
    metrics.update(gt.float(), gt, seg, labels=image_labels(gt))
    result = metrics.compute()
    normal = int((image_labels(gt) == 0).sum())
    assert result.pop("false_alarm_rate_ci_high") == pytest.approx(1 - 0.025 ** (1 / normal))  # 0 of n
    assert result == pytest.approx(
        {"image_auroc": 1, "pixel_auroc": 1, "pixel_aupro": 1, "best_miou": 1, "miou": 1, "pixel_f1": 1,
         "false_alarm_rate": 0, "false_alarm_rate_ci_low": 0, "detection_precision": 1,
         "detection_recall": 1, "oracle_recall_at_false_alarms": 1, "miou_anomalous": 1}
    )  # fmt: skip


def test_inverted_maps_score_zero():
    _, gt = random_batch(6)
    metrics = AnomalyMetrics(n_bins=100)
    metrics.update(1.0 - gt.float(), gt, labels=image_labels(gt))
    result = metrics.compute()
    assert result["pixel_auroc"] == 0.0
    assert result["pixel_aupro"] == 0.0
    assert set(result) == {"image_auroc", "pixel_auroc", "pixel_aupro", "best_miou"}


def test_image_auroc_of_a_perfect_ranking_is_exactly_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(10), torch.ones(20)]).long()
    scores = torch.rand(30, generator=g) * 0.5 + labels * 0.5  # torchmetrics alone gives 1.0000001 here
    metric = ImageAUROC()
    metric.update(scores.view(-1, 1, 1, 1), labels)
    assert metric.compute().item() == 1.0


def test_image_auroc_uses_the_max_score():
    maps = torch.full((4, 1, 8, 8), 0.2)
    gt = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    gt[:2, 0, 0, 0] = True
    maps[2:, 0, 5, 5] = 0.9  # normal images with one bright pixel outrank both anomalous images
    metric = ImageAUROC()
    metric.update(maps, image_labels(gt))
    assert metric.compute().item() == 0.0
    maps[0, 0, 3, 3] = 1.0  # now one anomalous image ranks first: wins 2 of the 4 pairs
    metric.reset()
    metric.update(maps, image_labels(gt))
    assert metric.compute().item() == pytest.approx(0.5)


def test_segmentation_miou_and_f1_by_hand():
    gt = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    seg = torch.zeros_like(gt)
    gt[0, 0, 0, :4] = True
    seg[0, 0, 0, :2] = True  # I = 2, U = 4
    seg[1, 0, 2, 2] = True  # normal image, one false positive: IoU ~ 0
    # image 2: normal, nothing detected: IoU = 1
    metrics = AnomalyMetrics(n_bins=10)
    metrics.update(torch.rand(gt.shape), gt, seg, labels=image_labels(gt))
    result = compute_quietly(metrics)
    assert result["miou"] == pytest.approx((2 / 4 + 0 + 1) / 3, abs=1e-12)
    # Pooled: TP = 2, FP = 1, FN = 2 -> 2 * 2 / (2 * 2 + 1 + 2).
    assert result["pixel_f1"] == pytest.approx(4 / 7, abs=1e-6)


def test_detection_operating_point_by_hand():
    gt = torch.zeros(6, 1, 4, 4, dtype=torch.bool)
    gt[:3, 0, 1, 1] = True  # images 0-2 anomalous, 3-5 normal
    seg = torch.zeros_like(gt)
    seg[0, 0, 1, 1] = True  # hit: IoU 1
    seg[1, 0, 3, 3] = True  # detected, but elsewhere: IoU ~ 0
    seg[3, 0, 0, 0] = True  # a false alarm on a normal image; images 2, 4 and 5 left clean
    amap = torch.zeros(6, 1, 4, 4)
    amap[:, 0, 2, 2] = torch.tensor([0.9, 0.5, 0.3, 0.6, 0.4, 0.1])  # each image's score (its max)
    metrics = AnomalyMetrics(n_bins=10)
    metrics.update(amap, gt, seg, labels=image_labels(gt))
    result = compute_quietly(metrics)
    assert result["false_alarm_rate"] == pytest.approx(1 / 3)  # 1 of 3 normal images
    assert result["detection_recall"] == pytest.approx(2 / 3)  # 2 of 3 anomalous images
    assert result["detection_precision"] == pytest.approx(2 / 3)  # 2 of the 3 flagged images
    assert result["miou_anomalous"] == (1 + 0 + 0) / 3  # a missed defect scores 0 exactly
    # exact 95 % interval of 1 flagged in 3: P(X >= 1 | low) = P(X <= 1 | high) = 2.5 %
    low, high = result["false_alarm_rate_ci_low"], result["false_alarm_rate_ci_high"]
    assert low == pytest.approx(1 - 0.975 ** (1 / 3), rel=1e-6)
    assert (1 - high) ** 3 + 3 * high * (1 - high) ** 2 == pytest.approx(0.025, rel=1e-6)
    # one false alarm allowed: a threshold may flag the 0.6 normal image, not the 0.4 one, so it
    # finds the anomalous images scored 0.9 and 0.5, not the 0.3 one
    assert result["oracle_recall_at_false_alarms"] == pytest.approx(2 / 3)
    # Undefined rates are NaN, not a convention: no detections at all, no normal images.
    empty = AnomalyMetrics(n_bins=10)
    empty.update(torch.rand(3, 1, 4, 4), gt[:3], torch.zeros_like(gt[:3]), labels=image_labels(gt[:3]))
    undefined = compute_quietly(empty)
    assert math.isnan(undefined["false_alarm_rate"]) and math.isnan(undefined["detection_precision"])
    assert undefined["detection_recall"] == 0.0


def test_normal_image_without_detection_scores_one():
    metric = SegmentationMIoU()
    metric.update(torch.zeros(1, 1, 8, 8, dtype=torch.bool), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    assert metric.compute().item() == 1.0


# --- edge cases ----------------------------------------------------------------------------------------


def test_only_normal_images_give_nan_with_warnings():
    maps = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    gt = torch.zeros(maps.shape, dtype=torch.bool)
    metrics = AnomalyMetrics(n_bins=50)
    metrics.update(maps, gt, torch.zeros_like(gt), labels=image_labels(gt))
    with pytest.warns(UserWarning, match="undefined") as record:
        result = metrics.compute()
    messages = " ".join(str(w.message) for w in record)
    for name in ("Image AUROC", "Pixel AUROC", "Pixel AUPRO"):
        assert name in messages
    assert math.isnan(result["image_auroc"])
    assert math.isnan(result["pixel_auroc"])
    assert math.isnan(result["pixel_aupro"])
    # The "detect nothing" threshold is perfect on a normal-only set, as is an empty segmentation.
    assert result["best_miou"] == 1.0
    assert result["miou"] == 1.0
    assert result["pixel_f1"] == 1.0


def test_all_zero_maps():
    _, gt = random_batch(4)
    metrics = AnomalyMetrics(n_bins=100)
    metrics.update(torch.zeros(gt.shape), gt, labels=image_labels(gt))
    with pytest.warns(UserWarning, match="share bins"):
        result = metrics.compute()
    assert result["image_auroc"] == 0.5
    assert result["pixel_auroc"] == 0.5
    # One tie: the curve is the diagonal, so the area up to 0.3 is 0.3 * 0.15, normalised -> 0.15.
    assert result["pixel_aupro"] == pytest.approx(0.15, abs=1e-12)
    # Detecting nothing scores 1 on the two normal images and ~0 on the two anomalous ones.
    assert result["best_miou"] == pytest.approx(0.5, abs=1e-6)


def test_invalid_inputs_raise():
    scores, gt = toy_two_regions()
    metrics = AnomalyMetrics(n_bins=10)
    metrics.update(scores, gt, labels=image_labels(gt))
    with pytest.raises(ValueError, match="every batch"):
        metrics.update(scores, gt, gt, labels=image_labels(gt))
    with pytest.raises(ValueError, match="NaN"):
        PixelAUROC().update(torch.full(gt.shape, float("nan")), gt)
    with pytest.raises(ValueError, match="differ"):
        PixelAUROC().update(scores, gt[..., :2])
    metrics.reset()
    metrics.update(scores, gt, gt, labels=image_labels(gt))  # after reset a run may switch to segmentations
    assert "miou" in compute_quietly(metrics)


# --- binning accuracy, chunking, memory ----------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [16, 1000])
def test_binned_values_within_documented_bound_of_exact(n_bins):
    scores, gt = random_batch(8, seed=n_bins)
    auroc, aupro = PixelAUROC(n_bins), PixelAUPRO(n_bins)
    auroc.update(scores, gt)
    aupro.update(scores, gt)

    exact = BinaryAUROC()
    exact.update(scores.flatten(), gt.flatten().long())
    exact_auroc = exact.compute().item()
    exact_pro = exact_aupro(scores, gt)
    assert 0.6 < exact_auroc < 0.95 and 0.2 < exact_pro < 0.9  # a non-degenerate case

    binned_auroc, bound_auroc = compute_quietly(auroc).item(), auroc.error_bound().item()
    binned_pro, bound_pro = compute_quietly(aupro).item(), aupro.error_bound().item()
    # 1e-6 absorbs torchmetrics' float32 arithmetic in the exact AUROC.
    assert abs(binned_auroc - exact_auroc) <= bound_auroc + 1e-6
    assert abs(binned_pro - exact_pro) <= bound_pro + 1e-9
    if n_bins == 16:
        assert abs(binned_auroc - exact_auroc) > 1e-4  # coarse bins really do move the value
    else:
        assert bound_auroc < 2e-3 and bound_pro < 2e-3


def test_chunked_updates_equal_one_update():
    scores, gt = random_batch(8, seed=3)
    seg = scores > 0.6
    whole, chunked = AnomalyMetrics(n_bins=500), AnomalyMetrics(n_bins=500)
    whole.update(scores, gt, seg, labels=image_labels(gt))
    for lo, hi in ((0, 3), (3, 4), (4, 8)):
        chunked.update(scores[lo:hi], gt[lo:hi], seg[lo:hi], labels=image_labels(gt[lo:hi]))
    expected = compute_quietly(whole)
    assert compute_quietly(chunked) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0 < expected["miou"] < 1 and 0 < expected["pixel_f1"] < 1


def test_pixel_metric_state_does_not_grow_with_pixels():
    def state_numel(metric):
        states = metric.metric_state.values()
        return sum(sum(t.numel() for t in s) if isinstance(s, list) else s.numel() for s in states)

    metrics = [PixelAUROC(256), PixelAUPRO(256), BestMIoU(256), SegmentationMIoU()]
    sizes = [state_numel(m) for m in metrics]
    assert sizes[:3] == [2 * 256, 2 * 256 + 1, 256 + 2]
    for seed in range(4):
        scores, gt = random_batch(6, size=96, seed=seed)
        for metric in metrics[:3]:
            metric.update(scores, gt)
        metrics[3].update(scores > 0.5, gt)
    assert [state_numel(m) for m in metrics] == sizes

    image_auroc = ImageAUROC()  # exact: grows by one score and one label per image, not per pixel
    scores, gt = random_batch(6, size=96)
    image_auroc.update(scores, image_labels(gt))
    assert state_numel(image_auroc) == 2 * 6


# --- DDP ------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        scores, gt = random_batch(8, seed=5)
        part = slice(0, 5) if rank == 0 else slice(5, 8)  # uneven shards exercise the padded gather
        metrics = AnomalyMetrics(n_bins=500)
        metrics.update(scores[part], gt[part], scores[part] > 0.6, labels=image_labels(gt[part]))
        result = compute_quietly(metrics)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ddp_sync_matches_single_process(tmp_path):
    out_file = tmp_path / "result.json"
    # Forking skips re-importing torch in each child, which dominates the run time of a spawn.
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, start_method="fork"
    )
    scores, gt = random_batch(8, seed=5)
    single = AnomalyMetrics(n_bins=500)
    single.update(scores, gt, scores > 0.6, labels=image_labels(gt))
    assert json.loads(out_file.read_text()) == pytest.approx(compute_quietly(single), rel=1e-12, abs=1e-12)


def test_curves_match_the_areas_and_end_points():
    from uflow_exp.metrics import AnomalyMetrics

    g = torch.Generator().manual_seed(3)
    gt = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    gt[1, 0, 2:6, 2:6] = True
    gt[2, 0, 8:12, 3:9] = True
    amap = (torch.rand(4, 1, 16, 16, generator=g) * 0.6 + gt * 0.3).clamp(0, 1)
    metrics = AnomalyMetrics(n_bins=100)
    metrics.update(amap, gt, labels=image_labels(gt))
    curves = metrics.curves()
    values = metrics.compute()
    fpr, tpr = curves["roc"]
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(values["pixel_auroc"], abs=1e-9)
    fpr, pro = curves["pro"]
    inside = fpr <= 0.3
    assert pro[-1].item() == pytest.approx(1.0)
    assert torch.all(pro[1:] >= pro[:-1]) and torch.all(fpr[inside] <= 0.3)


def test_curves_leave_out_what_is_undefined():
    from uflow_exp.metrics import AnomalyMetrics

    metrics = AnomalyMetrics(n_bins=10)
    metrics.update(
        torch.rand(2, 1, 8, 8),
        torch.zeros(2, 1, 8, 8, dtype=torch.bool),
        labels=image_labels(torch.zeros(2, 1, 8, 8, dtype=torch.bool)),
    )
    assert metrics.curves() == {}


def test_image_auroc_takes_labels_not_masks():
    # Anomalous images without masks (image-level labels only): the masks are empty, the labels are not.
    maps = torch.full((4, 1, 8, 8), 0.1)
    maps[2:, 0, 4, 4] = 0.9
    labels = torch.tensor([0, 0, 1, 1])
    metrics = AnomalyMetrics(n_bins=100)
    metrics.update(maps, torch.zeros(4, 1, 8, 8, dtype=torch.bool), labels=labels,
                   has_mask=torch.tensor([True, True, False, False]))  # fmt: skip
    result = compute_quietly(metrics)
    assert result == {"image_auroc": 1.0}  # pixel metrics absent, not NaN


def test_pixel_metrics_skip_images_without_pixel_truth():
    scores, gt = random_batch(6, seed=2)
    labels = image_labels(gt)
    has_mask = torch.ones(6, dtype=torch.bool)
    unmasked = int(torch.nonzero(labels)[0])
    has_mask[unmasked] = False
    with_gap = AnomalyMetrics(n_bins=200)
    with_gap.update(scores, torch.where(has_mask.view(-1, 1, 1, 1), gt, False), scores > 0.6,
                    labels=labels, has_mask=has_mask)  # fmt: skip
    masked_only = AnomalyMetrics(n_bins=200)
    masked_only.update(scores[has_mask], gt[has_mask], scores[has_mask] > 0.6, labels=labels[has_mask])
    full = AnomalyMetrics(n_bins=200)
    full.update(scores, gt, labels=labels)
    a, b, c = (compute_quietly(m) for m in (with_gap, masked_only, full))
    image_level = {
        "image_auroc",
        "false_alarm_rate",
        "false_alarm_rate_ci_low",
        "false_alarm_rate_ci_high",
        "detection_precision",
        "detection_recall",
        "oracle_recall_at_false_alarms",
    }
    assert {k: v for k, v in a.items() if k not in image_level} == {
        k: v for k, v in b.items() if k not in image_level
    }
    assert a["image_auroc"] == c["image_auroc"]  # every image counts at image level
    assert a["detection_recall"] == (scores[labels.bool()] > 0.6).flatten(1).any(1).double().mean()


def _mann_whitney(scores: np.ndarray, positive: np.ndarray) -> float:
    """Tie-aware AUROC by counting every (positive, negative) pair."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _per_image_iou(seg: np.ndarray, gt: np.ndarray) -> np.ndarray:
    inter = (seg & gt).reshape(len(seg), -1).sum(1)
    union = (seg | gt).reshape(len(seg), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_brute_force_on_random_data(seed):
    """Image AUROC, pixel AUROC, mIoU, pixel F1, best single-threshold mIoU and the detection rates of
    random maps, masks and segmentations, fed in uneven batches, against direct computations over all
    pixels, images and thresholds. Scores sit mid-bin, so binning loses nothing and the values must
    agree exactly."""
    rng = np.random.default_rng(seed)
    n_images, side, n_bins = 13, 6, 20
    labels = np.r_[np.zeros(5, bool), np.ones(8, bool)]
    gt = np.zeros((n_images, 1, side, side), bool)
    for i in np.flatnonzero(labels):
        r, c, h, w = rng.integers(0, 4), rng.integers(0, 4), rng.integers(1, 3), rng.integers(1, 3)
        gt[i, 0, r : r + h, c : c + w] = True
    maps = (rng.integers(0, n_bins, gt.shape) + 0.5) / n_bins
    maps = np.where(gt, np.minimum(maps + 0.3, (n_bins - 0.5) / n_bins), maps).astype(np.float32)
    seg = rng.random(gt.shape) < np.where(gt, 0.6, 0.05)
    seg[0] = False  # a clean normal image

    metrics = AnomalyMetrics(n_bins=n_bins)
    for start, stop in ((0, 4), (4, 5), (5, 13)):
        metrics.update(
            torch.from_numpy(maps[start:stop]),
            torch.from_numpy(gt[start:stop]),
            torch.from_numpy(seg[start:stop]),
            labels=torch.from_numpy(labels[start:stop].astype(np.int64)),
        )
    got = metrics.compute()

    assert got["image_auroc"] == pytest.approx(
        _mann_whitney(maps.reshape(n_images, -1).max(1), labels), abs=1e-6
    )
    assert got["pixel_auroc"] == pytest.approx(_mann_whitney(maps.ravel(), gt.ravel()), abs=1e-9)
    assert got["miou"] == pytest.approx(_per_image_iou(seg, gt).mean(), abs=1e-9)
    tp, fp, fn = (seg & gt).sum(), (seg & ~gt).sum(), (~seg & gt).sum()
    assert got["pixel_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    best = max(_per_image_iou(maps >= k / n_bins, gt).mean() for k in range(n_bins + 1))
    assert got["best_miou"] == pytest.approx(best, abs=1e-9)
    flagged = seg.reshape(n_images, -1).any(1)
    assert got["false_alarm_rate"] == pytest.approx(flagged[~labels].mean())
    assert got["detection_recall"] == pytest.approx(flagged[labels].mean())
    assert got["detection_precision"] == pytest.approx(labels[flagged].mean())
    assert got["miou_anomalous"] == pytest.approx(_per_image_iou(seg, gt)[labels].mean(), abs=1e-9)
