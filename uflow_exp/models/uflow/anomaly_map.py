"""Pixel anomaly map from the latents' likelihood."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from uflow_exp.utils.shapes import as_shape


def standard_likelihood(zs: torch.Tensor) -> torch.Tensor:
    """The method's per-position likelihood of a scale's latents (B, C, h, w): ``exp(-0.5 mean_c z^2)``,
    the standard normal's density per channel relative to its peak, as a (B, 1, h, w) map in (0, 1]."""
    return torch.exp(-0.5 * zs.pow(2).mean(dim=1, keepdim=True))


def anomaly_map(
    z: Sequence[torch.Tensor], size: int | tuple[int, int], blur_sigma: float = 0.0
) -> torch.Tensor:
    """``1 - mean_s upsample(exp(-0.5 * mean_c z_s^2))`` as a (B, 1, H, W) map in [0, 1] (``size``:
    H = W, or (H, W)), smoothed by a Gaussian of ``blur_sigma`` pixels (at ``size``) when it is
    positive (0: the reference)."""
    return merged_map([standard_likelihood(zs) for zs in z], size, blur_sigma)


def merged_map(
    likelihoods: Sequence[torch.Tensor], size: int | tuple[int, int], blur_sigma: float = 0.0
) -> torch.Tensor:
    """One minus the mean of the scales' (B, 1, h, w) likelihood maps upsampled to ``size``, clipped at 0
    (a base mixture's likelihood may exceed 1: `base_mixture`), then blurred as ``anomaly_map`` says."""
    probabilities = _upsampled(likelihoods, size)
    return _blurred((1.0 - torch.stack(probabilities, dim=-1).mean(dim=-1)).clamp(min=0.0), blur_sigma)


def scale_maps(
    likelihoods: Sequence[torch.Tensor], size: int | tuple[int, int], blur_sigma: float = 0.0
) -> torch.Tensor:
    """Each scale's own map, ``1 - upsample(likelihood)`` (not clipped), as the channels of one (B, S, H, W)
    tensor at ``size``, blurred as ``anomaly_map`` says; their mean, clipped at 0, is `merged_map`."""
    return _blurred(torch.cat([1.0 - p for p in _upsampled(likelihoods, size)], dim=1), blur_sigma)


def _upsampled(likelihoods: Sequence[torch.Tensor], size: int | tuple[int, int]) -> list[torch.Tensor]:
    return [F.interpolate(p, size=as_shape(size), mode="bilinear", align_corners=False) for p in likelihoods]


def _blurred(maps: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    if blur_sigma <= 0:
        return maps
    radius = max(1, int(4 * blur_sigma + 0.5))  # the kernel reaches 4 sigma, as scipy's does
    return gaussian_blur(maps, [2 * radius + 1] * 2, [float(blur_sigma)] * 2)


def relative_map(amap: torch.Tensor, quantile: float) -> torch.Tensor:
    """Each image's map against its own level: ``(1 + amap - level) / 2``, where ``level`` is the value
    that ``quantile`` of the image's pixels do not exceed (its order statistic ``ceil(quantile N)`` of
    N pixels). Still in [0, 1] for a map in [0, 1], and in the same order within an image; what
    changes is the order across images: a map that is warm all over (another patient's contrast,
    another batch's lighting) is brought down to its peers, so a defect is judged by how far it rises
    above the rest of its own image. ``kthvalue`` rather than ``torch.quantile``, which refuses inputs
    above 16M values (a batch of large tiled images)."""
    level = quantile_level(amap.flatten(1), quantile).view(-1, *[1] * (amap.dim() - 1))
    return (1.0 + amap - level) * 0.5


def quantile_level(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """The value that ``quantile`` of the last dimension's N values do not exceed: their order statistic
    ``ceil(quantile N)`` (one per leading index)."""
    k = max(1, math.ceil(quantile * values.shape[-1]))
    return values.kthvalue(k, dim=-1).values
