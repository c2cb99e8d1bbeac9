"""The model core against the authors' reference numerics, and its construction contract."""

import copy

import huggingface_hub.constants
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from uflow_exp.models.uflow import IMAGENET_MEAN, IMAGENET_STD, BackboneWeightsError, UFlow, nll_loss
from uflow_exp.models.uflow.feature_extraction import build_feature_extractor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build_reference_model(reference_resnet18: dict, fast_flow: bool = True) -> UFlow:
    model = UFlow(
        backbone="resnet18",
        input_size=256,
        flow_steps=reference_resnet18["flow_steps"],
        pretrained=False,
        fast_flow=fast_flow,
    )
    model.load_reference_state_dict(reference_resnet18["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def reference_model(reference_resnet18):
    return build_reference_model(reference_resnet18)


@pytest.mark.parametrize("fast_flow", [True, False], ids=["fast_blocks", "freia_blocks"])
def test_reproduces_reference_latents_loss_and_map(reference_resnet18, fast_flow):
    ref = reference_resnet18
    model = build_reference_model(ref, fast_flow)
    with torch.no_grad():
        z, log_jac_det = model.encode(model.normalize(ref["raw_features"]))
        loss = nll_loss(z, log_jac_det)
        amap = model.anomaly_map(z, size=256)
    assert [tuple(t.shape) for t in z] == [tuple(t.shape) for t in ref["z"]]
    # float32 rounding of differently ordered sums: measured at most 1e-6 (log det J); 1e-5 bounds it
    for ours, theirs in zip(z, ref["z"], strict=True):
        assert rel_err(ours, theirs) < 1e-5
    assert rel_err(log_jac_det, ref["log_jac_det"]) < 1e-5
    assert rel_err(loss, ref["loss"]) < 1e-5
    assert amap.shape == (2, 1, 256, 256)
    assert (amap - ref["anomaly_map"]).abs().max().item() < 1e-6


def test_parameter_layout_is_the_references(reference_resnet18):
    model = UFlow(backbone="resnet18", input_size=256, flow_steps=4, pretrained=False)
    ours = [k for k in model.state_dict() if not k.startswith("feature_extractor.extractor.")]
    assert ours == list(reference_resnet18["state_dict"])


def test_loads_authors_checkpoint_file(tmp_path, reference_resnet18, reference_model):
    # Their release: a Lightning checkpoint, keys prefixed with `model.`, plus metric buffers.
    state = {f"model.{k}": v for k, v in reference_resnet18["state_dict"].items()}
    state["aupro.fpr"] = torch.zeros(3)
    state["model.log_loss_weights"] = torch.ones(1)
    path = tmp_path / "release.ckpt"
    torch.save({"state_dict": state, "epoch": 7}, path)
    model = UFlow(backbone="resnet18", input_size=256, flow_steps=4, pretrained=False)
    model.load_reference_state_dict(str(path))
    for (key, a), b in zip(model.state_dict().items(), reference_model.state_dict().values(), strict=True):
        if not key.startswith("feature_extractor.extractor."):
            assert torch.equal(a, b), key


def test_refuses_state_dict_of_another_configuration(reference_resnet18):
    model = UFlow(backbone="resnet18", input_size=256, flow_steps=2, pretrained=False)
    with pytest.raises((KeyError, RuntimeError), match="flow"):
        model.load_reference_state_dict(reference_resnet18["state_dict"])


@pytest.mark.parametrize(
    ("backbone", "size", "channels"),
    [
        ("resnet18", 64, [84, 80, 128]),
        ("efficientnet_lite0", 64, [30, 30, 56]),
        ("wide_resnet50_2", 64, [336, 320, 512]),
    ],
)
def test_latent_shapes(backbone, size, channels):
    model = UFlow(backbone=backbone, input_size=size, flow_steps=2, pretrained=False).eval()
    with torch.no_grad():
        z, log_jac_det = model(torch.randn(2, 3, size, size))
    assert [tuple(t.shape) for t in z] == [
        (2, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16), strict=True)
    ]
    assert log_jac_det.shape == (2,)


@pytest.mark.slow
def test_mcait_latent_shapes():
    model = UFlow(backbone="mcait", input_size=448, flow_steps=1, pretrained=False).eval()
    with torch.no_grad():
        raw = model.extract(torch.randn(1, 3, 448, 448))
        assert [tuple(t.shape) for t in raw] == [(1, 784, 768), (1, 196, 384)]
        z, _ = model.encode(model.normalize(raw))
    assert [tuple(t.shape) for t in z] == [(1, 816, 28, 28), (1, 192, 14, 14)]


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_channels_last_backbone_gives_the_plain_layouts_features_contiguous(backbone):
    """The CNN runs channels-last for speed; its features are the plain NCHW model's up to float32
    summation order, and reach the flow and the feature cache contiguous."""
    torch.manual_seed(0)
    extractor = build_feature_extractor(backbone, 64, pretrained=False, layers=[1, 2, 3]).eval()
    kernels = [p for p in extractor.extractor.parameters() if p.dim() == 4]
    assert all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    plain = copy.deepcopy(extractor.extractor).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.parameters())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor.extract(images)
        expected = plain((images - extractor.pixel_mean) / extractor.pixel_std)
    for got, want in zip(features, expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_mcait_refuses_other_input_sizes():
    with pytest.raises(ValueError, match="mcait.*448"):
        UFlow(backbone="mcait", input_size=256, pretrained=False)


def test_refuses_input_size_not_divisible_by_stride():
    with pytest.raises(ValueError, match="not divisible"):
        UFlow(backbone="resnet18", input_size=100, pretrained=False)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="no_such_net"):
        UFlow(backbone="no_such_net", input_size=64, pretrained=False)


def test_efficientnet_lite0_packaged_weights_see_a_cat():
    extractor = build_feature_extractor("efficientnet_lite0", 256, pretrained=True)
    # The same weights in the full classifier: the packaged ImageNet head must call Chelsea a cat.
    import timm

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    from uflow_exp.models.uflow.feature_extraction import efficientnet_lite0_package_state_dict

    classifier.load_state_dict(efficientnet_lite0_package_state_dict(), strict=True)
    image = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    image = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        top5 = classifier(image).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), top5  # ImageNet's domestic-cat classes
    # ...and the extractor holds exactly those weights.
    ref = classifier.state_dict()
    for key, value in extractor.extractor.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_hub_failure_names_backbone_and_the_three_ways(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneWeightsError) as info:
        UFlow(backbone="resnet18", input_size=64, pretrained=True)
    message = str(info.value)
    assert "resnet18" in message and "weights=" in message and "pretrained=False" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source, str(path))
    else:
        torch.save(source, path)
    model = UFlow(backbone="resnet18", input_size=64, weights=str(path), pretrained=False)
    for key, value in model.feature_extractor.extractor.state_dict().items():
        assert torch.equal(value, source[key]), key


def test_weights_file_of_wrong_architecture_is_refused(tmp_path):
    import timm

    path = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="mobilenet.pth"):
        UFlow(backbone="resnet18", input_size=64, weights=str(path))


def test_training_reduces_loss_and_backbone_stays_frozen():
    torch.manual_seed(0)
    model = UFlow(backbone="resnet18", input_size=64, flow_steps=2, pretrained=False)
    model.train()
    assert not model.feature_extractor.extractor.training
    backbone_before = {k: v.clone() for k, v in model.feature_extractor.extractor.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.feature_extractor.extractor.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    images = torch.randn(4, 3, 64, 64)
    losses = []
    for _ in range(5):
        loss = nll_loss(*model(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in model.feature_extractor.extractor.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


def test_feature_levels_choose_the_scales():
    model = UFlow(
        backbone="efficientnet_lite0", input_size=64, flow_steps=1, pretrained=False, layers=[2, 3, 4]
    )
    with torch.no_grad():
        z, _ = model(torch.randn(1, 3, 64, 64))
    assert model.feature_extractor.scale_factors == [8, 16, 32]
    assert [tuple(t.shape[1:]) for t in z] == [(59, 8, 8), (76, 4, 4), (160, 2, 2)]
    with pytest.raises(ValueError, match="layers"):
        UFlow(backbone="resnet18", input_size=64, pretrained=False, layers=[3, 2])
    with pytest.raises(ValueError, match="layers"):
        build_feature_extractor("mcait", 448, pretrained=False, layers=[1, 2])
