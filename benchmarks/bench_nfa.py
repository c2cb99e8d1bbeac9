"""Timing of the NFA segmentation against the reference implementation's published figures.

Run: .venv/bin/python benchmarks/bench_nfa.py [--repeats N] [--threads N ...]. Prints a Markdown
table. The reference figures (recursive networkx tree NFA of mtailanian/uflow on a 2-core CPU machine)
come from /work/shared/fixtures/README.md; the block NFA has no reference figure.

Each configuration is timed with torch's default intra-op thread count and with one thread: on a
shared, oversubscribed machine torch's thread barriers stall, which distorts the default timing.
"""

import argparse
import os
import statistics
import time

import torch

from uflow_exp.nfa import block_nfa, tree_nfa

TARGET = 448
# name, latent shapes (C, H, W) finest first, images per call, reference tree seconds per image
CASES = [
    ("resnet18 @448", [(84, 112, 112), (80, 56, 56), (128, 28, 28)], 1, 5.6),
    ("mcait @448", [(816, 28, 28), (192, 14, 14)], 4, 0.59 / 4),
]


def planted_latents(shapes, n_images, seed=0):
    """Standard normal latents with a square of 3x standard deviation covering 1/8 of each side."""
    g = torch.Generator().manual_seed(seed)
    z = []
    for c, h, w in shapes:
        zs = torch.randn(n_images, c, h, w, generator=g)
        zs[:, :, h // 4 : h // 4 + h // 8, w // 2 : w // 2 + w // 8] *= 3.0
        z.append(zs)
    return z


def call_seconds(fn, repeats):
    """Median and best wall time of ``repeats`` calls after a warm-up (imports, allocator, tables)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", help="torch thread counts (default: torch's and 1)")
    args = parser.parse_args()
    thread_counts = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"target {TARGET} x {TARGET}; {args.repeats} calls after a warm-up; load average {load}")
    print("speedup = reference / median\n")
    print(
        "| latents | method | torch threads | images/call | median s/image | best s/image "
        "| reference s/image | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, shapes, n_images, ref_per_image in CASES:
        z = planted_latents(shapes, n_images)
        detected = (tree_nfa(z, TARGET) > 0).flatten(1).any(dim=1)
        assert detected.all(), f"{name}: the planted square was not detected"
        for method, fn, ref in (("tree", tree_nfa, ref_per_image), ("block", block_nfa, None)):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                median, best = call_seconds(lambda fn=fn, z=z: fn(z, TARGET), args.repeats)
                per_image = median / n_images
                ref_text, speedup = (f"{ref:.3f}", f"{ref / per_image:.0f}x") if ref else ("-", "-")
                print(
                    f"| {name} | {method} | {threads} | {n_images} | {per_image:.4f} | {best / n_images:.4f} "
                    f"| {ref_text} | {speedup} |"
                )


if __name__ == "__main__":
    main()
