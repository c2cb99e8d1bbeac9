"""Features that never vary between training images (black background, padding, flat surfaces): the
options that keep the flow's density bounded there, and the inverted map they prevent."""

import pytest
import torch

from uflow_exp.models.uflow import UFlow, nll_loss

SIZE = 32  # resnet18 at 32 px: raw features (64, 8, 8), (128, 4, 4), (256, 2, 2)


def flat_left_half(n: int, generator: torch.Generator, shapes) -> list[torch.Tensor]:
    """Raw features whose left half is the same constant in every image; the right half varies."""
    out = []
    for c, s in shapes:
        x = torch.randn(n, c, s, s, generator=generator)
        x[..., : s // 2] = 0.5
        out.append(x)
    return out


def trained_model(feature_noise: float, train_norm_affine: bool, steps: int = 120) -> tuple[UFlow, list]:
    torch.manual_seed(0)
    model = UFlow(
        backbone="resnet18",
        input_size=SIZE,
        flow_steps=2,
        pretrained=False,
        feature_noise=feature_noise,
        train_norm_affine=train_norm_affine,
    )
    shapes = [(c, SIZE // s) for c, s in zip(model.feature_extractor.channels, [4, 8, 16], strict=True)]
    g = torch.Generator().manual_seed(1)
    train = flat_left_half(64, g, shapes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    model.train()
    for step in range(steps):
        idx = torch.arange(16) + 16 * (step % 4)
        loss = nll_loss(*model.encode(model.normalize([f[idx] for f in train])))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), shapes


def left_right_map(model: UFlow, shapes) -> tuple[float, float]:
    """Mean anomaly map over the flat half and the varying half of new images whose flat half is
    off by 5 % of the feature scale (as a test image's background is from the training images')."""
    test = flat_left_half(8, torch.Generator().manual_seed(2), shapes)
    for x in test:
        x[..., : x.shape[-1] // 2] += 0.05 * torch.randn_like(x[..., : x.shape[-1] // 2])
    with torch.no_grad():
        z, _ = model.encode(model.normalize(test), jac=False)
        amap = model.anomaly_map(z, SIZE)
    return amap[..., : SIZE // 2].mean().item(), amap[..., SIZE // 2 :].mean().item()


@pytest.mark.slow
def test_reference_inverts_the_map_and_the_recipe_does_not():
    reference, shapes = trained_model(feature_noise=0.0, train_norm_affine=True)
    flat, varying = left_right_map(reference, shapes)
    assert flat > varying  # the defect of the reference on real data: the flat half lights up
    recipe, _ = trained_model(feature_noise=0.3, train_norm_affine=False)
    flat, varying = left_right_map(recipe, shapes)
    assert flat < 0.5 * varying


def test_feature_noise_only_while_training():
    model = UFlow(backbone="resnet18", input_size=SIZE, flow_steps=1, pretrained=False, feature_noise=0.3)
    raw = model.extract(torch.randn(2, 3, SIZE, SIZE))
    clean = model.feature_extractor.normalize(raw)
    model.train()
    noisy = model.normalize(raw)
    residual = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean, strict=True)])
    assert residual.std().item() == pytest.approx(0.3, rel=0.05)
    assert residual.mean().abs().item() < 0.01
    model.eval()
    for a, b in zip(model.normalize(raw), clean, strict=True):
        assert torch.equal(a, b)


def test_frozen_norm_affine_keeps_the_checkpoint_layout():
    reference = UFlow(backbone="resnet18", input_size=SIZE, flow_steps=1, pretrained=False)
    frozen = UFlow(
        backbone="resnet18", input_size=SIZE, flow_steps=1, pretrained=False, train_norm_affine=False
    )
    assert list(frozen.state_dict()) == list(reference.state_dict())
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("flow.") for name in trainable)
    assert "feature_extractor.feature_normalizations.0.weight" in {
        name for name, p in reference.named_parameters() if p.requires_grad
    }


def test_refuses_negative_noise():
    with pytest.raises(ValueError, match="feature_noise"):
        UFlow(backbone="resnet18", input_size=SIZE, pretrained=False, feature_noise=-0.1)


def test_map_blur_is_a_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    from uflow_exp.models.uflow.anomaly_map import anomaly_map

    z = [torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(4))]
    plain, blurred = anomaly_map(z, 64), anomaly_map(z, 64, blur_sigma=2.0)
    expected = torch.from_numpy(gaussian_filter(plain.numpy(), sigma=(0, 0, 2.0, 2.0), truncate=4.0))
    inner = (..., slice(9, -9), slice(9, -9))  # the borders are padded differently (reflect modes)
    assert torch.allclose(blurred[inner], expected[inner], atol=1e-6)
    assert blurred.std() < plain.std()
