"""The image score standardised per scale (`model.image_score_standardize`): its statistics, and where
training sets and stores them."""

import logging

import pytest
import torch
from hydra.utils import instantiate

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.image_score import MIN_NORMAL_IMAGES, ScalePeakStandardizer
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.train import train


def _maps_with_peaks(peaks: torch.Tensor) -> torch.Tensor:
    """(B, S, 8, 8) maps whose maximum per image and scale is ``peaks`` (B, S), the rest below it."""
    maps = peaks[:, :, None, None] - torch.rand(
        *peaks.shape, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    maps[:, :, 3, 5] = peaks
    return maps


def test_each_scale_is_measured_in_standard_deviations_of_the_normal_peaks():
    generator = torch.Generator().manual_seed(1)
    # two scales: the first's normal peaks spread widely, the second's are steady
    normal = torch.stack(
        [torch.rand(12, generator=generator) * 4, 1 + 0.1 * torch.rand(12, generator=generator)], 1
    )
    standardizer = ScalePeakStandardizer(2)
    assert not standardizer.is_fitted()
    standardizer.update(_maps_with_peaks(normal[:5]))
    standardizer.update(_maps_with_peaks(normal[5:]))
    standardizer.fit()
    assert standardizer.is_fitted() and int(standardizer.normal_images) == 12
    torch.testing.assert_close(standardizer.mean, normal.mean(0))
    torch.testing.assert_close(standardizer.std, normal.std(0))
    # a new image whose peak is 0.5 above the normal mean at each scale: far more unusual at the steady one
    test = normal.mean(0, keepdim=True) + 0.5
    score = standardizer.score_map(_maps_with_peaks(test)).amax()
    torch.testing.assert_close(score, (0.5 / normal.std(0)).max())
    assert score == pytest.approx(float(0.5 / normal[:, 1].std()), rel=1e-5)


def test_too_few_normal_images_leave_it_unfitted_and_say_so(caplog):
    standardizer = ScalePeakStandardizer(2)
    standardizer.update(_maps_with_peaks(torch.rand(MIN_NORMAL_IMAGES, 2)))
    standardizer.fit()
    assert standardizer.is_fitted()
    standardizer.update(_maps_with_peaks(torch.rand(MIN_NORMAL_IMAGES - 1, 2)))  # a refit starts afresh
    with caplog.at_level(logging.WARNING):
        standardizer.fit()
    assert not standardizer.is_fitted()
    assert (
        f"{MIN_NORMAL_IMAGES - 1} normal validation image(s), fewer than the {MIN_NORMAL_IMAGES}"
        in caplog.text
    )


def _peaks(module: UFlowModule, loader, scales: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's peak of each of the ``scales`` coarsest scales' own maps, recomputed from the
    latents, and the labels."""
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
            peaks.append(maps.flatten(2).amax(2))
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
    # a test image's score: its largest peak over the two scales, in those units
    peaks, _ = _peaks(module, datamodule.test_dataloader(), 2)
    scores = torch.cat(
        [
            module.predict_step({"image": b["image"]})["image_score"].detach()
            for b in datamodule.test_dataloader()
        ]
    )
    torch.testing.assert_close(
        scores, ((peaks - normal.mean(0)) / normal.std(0)).amax(1), rtol=1e-4, atol=1e-5
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
    normal = module.model.scale_maps(z[-2:], 64).flatten(2).amax(2)
    assert int(module.score_standardizer.normal_images) == 12
    torch.testing.assert_close(module.score_standardizer.mean, normal.mean(0))
    torch.testing.assert_close(module.score_standardizer.std, normal.std(0))
