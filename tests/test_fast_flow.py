"""FastAllInOneBlock against FrEIA's AllInOneBlock: same parameters, same numbers, faster."""

import logging
import pickle

import FrEIA.modules as fm
import pytest
import torch

from uflow_exp.models.uflow import UFlow, blocks, build_uflow_graph, nll_loss
from uflow_exp.models.uflow.blocks import FastAllInOneBlock
from uflow_exp.models.uflow.flow import subnet_factory

# resnet18's feature channels at a small input: quick, and every stage has a split and an upsampling
CHANNELS, SIZES = [64, 128, 256], [16, 8, 4]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturbed_(flow: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move the global affines off their neutral initial values, as in trained checkpoints."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith(("global_scale", "global_offset")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return flow


def features(batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(CHANNELS, SIZES, strict=True)]


@pytest.fixture(params=["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def flows(request):
    """The reference graph and a fast graph holding the same weights (including its permutations),
    its coupling run eagerly or compiled (compiling costs tens of seconds on CPU, hence slow)."""
    torch.manual_seed(0)
    reference = perturbed_(build_uflow_graph(CHANNELS, SIZES, flow_steps=4, fast=False))
    fast = build_uflow_graph(
        CHANNELS, SIZES, flow_steps=4, fast=True, compile_coupling=request.param == "compiled"
    )
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def test_same_state_dict_layout():
    torch.manual_seed(0)
    reference = build_uflow_graph(CHANNELS, SIZES, flow_steps=2, fast=False)
    fast = build_uflow_graph(CHANNELS, SIZES, flow_steps=2, fast=True)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert sum(isinstance(m, FastAllInOneBlock) for m in fast.module_list) == 6
    assert not any(isinstance(m, FastAllInOneBlock) for m in reference.module_list)


def test_forward_and_inverse_match_reference(flows):
    reference, fast = flows
    x = features()
    with torch.no_grad():
        z_ref, ljd_ref = reference(x)
        z, ljd = fast(x)
        for ours, theirs in zip(z, z_ref, strict=True):
            assert rel_err(ours, theirs) < 1e-4
        assert rel_err(ljd, ljd_ref) < 1e-4

        x_ref, ljd_rev_ref = reference(list(z_ref), rev=True)
        x_back, ljd_rev = fast(list(z_ref), rev=True)
        for ours, theirs, original in zip(x_back, x_ref, x, strict=True):
            assert rel_err(ours, theirs) < 1e-4
            assert rel_err(ours, original) < 1e-4
        assert rel_err(ljd_rev, ljd_rev_ref) < 1e-4
        assert rel_err(ljd_rev, -ljd_ref) < 1e-4

        # the log-det may be skipped (map-only inference) without changing the latents
        z_only, _ = fast(x, jac=False)
        for ours, theirs in zip(z_only, z, strict=True):
            assert torch.equal(ours, theirs)


def test_training_matches_reference(flows):
    reference, fast = flows
    x = features(batch=3)
    losses, grads = {}, {}
    for name, flow in (("reference", reference), ("fast", fast)):
        optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for step in range(10):
            loss = nll_loss(*flow(x))
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                grads[name] = {k: p.grad.clone() for k, p in flow.named_parameters() if p.grad is not None}
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["reference"][-1] < losses["reference"][0]  # it trains, so the comparison means something
    for ours, theirs in zip(losses["fast"], losses["reference"], strict=True):
        assert abs(ours - theirs) / abs(theirs) < 1e-3
    assert grads["fast"].keys() == grads["reference"].keys()
    assert not any(k.endswith(("w_perm", "w_perm_inv")) for k in grads["fast"])
    for key, theirs in grads["reference"].items():
        assert rel_err(grads["fast"][key], theirs) < 1e-3, key


def test_reproduces_reference_fixture(reference_resnet18):
    ref = reference_resnet18
    model = UFlow(
        backbone="resnet18", input_size=256, flow_steps=ref["flow_steps"], pretrained=False, fast_flow=True
    )
    assert isinstance(model.flow.module_list[0], FastAllInOneBlock)
    model.load_reference_state_dict(ref["state_dict"])
    model.eval()
    with torch.no_grad():
        z, log_jac_det = model.encode(model.normalize(ref["raw_features"]))
        amap = model.anomaly_map(z, size=256)
    for ours, theirs in zip(z, ref["z"], strict=True):
        assert rel_err(ours, theirs) < 1e-4
    assert rel_err(log_jac_det, ref["log_jac_det"]) < 1e-4
    assert rel_err(nll_loss(z, log_jac_det), ref["loss"]) < 1e-4
    assert (amap - ref["anomaly_map"]).abs().max().item() < 1e-5


def single_blocks(permute_soft: bool, channels: int = 12):
    """A FrEIA block and a fast block with identical weights."""
    torch.manual_seed(0)
    args = {
        "subnet_constructor": subnet_factory(3, 1.0),
        "affine_clamping": 2.0,
        "permute_soft": permute_soft,
    }
    reference = fm.AllInOneBlock([(channels, 6, 6)], **args)
    fast = FastAllInOneBlock([(channels, 6, 6)], **args)
    fast.load_state_dict(perturbed_(reference).state_dict())
    return reference, fast


def test_new_permutation_is_picked_up():
    reference, fast = single_blocks(permute_soft=False)
    x = (torch.randn(2, 12, 6, 6),)
    with torch.no_grad():
        assert rel_err(fast(x)[0][0], reference(x)[0][0]) < 1e-6
        # another checkpoint's permutation, loaded into the same module...
        other = torch.randperm(12)
        state = reference.state_dict()
        state["w_perm"] = torch.eye(12)[other].view(12, 12, 1, 1)
        state["w_perm_inv"] = state["w_perm"].transpose(0, 1).contiguous()
        reference.load_state_dict(state)
        fast.load_state_dict(state)
        assert rel_err(fast(x)[0][0], reference(x)[0][0]) < 1e-6
        # ...or written in place
        for block in (reference, fast):
            block.w_perm.copy_(torch.eye(12).flip(0).view(12, 12, 1, 1))
            block.w_perm_inv.copy_(torch.eye(12).flip(0).view(12, 12, 1, 1))
        assert rel_err(fast(x)[0][0], reference(x)[0][0]) < 1e-6


def test_trains_after_a_first_call_in_inference_mode():
    """Predicting or testing first (inference mode) must not leave inference tensors in the gather
    cache that a later training step or ONNX trace would have to save for backward."""
    flow = build_uflow_graph([8, 16], [16, 8], fast=True)
    x = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    with torch.inference_mode():
        first, _ = flow(x)
    z, log_jac_det = flow(x)
    nll_loss(z, log_jac_det).backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(first, z, strict=True))


def test_soft_permutation_runs_freias_code():
    reference, fast = single_blocks(permute_soft=True)
    x = (torch.randn(2, 12, 6, 6),)
    with torch.no_grad():
        (y_ref,), ljd_ref = reference(x)
        (y,), ljd = fast(x)
    assert fast._gather_indices("w_perm") is None
    assert torch.equal(y, y_ref) and torch.equal(ljd, ljd_ref)


def test_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(blocks, "_coupling_compiled", None)
    monkeypatch.setattr(blocks, "_compile_failed", False)
    reference, fast = single_blocks(permute_soft=False)
    fast.compile_coupling = True
    with caplog.at_level(logging.WARNING, logger=blocks.__name__):
        (y,), _ = fast((torch.ones(1, 12, 6, 6),))
        (y_again,), _ = fast((torch.ones(1, 12, 6, 6),))
    assert caplog.text.count("eager") == 1 and "no C++ compiler" in caplog.text  # warned once
    (y_ref,), _ = reference((torch.ones(1, 12, 6, 6),))
    assert rel_err(y, y_ref) < 1e-6 and torch.equal(y, y_again)


def test_compile_coupling_needs_the_fast_blocks():
    with pytest.raises(ValueError, match="fast"):
        build_uflow_graph(CHANNELS, SIZES, fast=False, compile_coupling=True)
    flow = build_uflow_graph(CHANNELS, SIZES, compile_coupling=True)
    assert all(m.compile_coupling for m in flow.module_list if isinstance(m, FastAllInOneBlock))


def test_block_pickles():
    _, fast = single_blocks(permute_soft=False)
    x = (torch.randn(2, 12, 6, 6),)
    copy = pickle.loads(pickle.dumps(fast))
    with torch.no_grad():
        assert torch.equal(copy(x)[0][0], fast(x)[0][0])
