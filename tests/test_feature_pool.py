"""``flow.feature_pool``: each position's normalised feature is the mean over its neighbourhood."""

import pytest
import torch

from uflow_exp.models.uflow import UFlow


def model(pool: int) -> UFlow:
    torch.manual_seed(0)
    return UFlow(backbone="resnet18", input_size=64, flow_steps=1, pretrained=False, feature_pool=pool).eval()


def test_each_position_is_the_mean_of_its_neighbourhood_inside_the_image():
    raw = model(1).extract(torch.rand(2, 3, 64, 64))
    plain, pooled = model(1).normalize(raw), model(3).normalize(raw)
    for f, p in zip(plain, pooled, strict=True):
        assert torch.allclose(p[:, :, 2, 1], f[:, :, 1:4, 0:3].mean((2, 3)), atol=1e-6)  # inside
        assert torch.allclose(p[:, :, 0, 0], f[:, :, :2, :2].mean((2, 3)), atol=1e-6)  # corner: 4 positions
    assert all(torch.equal(a, b) for a, b in zip(plain, model(1).normalize(raw), strict=True))
    z, _ = model(3).encode(pooled)
    assert [t.shape[-1] for t in z] == [16, 8, 4]


@pytest.mark.parametrize("pool", [0, 2])
def test_a_pool_that_has_no_centre_is_refused(pool):
    with pytest.raises(ValueError, match=f"feature_pool must be an odd neighbourhood size >= 1, got {pool}"):
        model(pool)
