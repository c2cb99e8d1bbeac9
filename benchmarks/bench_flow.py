"""Throughput of the U-flow alone: FrEIA's reference blocks against FastAllInOneBlock, eager and
compiled, and the floor that the coupling subnets' convolutions set for any exact implementation.

Run: .venv/bin/python benchmarks/bench_flow.py [--threads 1] [--repeats 7] [--device cpu|cuda].
Prints a Markdown table. The flow runs on random normalised features of the backbone's shapes at input
256, with the same random weights in every variant. "train" is one step of forward, NLL loss, backward
and Adam; "map" is inference of the anomaly map only (no log-det, no gradient, inference mode).

Variants:
- reference: FrEIA's ``AllInOneBlock`` graph (the authors' model);
- fast: ``FastAllInOneBlock`` (exact channel gather instead of a C x C permutation convolution);
- fast+compile: the same with its element-wise coupling through ``torch.compile``
  (``compile_coupling=True``, config ``flow.compile_coupling=true``); its first step compiles (cached
  on disk for later runs), which "1st step s" shows;
- convolutions only: nothing but every coupling subnet (conv, ReLU, conv) on the inputs it sees in
  the flow, forward and, for "train", backward to the same inputs and weights plus Adam on them. Any
  implementation that keeps the convolutions' arithmetic in fp32 needs at least this time, so
  reference / convolutions-only bounds the speed-up an exact flow can reach on this device.

One intra-op thread by default: on a 2-core machine shared with other jobs, two threads turn the
others' load into barrier stalls that swamp the differences measured here.
"""

from __future__ import annotations

import argparse

import FrEIA.modules as fm
import torch
from timing import interleaved_medians

from uflow_exp.models.uflow import anomaly_map, build_uflow_graph, nll_loss

INPUT = 256
# backbone: channels and sides of its three feature maps at input 256 (strides 4, 8, 16)
BACKBONES = {
    "resnet18": ([64, 128, 256], [64, 32, 16]),
    "wide_resnet50_2": ([256, 512, 1024], [64, 32, 16]),
}
FLOW_VARIANTS = ("reference", "fast", "fast+compile")
BOUND = "convolutions only"


def relative_error(ours, reference):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference, strict=True))


def flow_step(flow, features, mode):
    if mode == "train":
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)

    def step():
        if mode == "train":
            loss = nll_loss(*flow(features))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                z, _ = flow(features, jac=False)
                anomaly_map(z, INPUT)

    return step


def convolutions_step(flow, features, mode):
    """The subnets alone, on the inputs (and with the input gradients) they have inside the flow."""
    captured = []

    def capture(module, args, output):
        x = args[0].detach().clone().requires_grad_(args[0].requires_grad)
        captured.append((module, x, torch.ones_like(output)))

    subnets = [m.subnet for m in flow.modules() if isinstance(m, fm.AllInOneBlock)]
    hooks = [subnet.register_forward_hook(capture) for subnet in subnets]
    flow(features)
    for hook in hooks:
        hook.remove()
    optimizer = torch.optim.Adam([p for s in subnets for p in s.parameters()], lr=1e-4)

    def step():
        if mode == "train":
            optimizer.zero_grad()
            for subnet, x, grad in captured:
                subnet(x).backward(grad)
            optimizer.step()
        else:
            with torch.inference_mode():
                for subnet, x, _ in captured:
                    subnet(x)

    return step


def run_case(backbone, batch, mode, repeats, device):
    channels, sizes = BACKBONES[backbone]
    torch.manual_seed(0)
    features = [torch.randn(batch, c, s, s, device=device) for c, s in zip(channels, sizes, strict=True)]
    flows = {"reference": build_uflow_graph(channels, sizes, fast=False).to(device)}
    for variant in FLOW_VARIANTS[1:]:
        compiled = variant == "fast+compile"
        flows[variant] = build_uflow_graph(channels, sizes, fast=True, compile_coupling=compiled).to(device)
        flows[variant].load_state_dict(flows["reference"].state_dict())
    with torch.no_grad():
        outputs = {variant: flow(features) for variant, flow in flows.items()}
    steps = {variant: flow_step(flow, features, mode) for variant, flow in flows.items()}
    steps[BOUND] = convolutions_step(flows["fast"], features, mode)
    medians, first = interleaved_medians(steps, repeats, torch.device(device))
    reference_rate = batch / medians["reference"]
    rows = []
    for variant in steps:
        rate = batch / medians[variant]
        if variant in outputs:
            z, log_jac_det = outputs[variant]
            z_ref, log_jac_det_ref = outputs["reference"]
            error = f"{max(relative_error(z, z_ref), relative_error([log_jac_det], [log_jac_det_ref])):.1e}"
        else:
            error = "-"
        rows.append(
            f"| {backbone}@{INPUT} | {mode} | {batch} | {variant} | {rate:.2f} | "
            f"{rate / reference_rate:.2f}x | {error} | {first[variant]:.1f} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch", type=int, default=0, help="batch size (default: 4 resnet18, 2 wide_resnet50_2)"
    )
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=["train", "map"], choices=["train", "map"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} interleaved rounds\n"
    )
    print(
        "| flow | mode | batch | variant | images/s | vs reference | max rel. error z, log-det | 1st step s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for backbone in args.backbones:
        batch = args.batch or (4 if backbone == "resnet18" else 2)
        for mode in args.modes:
            for row in run_case(backbone, batch, mode, args.repeats, args.device):
                print(row, flush=True)


if __name__ == "__main__":
    main()
