"""Throughput of the U-flow: FrEIA's reference blocks against FastAllInOneBlock, eager and compiled.

Run: .venv/bin/python benchmarks/bench_flow.py [--threads 1] [--repeats 7]. Prints a Markdown table.
The flow alone (no backbone) runs on pre-computed random normalised features of the backbone's shapes
at input 256, with the same random weights in every variant. "train" is one step of forward, NLL loss,
backward and Adam; "map" is inference of the anomaly map only (no log-det, no gradient). The variants
run interleaved, one step each per round, and the table gives medians over the rounds, so that load
from other processes hits them alike. "fast+compile" is the fast graph with ``compile_coupling(True)``;
its first step compiles (cached on disk for later runs), and "1st step s" shows what that costs.

One intra-op thread by default: on a 2-core machine shared with other jobs, two threads turn the
others' load into barrier stalls that swamp the differences measured here; ``--threads 2`` on a quiet
machine.
"""

import argparse
import statistics
import time

import torch

from uflow_exp.models.uflow import anomaly_map, build_uflow_graph, nll_loss
from uflow_exp.models.uflow.blocks import compile_coupling

INPUT = 256
# backbone: channels and sides of its three feature maps at input 256 (strides 4, 8, 16)
BACKBONES = {
    "resnet18": ([64, 128, 256], [64, 32, 16]),
    "wide_resnet50_2": ([256, 512, 1024], [64, 32, 16]),
}
VARIANTS = ("reference", "fast", "fast+compile")


def relative_error(ours, reference):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference, strict=True))


def make_step(flow, variant, features, mode):
    if mode == "train":
        optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=1e-4)

    def step():
        compile_coupling(variant == "fast+compile")
        if mode == "train":
            loss = nll_loss(*flow(features))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                z, _ = flow(features, jac=False)
                anomaly_map(z, INPUT)

    return step


def run_case(backbone, batch, mode, repeats):
    channels, sizes = BACKBONES[backbone]
    torch.manual_seed(0)
    features = [torch.randn(batch, c, s, s) for c, s in zip(channels, sizes, strict=True)]
    flows = {"reference": build_uflow_graph(channels, sizes, fast=False)}
    for variant in VARIANTS[1:]:
        flows[variant] = build_uflow_graph(channels, sizes, fast=True)
        flows[variant].load_state_dict(flows["reference"].state_dict())
    with torch.no_grad():
        outputs = {}
        for variant, flow in flows.items():
            compile_coupling(variant == "fast+compile")
            outputs[variant] = flow(features)
    steps = {variant: make_step(flow, variant, features, mode) for variant, flow in flows.items()}
    first_step = {}
    for variant, step in steps.items():
        start = time.perf_counter()
        step()  # warm-up: allocator, oneDNN primitives, compiling
        first_step[variant] = time.perf_counter() - start
        step()
    seconds = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[variant].append(time.perf_counter() - start)
    compile_coupling(False)
    reference_rate = batch / statistics.median(seconds["reference"])
    rows = []
    for variant in VARIANTS:
        rate = batch / statistics.median(seconds[variant])
        z, log_jac_det = outputs[variant]
        z_ref, log_jac_det_ref = outputs["reference"]
        error = max(relative_error(z, z_ref), relative_error([log_jac_det], [log_jac_det_ref]))
        rows.append(
            f"| {backbone}@{INPUT} | {mode} | {batch} | {variant} | {rate:.2f} | "
            f"{rate / reference_rate:.2f}x | {error:.1e} | {first_step[variant]:.1f} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=["train", "map"], choices=["train", "map"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), median of {args.repeats} interleaved rounds\n")
    print(
        "| flow | mode | batch | variant | images/s | vs reference | max rel. error z, log-det | 1st step s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for backbone in args.backbones:
        batch = 4 if backbone == "resnet18" else 2
        for mode in args.modes:
            for row in run_case(backbone, batch, mode, args.repeats):
                print(row, flush=True)


if __name__ == "__main__":
    main()
