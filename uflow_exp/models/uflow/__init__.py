"""U-Flow model core: pure torch, no Lightning or Hydra."""

from .anomaly_map import anomaly_map
from .feature_extraction import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWeightsError,
    FeatureExtractor,
    build_feature_extractor,
)
from .flow import build_uflow_graph
from .loss import nll_loss, nll_per_sample
from .model import UFlow

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneWeightsError",
    "FeatureExtractor",
    "UFlow",
    "anomaly_map",
    "build_feature_extractor",
    "build_uflow_graph",
    "nll_loss",
    "nll_per_sample",
]
