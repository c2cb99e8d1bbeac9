"""The base mixture (``flow.base_mixture_components``): its density, its fit, and where the map reads it."""

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import distributions as D

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.anomaly_map import anomaly_map, merged_map, standard_likelihood
from uflow_exp.models.uflow.base_mixture import LatentMixture
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.models.uflow.model import UFlow
from uflow_exp.tasks.train import train
from uflow_exp.thresholds import _NFAThreshold


def _mixture(channels: int, components: int, seed: int = 0) -> LatentMixture:
    """A fitted-looking mixture with random parameters."""
    generator = torch.Generator().manual_seed(seed)
    mixture = LatentMixture([channels], components)
    mixture.mean_0.copy_(torch.randn(components, channels, generator=generator))
    mixture.var_0.copy_(0.2 + torch.rand(components, channels, generator=generator))
    mixture.log_weight_0.copy_(torch.log_softmax(torch.randn(components, generator=generator), 0))
    mixture.fitted.fill_(True)
    return mixture


def test_one_standard_component_gives_the_methods_likelihood():
    mixture = LatentMixture([6], 1)  # mean 0, variance 1, weight 1 as built
    z = 2.0 * torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixture.likelihood(z, 0), standard_likelihood(z), rtol=1e-5, atol=1e-7)


def test_the_likelihood_is_the_mixtures_density_per_channel_against_the_standard_normals_peak():
    channels, components = 5, 3
    mixture = _mixture(channels, components)
    z = 1.5 * torch.randn(2, channels, 4, 3, generator=torch.Generator().manual_seed(1))
    reference = D.MixtureSameFamily(
        D.Categorical(logits=mixture.log_weight_0),
        D.Independent(D.Normal(mixture.mean_0, mixture.var_0.sqrt()), 1),
    )
    log_density = reference.log_prob(z.permute(0, 2, 3, 1))  # (B, h, w)
    expected = torch.exp((log_density + 0.5 * channels * math.log(2 * math.pi)) / channels)[:, None]
    torch.testing.assert_close(mixture.likelihood(z, 0), expected, rtol=1e-4, atol=0)


def test_fit_finds_the_components_of_a_known_mixture():
    generator = torch.Generator().manual_seed(2)
    near = torch.randn(6000, 3, generator=generator) * 0.5 + torch.tensor([4.0, 0.0, -1.0])
    far = torch.randn(14000, 3, generator=generator) - torch.tensor([4.0, 0.0, -1.0])
    mixture = LatentMixture([3], 2, fit_points=20_000)
    assert not mixture.is_fitted()
    mixture.fit([torch.cat([near, far])])
    assert mixture.is_fitted()
    order = mixture.mean_0[:, 0].argsort(descending=True)
    torch.testing.assert_close(
        mixture.mean_0[order], torch.tensor([[4.0, 0, -1], [-4, 0, 1]]), atol=0.05, rtol=0
    )
    torch.testing.assert_close(mixture.var_0[order], torch.tensor([[0.25] * 3, [1.0] * 3]), atol=0.05, rtol=0)
    torch.testing.assert_close(mixture.log_weight_0[order].exp(), torch.tensor([0.3, 0.7]), atol=0.01, rtol=0)
    # where the data are is likely; between the components, where the standard normal peaks, is not
    points = torch.tensor([[4.0, 0, -1], [-4, 0, 1], [0, 0, 0]])[:, :, None, None]
    likelihood = mixture.likelihood(points, 0).flatten()
    assert likelihood[0] > 1.0  # the narrow component: likelier than the standard normal's peak
    assert likelihood[1] > 0.8 and likelihood[2] < 0.1


def test_fit_refuses_latents_it_cannot_fit_and_names_the_key():
    mixture = LatentMixture([3, 4], 8)
    with pytest.raises(ValueError, match="latents of 2 scales"):
        mixture.fit([torch.zeros(100, 3)])
    with pytest.raises(
        ValueError, match=r"scale 1: expected latent vectors of 4 channels, got shape \(100, 5\)"
    ):
        mixture.fit([torch.randn(100, 3), torch.randn(100, 5)])
    with pytest.raises(ValueError, match=r"base_mixture_components: .* give 5 latent vectors at scale 1"):
        mixture.fit([torch.randn(100, 3), torch.randn(5, 4)])
    with pytest.raises(ValueError, match="base_mixture_components must be >= 1"):
        LatentMixture([3], 0)


def test_small_data_fit_fewer_components_and_say_so(caplog):
    mixture = LatentMixture([3, 4], 8)
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(4))
    mixture.fit([x, x[:45, :1].repeat(1, 4)])  # 45 vectors: 4 components of at least 10 each
    assert "45 latent vectors at scale 1 fit 4 of the 8 components" in caplog.text
    assert torch.isfinite(mixture.log_weight_0).all()
    weights = mixture.log_weight_1.exp()
    assert (weights[4:] == 0).all() and weights.sum() == pytest.approx(1.0)
    likelihood = mixture.likelihood(torch.randn(2, 4, 3, 3), 1)
    assert torch.isfinite(likelihood).all() and (likelihood > 0).all()


def _model(components: int) -> UFlow:
    torch.manual_seed(0)
    return UFlow(
        "resnet18", input_size=64, flow_steps=1, pretrained=False, base_mixture_components=components
    )


def test_the_map_reads_the_mixture_once_it_is_fitted_at_every_scale_it_is_given():
    model = _model(2).eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, _ = model(images)
    assert torch.equal(model.anomaly_map(z, 32), anomaly_map(z, 32))  # unfitted: the method's map exactly
    model.base_mixture.fit([zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1]) for zs in z])
    mixture = model.base_mixture
    for first in (0, 1, 2):  # all scales, and the coarsest ones alone (the image score's)
        expected = merged_map([mixture.likelihood(z[i], i) for i in range(first, len(z))], 32)
        got = model.anomaly_map(z[first:], 32)
        assert torch.equal(got, expected)
        assert not torch.allclose(got, anomaly_map(z[first:], 32))
    assert model.anomaly_map(z, 32).min() >= 0.0  # likelihoods above 1 are clipped, not negative maps


def test_the_authors_weights_load_into_a_model_with_a_mixture_which_stays_unfitted():
    model = _model(4)
    reference = {k: v for k, v in _model(0).state_dict().items()}
    model.load_reference_state_dict(reference)
    assert not model.base_mixture.is_fitted()
    assert torch.equal(model.flow.module_list[0].w_perm, reference["flow.module_list.0.w_perm"])


def test_training_fits_the_mixture_of_the_tested_checkpoint_and_evaluation_reads_it(tmp_path, monkeypatch):
    from uflow_exp.tasks.evaluate import evaluate

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    data = ["dataset=mvtec", f"dataset.root={root}", "flow.base_mixture_components=4"]
    fits, calibrations = [], []
    fit, calibrate = UFlowModule.fit_base_mixture, _NFAThreshold.calibrate
    monkeypatch.setattr(UFlowModule, "fit_base_mixture", lambda self, *a: fits.append(1) or fit(self, *a))
    monkeypatch.setattr(_NFAThreshold, "calibrate", lambda self: calibrations.append(1) or calibrate(self))
    trained = train(compose_train([*TINY, *data], tmp_path / "run"))
    monkeypatch.undo()
    best, last = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))  # epoch_000.ckpt, last.ckpt
    modules = [UFlowModule.from_checkpoint(str(path)) for path in (best, last)]
    assert all(module.model.base_mixture.is_fitted() for module in modules)
    # one epoch: the best checkpoint is the last one, whose flow is fitted and calibrated once for both
    assert len(fits) == 1 and len(calibrations) == 1
    assert torch.equal(modules[0].model.base_mixture.mean_2, modules[1].model.base_mixture.mean_2)
    levels = [module.threshold.calibrated_level for module in modules]
    assert torch.isfinite(levels[0]) and torch.equal(levels[0], levels[1])
    # the stored mixture is the one this checkpoint's flow fits to the training latents, again
    module = modules[-1]
    stored = {k: v.clone() for k, v in module.model.base_mixture.state_dict().items()}
    datamodule = instantiate(compose_train([*TINY, *data], tmp_path / "refit").dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.fit_base_mixture(datamodule.train_dataloader())
    for key, value in module.model.base_mixture.state_dict().items():
        torch.testing.assert_close(value, stored[key], rtol=1e-4, atol=1e-5, msg=key)
    ckpt = f"ckpt_path={best}"  # the one training tested
    # under the bfloat16 autocast a user's machine may pick: the maps are still float32
    overrides = [*data, "logger=csv", "trainer=cpu", "trainer.precision=bf16-mixed", ckpt]
    evaluated = evaluate(compose_train(overrides, tmp_path / "eval", "eval"))
    assert evaluated["test/pixel_auroc"] == pytest.approx(trained["test/pixel_auroc"], rel=1e-6)
