"""U-Flow: frozen multi-scale features -> U-shaped normalizing flow -> latents per scale."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uflow_exp.utils.shapes import as_shape

from .anomaly_map import merged_map, scale_maps, standard_likelihood
from .base_mixture import LatentMixture
from .feature_extraction import build_feature_extractor
from .flow import build_uflow_graph

log = logging.getLogger(__name__)

# Prefixes of the authors' checkpoints that belong to the model; everything else in their
# Lightning checkpoints (metric states such as aupro / f1 / mcc buffers, loss weights) is dropped.
MODEL_PREFIXES = ("feature_extractor.", "flow.")


def position_encoding(channels: int, size: int | tuple[int, int]) -> torch.Tensor:
    """``(channels, H, W)`` sinusoids of each pixel's relative position (``size``: H = W, or (H, W)):
    for the row coordinate ``u = (i + 0.5) / H`` and the column coordinate ``(j + 0.5) / W``, both in
    (0, 1), ``sin`` and ``cos`` of ``pi 2^k u`` for ``k < channels / 4``. Relative rather than in
    pixels, so every scale codes the same place alike."""
    if channels <= 0 or channels % 4:
        raise ValueError(f"position_channels must be a positive multiple of 4, got {channels}")
    height, width = as_shape(size)
    frequencies = math.pi * 2.0 ** torch.arange(channels // 4, dtype=torch.float32)

    def axis(n: int) -> torch.Tensor:  # (channels / 2, n)
        angles = ((torch.arange(n, dtype=torch.float32) + 0.5) / n)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1).T

    rows = axis(height)[:, :, None].expand(-1, height, width)
    columns = axis(width)[:, None, :].expand(-1, height, width)
    return torch.cat([rows, columns], dim=0).contiguous()


class UFlow(nn.Module):
    """The U-Flow model (pure torch).

    Args:
        backbone: ``mcait``, ``resnet18``, ``wide_resnet50_2``, ``efficientnet_lite0`` or another timm
            ``features_only`` model name.
        input_size: input side in pixels, or ``(height, width)`` of a rectangle (``mcait`` needs 448).
        flow_steps: AllInOne blocks per scale.
        affine_clamp: soft clamp of the coupling's log-scale.
        subnet_channels_ratio: hidden channels of the coupling subnet relative to its input.
        subnet_kernel: kernel size of the coupling subnets' convolutions in every other flow step (the
            steps between are 1 x 1): 3 is the reference; 1 makes each latent a function of its own
            position's features (and its coarser parent's), so a defect does not spread to its
            neighbours' latents.
        permute_soft: random orthogonal instead of hard channel permutations.
        pretrained: take ImageNet weights (the hub, or the offline package for efficientnet_lite0).
        weights: a local weights file (two files for mcait) instead of ``pretrained``.
        fast_flow: build the flow from ``FastAllInOneBlock`` (same parameters and results, faster); False
            builds FrEIA's reference blocks.
        compile_coupling: run the fast blocks' element-wise coupling through ``torch.compile`` (a
            one-off compile of tens of seconds; worth it for long runs of the larger flows).
        layers: the backbone's feature levels that feed the flow (timm ``out_indices``, finest first);
            None takes the reference's ``[1, 2, 3]`` (strides 4/8/16). Not for ``mcait``.
        feature_noise: standard deviation of Gaussian noise added to the normalised features while
            training (dequantisation); 0 is the reference. See ``normalize``.
        train_norm_affine: train the per-scale ``LayerNorm`` affine parameters (the reference) or keep
            them at identity. They sit outside the flow, so the likelihood never pays for them.
        map_blur_sigma: Gaussian smoothing of the anomaly map, in pixels of the map (0: the reference).
        position_channels: condition every coupling on a positional encoding of that many channels
            (a multiple of 4; see ``position_encoding``), so the density may depend on where in the
            image a feature is, as in CFlow-AD; 0 is the reference, a position-free density.
        feature_pool: average each normalised feature map over ``feature_pool`` x ``feature_pool``
            neighbourhoods (stride 1, the image border not counted) before the flow, so each position
            carries its local context, as PatchCore aggregates patches; 1 is the reference (none). A
            list gives each scale its own size, finest first (e.g. ``[3, 3, 1, 1]``).
        base_mixture_components: score the latents of the anomaly map with a mixture of that many
            diagonal Gaussians per scale, fitted to the normal training latents once the flow is trained
            (``base_mixture``; `LatentMixture`), instead of the standard normal; 0 is the reference.
            Until it is fitted, and always for the NFA, the standard normal.
    """

    def __init__(
        self,
        backbone: str = "mcait",
        input_size: int | Sequence[int] = 448,
        flow_steps: int = 4,
        affine_clamp: float = 2.0,
        subnet_channels_ratio: float = 1.0,
        subnet_kernel: int = 3,
        permute_soft: bool = False,
        pretrained: bool = True,
        weights: str | Path | Sequence[str | Path] | None = None,
        fast_flow: bool = True,
        compile_coupling: bool = False,
        layers: Sequence[int] | None = None,
        feature_noise: float = 0.0,
        train_norm_affine: bool = True,
        map_blur_sigma: float = 0.0,
        position_channels: int = 0,
        feature_pool: int | Sequence[int] = 1,
        base_mixture_components: int = 0,
    ):
        super().__init__()
        if feature_noise < 0:
            raise ValueError(f"feature_noise must be >= 0, got {feature_noise}")
        self.input_shape = as_shape(input_size, "input_size")
        self.feature_noise = float(feature_noise)
        self.map_blur_sigma = float(map_blur_sigma)
        self.feature_extractor = build_feature_extractor(backbone, input_size, pretrained, weights, layers)
        self.feature_pool = per_scale_pool(feature_pool, len(self.feature_extractor.channels))
        if not train_norm_affine:  # the backbone is frozen already: this leaves the LayerNorms at identity
            self.feature_extractor.requires_grad_(False)
        self.flow = build_uflow_graph(
            self.feature_extractor.channels,
            self.feature_extractor.feature_sizes,
            flow_steps=flow_steps,
            affine_clamp=affine_clamp,
            subnet_channels_ratio=subnet_channels_ratio,
            subnet_kernel=subnet_kernel,
            permute_soft=permute_soft,
            fast=fast_flow,
            compile_coupling=compile_coupling,
            position_channels=position_channels,
        )
        # each latent scale's channels (finest first, as ``encode`` returns them) size its mixture
        self.base_mixture = (
            LatentMixture([node.input_dims[0][0] for node in self.flow.out_nodes], base_mixture_components)
            if base_mixture_components
            else None
        )
        # not saved: a function of the configuration, so checkpoints keep the reference's keys
        self._positions: list[str] = []
        for i, size in enumerate(self.feature_extractor.feature_sizes if position_channels else []):
            self.register_buffer(
                f"position_{i}", position_encoding(position_channels, size), persistent=False
            )
            self._positions.append(f"position_{i}")

    @classmethod
    def from_config(cls, backbone: Mapping, flow: Mapping, **overrides) -> UFlow:
        """Build from the ``backbone`` (name, input_size, pretrained, weights, layers) and ``flow``
        config groups, as a run or a checkpoint's hyper-parameters hold them."""
        args = {
            "backbone": backbone["name"],
            "input_size": backbone["input_size"],
            "pretrained": backbone.get("pretrained", True),
            "weights": backbone.get("weights"),
            "layers": backbone.get("layers"),
            **flow,
        }
        return cls(**(args | overrides))

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone outputs (no gradient; cacheable while the backbone is frozen)."""
        return self.feature_extractor.extract(images)

    def normalize(
        self, raw_features: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Per-scale normalised features; in training mode plus ``feature_noise`` Gaussian noise, drawn
        from ``generator`` when given (a resumed run then draws what the uninterrupted one drew).

        Real images have regions whose features barely vary from image to image (black scan background,
        padding, flat surfaces). Their density under the flow is unbounded, so training drives the
        loss towards minus infinity there and any test deviation, however small, becomes a huge
        latent: the map lights up on the background. The noise bounds that density at its own scale
        (as dequantisation does for flows on discrete data); evaluation sees the features as they are.
        """
        features = self.feature_extractor.normalize(raw_features)
        features = [
            f if k == 1 else F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            for f, k in zip(features, self.feature_pool, strict=True)
        ]
        if self.training and self.feature_noise > 0:
            features = [
                f
                + self.feature_noise
                * torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
                for f in features
            ]
        return features

    def encode(
        self, features: Sequence[torch.Tensor], jac: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents (finest scale first) and the log-Jacobian determinant per sample (zeros when
        ``jac`` is False: anomaly maps and the NFA need only the latents)."""
        batch = features[0].shape[0]
        conditions = [getattr(self, name).expand(batch, -1, -1, -1) for name in self._positions]
        z, log_jac_det = self.flow(list(features), c=conditions, rev=False, jac=jac)
        return list(z), log_jac_det

    def anomaly_map(
        self, z: Sequence[torch.Tensor], size: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The anomaly map of latents ``z``: every scale's, or the coarsest ``len(z)`` scales', at
        ``size`` (None: the input's), scored by the fitted base mixture if there is one, in float32."""
        size = self.input_shape if size is None else size
        # in float32 whatever the trainer's autocast: the mixture's and the blur's convolutions would
        # otherwise run in bfloat16 under trainer.precision=bf16-mixed, and the maps depend on it
        with torch.autocast(z[0].device.type, enabled=False):
            return merged_map(self.likelihoods(z), size, self.map_blur_sigma)

    def scale_maps(
        self, z: Sequence[torch.Tensor], size: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, len(z), H, W): the anomaly map of each scale of ``z`` (every scale, or the coarsest
        ``len(z)``) on its own (`anomaly_map.scale_maps`), at ``size`` (None: the input's), in float32."""
        size = self.input_shape if size is None else size
        with torch.autocast(z[0].device.type, enabled=False):
            return scale_maps(self.likelihoods(z), size, self.map_blur_sigma)

    def likelihoods(self, z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale's (B, 1, h, w) likelihood map of latents ``z`` (every scale, or the coarsest
        ``len(z)``), in float32: the fitted base mixture's, else the standard normal's."""
        with torch.autocast(z[0].device.type, enabled=False):
            z = [zs.float() for zs in z]
            if self.base_mixture is None or not self.base_mixture.is_fitted():
                return [standard_likelihood(zs) for zs in z]
            return self.base_mixture.likelihoods(z)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.encode(self.normalize(self.extract(images)))

    def load_reference_state_dict(
        self, state_dict: Mapping[str, torch.Tensor] | str | Path, require_backbone: bool = False
    ) -> None:
        """Load weights in the authors' layout: a state_dict, or a checkpoint file of their release
        format (a Lightning ``.ckpt`` whose ``state_dict`` keys carry a ``model.`` prefix).

        Backbone tensors may be absent (the backbone then keeps the weights it was built with) unless
        ``require_backbone``; every flow and normalisation tensor must be present and fit.
        """
        if not isinstance(state_dict, Mapping):
            state_dict = torch.load(Path(state_dict), map_location="cpu", weights_only=True)
        if isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
        cleaned, dropped = {}, []
        for key, value in state_dict.items():
            key = key.removeprefix("model.")
            if key.startswith(MODEL_PREFIXES):
                cleaned[key] = value
            else:
                dropped.append(key)
        if dropped:
            log.info("Ignoring %d non-model entries (e.g. %s)", len(dropped), dropped[0])
        result = self.load_state_dict(cleaned, strict=False)
        backbone_keys = {
            f"feature_extractor.{name}.{key}"
            for name, module in self.feature_extractor.named_children()
            if module in self.feature_extractor.backbone_modules()
            for key in module.state_dict()
        }
        # the authors' checkpoints have no base mixture: it stays unfitted (the standard normal)
        missing = [
            k for k in result.missing_keys if k not in backbone_keys and not k.startswith("base_mixture.")
        ]
        backbone_missing = [k for k in result.missing_keys if k in backbone_keys]
        if missing or result.unexpected_keys:
            raise KeyError(
                f"state_dict does not fit this UFlow: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)}); "
                "check backbone, input_size and flow_steps"
            )
        if backbone_missing and require_backbone:
            raise KeyError(
                f"state_dict lacks {len(backbone_missing)} backbone tensors "
                f"(e.g. {backbone_missing[0]}); a released checkpoint must carry its backbone"
            )
        if backbone_missing:
            log.info(
                "Backbone weights not in the state_dict; kept the %d loaded at construction",
                len(backbone_missing),
            )


def per_scale_pool(feature_pool: int | Sequence[int], n_scales: int) -> list[int]:
    """``feature_pool`` as one odd neighbourhood size >= 1 per scale, finest first."""
    sizes = [feature_pool] * n_scales if isinstance(feature_pool, int) else [int(k) for k in feature_pool]
    if len(sizes) != n_scales or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(
            f"feature_pool must be an odd neighbourhood size >= 1, or a list of {n_scales} of them (one per "
            f"scale, finest first), got {feature_pool}"
        )
    return sizes
