"""The relative pixel map (`model.map_relative_quantile`): each image's map against its own level."""

from __future__ import annotations

import pytest
import torch

from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.anomaly_map import relative_map


def test_relative_map_subtracts_each_images_own_order_statistic():
    amap = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]).view(1, 1, 2, 5)
    # 10 pixels, quantile 0.75: the ceil(7.5) = 8th smallest, 0.8
    expected = (1.0 + amap - 0.8) / 2
    assert torch.allclose(relative_map(amap, 0.75), expected)
    assert torch.allclose(relative_map(amap, 0.1), (1.0 + amap - 0.1) / 2)  # 1st smallest


def test_a_map_shifted_as_a_whole_becomes_its_unshifted_peer():
    torch.manual_seed(0)
    base = torch.rand(1, 1, 16, 16) * 0.5
    warm = base + 0.3  # the same image, warm all over (another patient's contrast)
    out = relative_map(torch.cat([base, warm]), 0.9)
    assert torch.allclose(out[0], out[1], atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    # within an image the order is the map's
    assert torch.equal(out[0].flatten().argsort(), base.flatten().argsort())


@pytest.mark.parametrize("threshold", ["nfa_tree", "normal_quantile"])
def test_the_module_shows_the_relative_map_and_keeps_the_image_score_and_the_nfa(threshold, tmp_path):
    from hydra.utils import instantiate

    settings = [
        *TINY,
        f"threshold={threshold}",
        "model.image_score_scales=null",
        "model.image_score_standardize=false",
    ]
    cfg = compose_train([*settings, "threshold.calibrate_on_normal=false"] if threshold == "nfa_tree"
                        else settings, tmp_path)  # fmt: skip
    module = instantiate(cfg.model).eval()
    assert module.map_relative_quantile == 0.8  # the default
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        maps = module._maps({"image": images})
        z, _ = module.model(images)
    likelihood = module.model.anomaly_map(z, 64)
    assert torch.allclose(maps.anomaly_map, relative_map(likelihood, 0.8))
    # the image score stays the likelihood map's maximum (here the whole map's: image_score_scales=null)
    assert torch.allclose(maps.score_map, likelihood)
    if threshold == "nfa_tree":  # the NFA reads the latents
        assert torch.allclose(maps.significance, module.threshold.significance_map(z, likelihood))
    else:  # a threshold on the map thresholds the map the image shows
        assert torch.equal(maps.significance, maps.anomaly_map)
    module.map_relative_quantile = None  # the method's map
    with torch.no_grad():
        plain = module._maps({"image": images})
    assert torch.allclose(plain.anomaly_map, likelihood) and plain.score_map is None


@pytest.mark.parametrize("scales", [None, 2])
def test_a_relative_image_score_is_the_peak_above_the_images_own_level(scales, tmp_path):
    from hydra.utils import instantiate

    setting = f"model.image_score_scales={'null' if scales is None else scales}"
    overrides = [
        setting,
        "model.image_score_relative_quantile=0.5",
        "model.image_score_standardize=false",
        "threshold.calibrate_on_normal=false",
    ]
    cfg = compose_train([*TINY, *overrides], tmp_path)
    module = instantiate(cfg.model).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        score = module.predict_step({"image": images})["image_score"]
        z, _ = module.model(images)
    likelihood = module.model.anomaly_map(z if scales is None else z[-scales:], 64)
    level = likelihood.flatten(1).median(dim=1).values  # the 0.5 quantile of 64 x 64 pixels: the lower median
    assert torch.allclose(score, (1.0 + likelihood.flatten(1).amax(1) - level) / 2)
    module.map_relative_quantile = None  # the score does not depend on the map's own setting
    with torch.no_grad():
        assert torch.allclose(module.predict_step({"image": images})["image_score"], score)


@pytest.mark.parametrize("key", ["map_relative_quantile", "image_score_relative_quantile"])
@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_a_quantile_outside_the_open_interval_is_refused(key, value, tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_train([*TINY, f"model.{key}={value}"], tmp_path)
    refused = rf"model.{key} must be in \(0, 1\) or null, got {value}"
    with pytest.raises(InstantiationException, match=refused):
        instantiate(cfg.model)


def test_an_image_score_of_no_scales_is_refused(tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_train([*TINY, "model.image_score_scales=0"], tmp_path)
    with pytest.raises(
        InstantiationException, match=r"model.image_score_scales must be .* >= 1 or null, got 0"
    ):
        instantiate(cfg.model)
