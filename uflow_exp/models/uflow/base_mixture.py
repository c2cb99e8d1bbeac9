"""A Gaussian mixture as each latent scale's base density, fitted to the normal training images' latents
after the flow is trained.

The flow is trained to map normal features to a standard normal, but a flow of the size U-Flow uses does
not get there on real data: rare normal structure (a vessel in a scan, a bright grain in gravel) lands
in regions of the latent space the standard normal calls unlikely, and the map lights it up. A mixture of
diagonal Gaussians fitted to where the normal latents really are scores such positions as normal. Only
the anomaly map (and the image score, its maximum) reads it; the NFA's test needs the standard normal
the method assumes, and keeps it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the smallest variance a component may take, per channel: a component fitted to latents that barely
# vary (a flat background) would otherwise call any small deviation there a huge one
VARIANCE_FLOOR = 1e-3
# the fewest latent vectors per component a scale's mixture is fitted with (small data sets get fewer
# components)
POINTS_PER_COMPONENT = 10

log = logging.getLogger(__name__)


class LatentMixture(nn.Module):
    """Per latent scale, a mixture of ``components`` diagonal Gaussians; unfitted, it stands aside
    (``fitted`` False) and the standard normal scores the latents.

    Args:
        channels: the latent channels of each scale, finest first.
        components: Gaussians per scale.
        fit_points: latent vectors per scale the mixture is fitted on at most (a seeded random subset).
    """

    def __init__(self, channels: Sequence[int], components: int, fit_points: int = 60_000) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"base_mixture_components must be >= 1 (0: no mixture), got {components}")
        self.channels = [int(c) for c in channels]
        self.components = int(components)
        self.fit_points = int(fit_points)
        for i, c in enumerate(self.channels):
            self.register_buffer(f"mean_{i}", torch.zeros(components, c))
            self.register_buffer(f"var_{i}", torch.ones(components, c))
            self.register_buffer(f"log_weight_{i}", torch.full((components,), -math.log(components)))
        self.register_buffer("fitted", torch.tensor(False))

    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def _scale_buffers(self, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale ``scale``'s component means and variances (K, C) and log weights (K,): its buffers."""
        return tuple(getattr(self, f"{name}_{scale}") for name in ("mean", "var", "log_weight"))

    def fit(self, samples: Sequence[torch.Tensor], seed: int = 0) -> None:
        """Fit each scale's mixture to its (N, C) latent vectors by EM (scikit-learn's, k-means started,
        with ``seed``). Fitting is a one-off on the CPU; the mixture then scores latents in torch (and in
        the exported graph)."""
        if len(samples) != len(self.channels):
            raise ValueError(f"expected latents of {len(self.channels)} scales, got {len(samples)}")
        generator = torch.Generator().manual_seed(seed)
        for i, x in enumerate(samples):
            if x.ndim != 2 or x.shape[1] != self.channels[i]:
                expected = f"latent vectors of {self.channels[i]} channels"
                raise ValueError(f"scale {i}: expected {expected}, got shape {tuple(x.shape)}")
            self._fit_scale(i, x[torch.randperm(len(x), generator=generator)[: self.fit_points]], seed)
        self.fitted.fill_(True)

    def _fit_scale(self, scale: int, x: torch.Tensor, seed: int) -> None:
        """Fit scale ``scale``'s mixture to ``x``, with fewer components when there are fewer than
        ``POINTS_PER_COMPONENT`` vectors for each (small data; the unused ones get weight 0)."""
        from sklearn.mixture import GaussianMixture

        components = min(self.components, len(x) // POINTS_PER_COMPONENT)
        if components < 1:
            raise ValueError(
                f"flow.base_mixture_components: the training images give {len(x)} latent vectors at scale "
                f"{scale}, fewer than the {POINTS_PER_COMPONENT} a component needs: use more (or larger) "
                "training images, or flow.base_mixture_components=0 (no mixture)"
            )
        if components < self.components:
            log.warning("Base mixture: %d latent vectors at scale %d fit %d of the %d components",
                        len(x), scale, components, self.components)  # fmt: skip
        gmm = GaussianMixture(components, covariance_type="diag", reg_covar=VARIANCE_FLOOR, random_state=seed)
        gmm.fit(x.double().cpu().numpy())
        mean, var, log_weight = self._scale_buffers(scale)
        mean.zero_()
        var.fill_(1.0)
        log_weight.fill_(-math.inf)
        mean[:components] = torch.as_tensor(gmm.means_)
        var[:components] = torch.as_tensor(gmm.covariances_)
        log_weight[:components] = torch.as_tensor(gmm.weights_).log()

    def likelihood(self, zs: torch.Tensor, scale: int) -> torch.Tensor:
        """The mixture's counterpart of `standard_likelihood` for the latents of ``scale``: ``exp(-(NLL -
        NLL_0) / C)`` with NLL the mixture's negative log-density of a position's C channels and NLL_0 the
        standard normal's at its peak, so that the standard normal itself would give
        ``standard_likelihood``. Above 1 where a latent is likelier than the standard normal's peak
        (at most e^20). The squared distances are expanded into 1 x 1 convolutions (one per term), which
        need no (positions x components x channels) intermediate and export to ONNX as they are."""
        mean, var, log_weight = self._scale_buffers(scale)
        channels = zs.shape[1]
        if channels != mean.shape[1]:
            raise ValueError(f"scale {scale} has {mean.shape[1]} latent channels, got {channels}")
        precision = 1.0 / var
        squared = (
            F.conv2d(zs.pow(2), precision[:, :, None, None])
            - 2.0 * F.conv2d(zs, (mean * precision)[:, :, None, None])
            + (mean.pow(2) * precision).sum(1)[None, :, None, None]
        )  # (B, K, h, w): each component's squared Mahalanobis distance
        log_density = log_weight[None, :, None, None] - 0.5 * (
            squared + var.log().sum(1)[None, :, None, None]
        )
        excess = -torch.logsumexp(log_density, dim=1, keepdim=True) / channels  # the 2 pi terms cancel
        return torch.exp(-excess.clamp(min=-20.0))

    def likelihoods(self, z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`likelihood` of every scale of ``z``: all of them, or the coarsest ``len(z)``."""
        first = len(self.channels) - len(z)
        return [self.likelihood(zs, first + i) for i, zs in enumerate(z)]
