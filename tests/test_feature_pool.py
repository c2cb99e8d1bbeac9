"""``flow.feature_pool``: each position's normalised feature is the mean over its neighbourhood."""

import pytest
import torch

from uflow_exp.models.uflow import UFlow


def model(pool) -> UFlow:
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


def test_a_list_pools_each_scale_by_its_own_size_finest_first():
    raw = model(1).extract(torch.rand(2, 3, 64, 64))
    plain, pooled, mixed = model(1).normalize(raw), model(3).normalize(raw), model([3, 1, 5]).normalize(raw)
    assert torch.equal(mixed[0], pooled[0]) and torch.equal(mixed[1], plain[1])
    assert torch.allclose(mixed[2][:, :, 2, 2], plain[2].mean((2, 3)), atol=1e-6)  # 5 x 5 of 4 x 4


@pytest.mark.parametrize("pool", [0, 2, [3, 3], [3, 2, 1]])
def test_a_pool_that_has_no_centre_or_not_one_size_per_scale_is_refused(pool):
    refused = rf"feature_pool must be an odd neighbourhood size >= 1, or a list of 3 of them .*, got {pool}"
    with pytest.raises(ValueError, match=refused.replace("[", r"\[").replace("]", r"\]")):
        model(pool)
