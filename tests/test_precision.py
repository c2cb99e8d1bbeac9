"""bfloat16 training (trainer.precision=bf16-mixed): only the subnets' convolutions of the training
step run in bfloat16; latents, log-det, loss and every evaluation stay in float32."""

import numpy as np
import torch

from uflow_exp.models.uflow import build_uflow_graph, nll_loss
from uflow_exp.models.uflow.lightning_module import UFlowModule

CHANNELS, SIZES = [64, 128, 256], [16, 8, 4]


def features(batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(CHANNELS, SIZES, strict=True)]


def seeded() -> None:
    np.random.seed(0)  # FrEIA draws the blocks' hard permutations with numpy
    torch.manual_seed(0)


def test_under_autocast_the_couplings_stay_float32_and_near_the_float32_flow():
    seeded()
    flow = build_uflow_graph(CHANNELS, SIZES, flow_steps=2, fast=True)
    x = features()
    z32, log_det32 = flow(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, log_det16 = flow(x)
    assert all(t.dtype == torch.float32 for t in (*z16, log_det16))
    # bfloat16 convolutions move the latents by 3e-4 to 6e-4 of their range and the log-det by 8e-4
    # relative; a coupling computed in bfloat16 after them moves the latents by 5e-3
    for a, b in zip(z16, z32, strict=True):
        assert 0 < ((a - b).abs().max() / b.abs().max()).item() < 2e-3
    assert 0 < ((log_det16 - log_det32).abs() / log_det32.abs()).max().item() < 1.2e-3
    # and the loss still trains the flow: gradients reach every subnet in float32
    nll_loss(z16, log_det16).backward()
    grads = [p.grad for p in flow.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_soft_permutation_blocks_run_freia_in_float32_under_autocast():
    seeded()
    flow = build_uflow_graph(CHANNELS, SIZES, flow_steps=2, fast=True, permute_soft=True)
    x = features()
    z32, log_det32 = flow(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, log_det16 = flow(x)
    assert torch.equal(log_det16, log_det32) and all(torch.equal(a, b) for a, b in zip(z16, z32, strict=True))


def tiny_module() -> UFlowModule:
    seeded()
    return UFlowModule(
        backbone={"name": "resnet18", "input_size": 64, "pretrained": False, "layers": [1, 2, 3]},
        flow={"flow_steps": 2, "feature_noise": 0.0, "position_channels": 4},
        threshold={"_target_": "uflow_exp.thresholds.NFATreeThreshold"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
        eval_size=64,
    )


def test_the_module_autocasts_its_training_step_and_nothing_else():
    module = tiny_module()
    batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.zeros(2)}
    for training in (True, False):
        module.train(training)
        with torch.no_grad():
            z32, log_det32 = module._latents(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z16, log_det16 = module._latents(batch)
                raw = module._extract(batch["image"])
        assert all(t.dtype == torch.float32 for t in (*z16, log_det16, *raw))  # backbone in float32
        same = torch.equal(log_det16, log_det32) and all(
            torch.equal(a, b) for a, b in zip(z16, z32, strict=True)
        )
        assert same != training  # training: bfloat16 convolutions; evaluation: exactly float32
