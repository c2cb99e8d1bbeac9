"""Negative log-likelihood of the flow's latents under a standard normal."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def nll_per_sample(z: Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """``sum_s 0.5 * ||z_s[b]||^2 - log|det J|[b]`` for each sample b (constant terms dropped)."""
    sq = sum(0.5 * zs.pow(2).flatten(1).sum(dim=1) for zs in z)
    return sq - log_jac_det


def nll_loss(z: Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL averaged over the batch (not summed: a sum would scale the z term by the
    batch size, a bug in older ports)."""
    return nll_per_sample(z, log_jac_det).mean()
