"""Pixel anomaly map from the latents' likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def anomaly_map(z: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``1 - mean_s upsample(exp(-0.5 * mean_c z_s^2))`` as a (B, 1, size, size) map in [0, 1]."""
    probabilities = [
        F.interpolate(
            torch.exp(-0.5 * zs.pow(2).mean(dim=1, keepdim=True)),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
        for zs in z
    ]
    return 1.0 - torch.stack(probabilities, dim=-1).mean(dim=-1)
