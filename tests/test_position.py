"""``flow.position_channels``: every coupling sees a positional encoding, so the density may depend on
where a feature is (registered scans, fixed camera views). 0 keeps the reference's position-free flow."""

import math

import FrEIA.framework as ff
import pytest
import torch

from tests.test_fast_flow import CHANNELS, SIZES, perturbed_, rel_err
from uflow_exp.models.uflow import UFlow, build_uflow_graph, nll_loss
from uflow_exp.models.uflow.model import position_encoding

SIZE = 32  # resnet18 at 32 px: raw features (64, 8, 8), (128, 4, 4), (256, 2, 2)


def test_encoding_codes_rows_then_columns_relative_to_the_size():
    enc = position_encoding(8, 4)
    assert enc.shape == (8, 4, 4)
    u = (torch.arange(4) + 0.5) / 4
    for k in range(2):  # channels 0-3: the row's sin, sin, cos, cos; 4-7: the column's
        torch.testing.assert_close(enc[k], torch.sin(math.pi * 2**k * u)[:, None].expand(4, 4))
        torch.testing.assert_close(enc[2 + k], torch.cos(math.pi * 2**k * u)[:, None].expand(4, 4))
        torch.testing.assert_close(enc[4 + k], torch.sin(math.pi * 2**k * u)[None, :].expand(4, 4))
    # every pixel gets its own code
    codes = enc.flatten(1).T
    assert torch.cdist(codes, codes).add(torch.eye(16)).min() > 0.1
    # relative coordinates: the centre of an image has the same code at every scale
    assert torch.allclose(position_encoding(8, 3)[:, 1, 1], position_encoding(8, 9)[:, 4, 4], atol=1e-6)


@pytest.mark.parametrize("channels", [0, -4, 6])
def test_encoding_needs_a_positive_multiple_of_four(channels):
    with pytest.raises(
        ValueError, match=f"position_channels must be a positive multiple of 4, got {channels}"
    ):
        position_encoding(channels, 4)
    if channels:
        with pytest.raises(ValueError, match="position_channels"):
            UFlow(backbone="resnet18", input_size=SIZE, pretrained=False, position_channels=channels)


def test_zero_is_the_reference_graph():
    torch.manual_seed(0)
    plain = build_uflow_graph(CHANNELS, SIZES, flow_steps=2)
    assert not plain.condition_nodes
    conditioned = build_uflow_graph(CHANNELS, SIZES, flow_steps=2, position_channels=8)
    assert [type(n) for n in conditioned.condition_nodes] == [ff.ConditionNode] * 3
    # same parameters, except that each block's first subnet convolution has 8 more input channels
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    grown = {
        k
        for k, v in conditioned.state_dict().items()
        if v.shape != plain_shapes[k] and k.endswith("0.weight")
    }
    assert list(conditioned.state_dict()) == list(plain_shapes) and len(grown) == 6
    for key in grown:
        assert conditioned.state_dict()[key].shape[1] == plain_shapes[key][1] + 8


def test_model_keeps_the_checkpoint_keys_and_codes_each_scale():
    plain = UFlow(backbone="resnet18", input_size=SIZE, flow_steps=1, pretrained=False)
    model = UFlow(backbone="resnet18", input_size=SIZE, flow_steps=1, pretrained=False, position_channels=4)
    assert list(model.state_dict()) == list(plain.state_dict())  # the encoding is derived, not saved
    assert [tuple(getattr(model, f"position_{i}").shape) for i in range(3)] == [
        (4, 8, 8),
        (4, 4, 4),
        (4, 2, 2),
    ]
    features = model.normalize(model.extract(torch.rand(3, 3, SIZE, SIZE)))
    with torch.no_grad():
        z, ljd = model.encode(features)
        assert [t.shape for t in z] == [t.shape for t in plain.encode(features)[0]]
        # the flow reads the encoding: another code at the finest scale moves that scale's latent
        model.position_0.copy_(model.position_0.flip(-1))
        z_moved, ljd_moved = model.encode(features)
    assert rel_err(z_moved[0], z[0]) > 1e-3 and not torch.equal(ljd_moved, ljd)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_fast_conditional_blocks_match_freia(shared):
    """The fast blocks equal FrEIA's with conditions; a condition shared by the batch (expanded, as
    ``UFlow`` passes its positional encoding) takes the fast blocks' one-sample path."""
    torch.manual_seed(0)
    reference = perturbed_(build_uflow_graph(CHANNELS, SIZES, flow_steps=4, fast=False, position_channels=8))
    fast = build_uflow_graph(CHANNELS, SIZES, flow_steps=4, fast=True, position_channels=8)
    fast.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(3, c, s, s, generator=g) for c, s in zip(CHANNELS, SIZES, strict=True)]
    if shared:
        c = [torch.randn(1, 8, s, s, generator=g).expand(3, -1, -1, -1) for s in SIZES]
    else:
        c = [torch.randn(3, 8, s, s, generator=g) for s in SIZES]
    with torch.no_grad():
        z_ref, ljd_ref = reference(x, c=c)
        z, ljd = fast(x, c=c)
        for ours, theirs in zip(z, z_ref, strict=True):
            assert rel_err(ours, theirs) < 1e-4
        assert rel_err(ljd, ljd_ref) < 1e-4
        x_back, _ = fast(list(z), c=c, rev=True)
        for ours, original in zip(x_back, x, strict=True):
            assert rel_err(ours, original) < 1e-4
        # the condition is used: another one gives other latents
        z_other, _ = fast(x, c=[-t for t in c])
        assert rel_err(z_other[0], z[0]) > 1e-2
    grads = []
    for flow in (reference, fast):
        flow.zero_grad()
        nll_loss(*flow(x, c=c)).backward()
        grads.append({k: p.grad for k, p in flow.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key, theirs in grads[0].items():
        assert rel_err(grads[1][key], theirs) < 1e-3, key
