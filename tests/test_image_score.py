"""The image score standardised per scale (`model.image_score_standardize`): its statistics, and where
training sets and stores them."""

import logging
import math

import pytest
import torch
from hydra.utils import instantiate

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.image_score import MIN_NORMAL_IMAGES, ScalePeakStandardizer
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.train import train


def _maps(peaks: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(B, S, 8, 8) maps at ``levels`` (B, S) everywhere but one pixel, at ``peaks``: 63 of 64 pixels at
    the level, so the 0.8 level is it and the relative peak is ``peaks - levels``."""
    maps = levels[:, :, None, None].expand(-1, -1, 8, 8).clone()
    maps[:, :, 3, 5] = peaks
    return maps


def test_each_peak_is_measured_in_standard_deviations_of_the_normal_peaks():
    generator = torch.Generator().manual_seed(1)
    # two scales: the first's normal peaks spread widely, the second's are steady
    peaks = torch.stack(
        [torch.rand(12, generator=generator) * 4, 1 + 0.1 * torch.rand(12, generator=generator)], 1
    )
    levels = peaks - 0.2 - 0.05 * torch.rand(12, 2, generator=generator)  # rises of 0.20-0.25
    standardizer = ScalePeakStandardizer(2)
    assert not standardizer.is_fitted()
    standardizer.update(_maps(peaks[:5], levels[:5]))
    standardizer.update(_maps(peaks[5:], levels[5:]))
    standardizer.fit()
    assert standardizer.is_fitted() and int(standardizer.normal_images) == 12
    rises = peaks - levels
    torch.testing.assert_close(standardizer.mean, torch.stack([peaks.mean(0), rises.mean(0)]))
    torch.testing.assert_close(standardizer.std, torch.stack([peaks.std(0), rises.std(0)]))
    # 0.5 above the normal mean at each scale, rising as usual: far more unusual at the steady scale
    test = peaks.mean(0, keepdim=True) + 0.5
    score = standardizer.score_map(_maps(test, test - rises.mean(0))).amax()
    assert score == pytest.approx(float(0.5 / peaks[:, 1].std()), rel=1e-5)
    # an ordinary absolute peak that rises 1.0 above a low rest of its image: caught by the relative peak
    score = standardizer.score_map(_maps(peaks.mean(0, keepdim=True), peaks.mean(0, keepdim=True) - 1.0))
    expected = ((1.0 - rises.mean(0)) / rises.std(0)).max()
    assert score.amax() == pytest.approx(float(expected), rel=1e-5) and expected > 10


def test_too_few_normal_images_leave_it_unfitted_and_say_so(caplog):
    standardizer = ScalePeakStandardizer(2)
    standardizer.update(_maps(torch.rand(MIN_NORMAL_IMAGES, 2) + 1, torch.rand(MIN_NORMAL_IMAGES, 2)))
    standardizer.fit()
    assert standardizer.is_fitted()
    standardizer.update(
        _maps(torch.rand(MIN_NORMAL_IMAGES - 1, 2) + 1, torch.rand(MIN_NORMAL_IMAGES - 1, 2))
    )  # a refit starts afresh
    with caplog.at_level(logging.WARNING):
        standardizer.fit()
    assert not standardizer.is_fitted()
    assert (
        f"{MIN_NORMAL_IMAGES - 1} normal validation image(s), fewer than the {MIN_NORMAL_IMAGES}"
        in caplog.text
    )


def _hand_peaks(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, S): the absolute peak and the peak above the 0.8 level (the ceil(0.8 N)-th smallest of N
    pixels) of each image's (B, S, H, W) maps, by sorting."""
    flat = maps.flatten(2)
    level = flat.sort(dim=2).values[..., math.ceil(0.8 * flat.shape[2]) - 1]
    peak = flat.amax(2)
    return torch.stack([peak, peak - level], 1)


def _peaks(module: UFlowModule, loader, scales: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hand_peaks` of each image's ``scales`` coarsest scales' own maps, recomputed from the latents,
    and the labels."""
    peaks, labels = [], []
    with torch.no_grad():
        for batch in loader:
            z, _ = module.model.encode(
                module.model.normalize(module.model.extract(batch["image"])), jac=False
            )
            maps = 1.0 - torch.cat(
                [torch.nn.functional.interpolate(p, size=module.eval_size, mode="bilinear") for p in
                 module.model.likelihoods(z[-scales:])], dim=1
            )  # fmt: skip
            peaks.append(_hand_peaks(maps))
            labels.append(batch["label"])
    return torch.cat(peaks), torch.cat(labels)


def test_training_sets_the_statistics_on_the_normal_validation_images_and_the_score_reads_them(tmp_path):
    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=60, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "model.image_score_scales=2"]
    cfg = compose_train([*TINY, *data], tmp_path / "run")
    assert cfg.model.image_score_standardize  # the default
    train(cfg)
    module = UFlowModule.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt")).eval()
    standardizer = module.score_standardizer
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    normal, labels = _peaks(module, datamodule.val_dataloader(), 2)
    assert (labels == 0).all() and int(standardizer.normal_images) == len(normal) == 12  # 20 % of 60
    torch.testing.assert_close(standardizer.mean, normal.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(standardizer.std, normal.std(0), rtol=1e-4, atol=1e-6)
    # a test image's score: its largest peak over the two scales and the two kinds, in those units
    peaks, _ = _peaks(module, datamodule.test_dataloader(), 2)
    scores = torch.cat(
        [
            module.predict_step({"image": b["image"]})["image_score"].detach()
            for b in datamodule.test_dataloader()
        ]
    )
    torch.testing.assert_close(
        scores, ((peaks - normal.mean(0)) / normal.std(0)).flatten(1).amax(1), rtol=1e-4, atol=1e-5
    )


def test_only_the_normal_images_of_a_validation_batch_set_the_statistics(tmp_path):
    module = instantiate(compose_train([*TINY, "model.image_score_scales=2"], tmp_path).model).eval()
    images = torch.rand(15, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0] * 12 + [1] * 3)
    images[12:] *= 3.0  # anomalous ones: brighter, other peaks
    with torch.no_grad():
        module._maps({"image": images, "label": labels}, significance=False, score_calibration=True)
        z, _ = module.model(images[:12])
    module.score_standardizer.fit()
    normal = _hand_peaks(module.model.scale_maps(z[-2:], 64))
    assert int(module.score_standardizer.normal_images) == 12
    torch.testing.assert_close(module.score_standardizer.mean, normal.mean(0))
    torch.testing.assert_close(module.score_standardizer.std, normal.std(0))
