"""``flow.subnet_kernel``: the coupling subnets' spatial reach, which decides how far a defect spreads
through the latents. 3 is the reference."""

import pytest
import torch

from tests.test_fast_flow import CHANNELS, SIZES, perturbed_
from uflow_exp.models.uflow import build_uflow_graph


def changed_latent_pixels(kernel: int) -> list[set[tuple[int, int]]]:
    """The latent pixels of each scale that move when one feature pixel of the finest scale does."""
    torch.manual_seed(0)
    flow = perturbed_(build_uflow_graph(CHANNELS, SIZES, flow_steps=4, subnet_kernel=kernel)).eval()
    features = [torch.randn(1, c, s, s) for c, s in zip(CHANNELS, SIZES, strict=True)]
    moved = [f.clone() for f in features]
    moved[0][0, :, 8, 8] += 3.0
    with torch.no_grad():
        before, _ = flow(features, jac=False)
        after, _ = flow(moved, jac=False)
    return [
        {tuple(p) for p in ((a - b).abs().amax(dim=1)[0] > 1e-5).nonzero().tolist()}
        for a, b in zip(after, before, strict=True)
    ]


def test_kernel_one_keeps_a_change_to_its_own_latent_pixel():
    # the finest scale's latents are the last output; coarser scales never see the finest features
    pixels = changed_latent_pixels(1)
    assert sorted(len(p) for p in pixels) == [0, 0, 1] and {(8, 8)} in pixels


def test_the_reference_kernel_spreads_it_to_the_neighbours():
    finest = max(changed_latent_pixels(3), key=len)
    assert (8, 8) in finest and len(finest) >= 9  # at least its 3 x 3 neighbourhood


def test_an_even_kernel_is_refused():
    with pytest.raises(ValueError, match="subnet_kernel must be an odd kernel size >= 1, got 2"):
        build_uflow_graph(CHANNELS, SIZES, subnet_kernel=2)
