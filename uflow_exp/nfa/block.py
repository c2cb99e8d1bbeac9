"""Block (window binomial) a-contrario NFA of U-Flow, vectorised."""

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F

from uflow_exp.utils.shapes import as_shape


def block_nfa(
    z: list[torch.Tensor], eval_size: int | tuple[int, int], win_size: int = 5, probability: float = 0.9
) -> torch.Tensor:
    """-log10 NFA of the block method, (B, 1, H, W) float64 at ``eval_size`` (a side or (H, W));
    positive = significant.

    At scale s, k counts the (channel, pixel) entries of a (2h+1)^2 window (h = max((win / 2^s) // 2, 1),
    reflect padding) with z^2 >= chi2_1.ppf(probability); the window's log10 probability is the binomial
    tail P(X > floor(k / C)), X ~ Bin((2h+1)^2, 1 - probability). Scales are bicubic-upsampled
    (align_corners=True) and summed, and log10 of the total pixel count is added. Where a window
    saturates (log-probability -inf) the output is infinite, or NaN where the bicubic kernel's negative
    weights meet it, as in the reference. The result is on the device of ``z[0]``.
    """
    tau = stats.chi2.ppf(probability, 1)
    # The reference compares float32 z^2 with the float64 tau; against the smallest float32 >= tau the
    # float32 comparison is identical and avoids a float64 copy of z.
    tau32 = np.float32(tau)
    if tau32 < tau:
        tau32 = np.nextafter(tau32, np.float32(np.inf))
    log_prob = None
    with torch.no_grad():
        for scale, zs in enumerate(z):
            half = max(int((win_size / 2**scale) // 2), 1)
            side = 2 * half + 1
            zs = zs.detach().cpu()
            hits = (zs**2).ge(float(tau32)).sum(dim=1, keepdim=True).double()
            # Window sums of integer counts: exact in float64. Reflect-padding the counts equals
            # reflect-padding z^2 before thresholding.
            hits = F.pad(hits, (half, half, half, half), mode="reflect")
            k = F.conv2d(hits, torch.ones(1, 1, side, side, dtype=torch.float64)).long()
            # Only floor(k / C) in 0..side^2 reaches scipy, so tabulate the tail once per scale.
            tail = stats.binom.logsf(np.arange(side**2 + 1), side**2, 1 - probability) / np.log(10)
            scale_log_prob = torch.from_numpy(tail)[torch.div(k, zs.shape[1], rounding_mode="floor")]
            up = F.interpolate(scale_log_prob, size=as_shape(eval_size), mode="bicubic", align_corners=True)
            # The scale sum and the final steps run in numpy (single-threaded: no torch thread barriers,
            # which stall on an oversubscribed machine); summing in scale order matches the reference's
            # torch.sum over the stacked scales.
            log_prob = up.numpy() if log_prob is None else np.add(log_prob, up.numpy(), out=log_prob)
    # float32 like the reference's torch.log10 of an integer tensor; added in float64.
    log_n_tests = torch.log10(torch.tensor(sum(zs.shape[-2] * zs.shape[-1] for zs in z))).item()
    np.negative(np.add(log_prob, log_n_tests, out=log_prob), out=log_prob)
    return torch.from_numpy(log_prob).to(z[0].device)
