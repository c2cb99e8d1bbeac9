"""Raw backbone features computed once per image and reused across epochs.

Valid because the backbone is frozen (eval mode, no gradients) and the data transform is
deterministic (resize + normalise, no augmentation): an image's features never change during a run.
Keys are the samples' paths. Entries are stored on the CPU in the features' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class FeatureCache:
    """An in-memory map from sample key to its list of per-scale raw features."""

    def __init__(self) -> None:
        self._entries: dict[str, list[torch.Tensor]] = {}

    def features(
        self,
        keys: Sequence[str],
        images: torch.Tensor,
        extract: Callable[[torch.Tensor], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Features of a batch: cached ones looked up, the rest extracted in one backbone call."""
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        if missing:
            fresh = extract(images[missing])
            for row, index in enumerate(missing):
                self._entries[keys[index]] = [scale[row].detach().cpu() for scale in fresh]
        return [
            torch.stack([self._entries[key][s] for key in keys]).to(images.device)
            for s in range(len(self._entries[keys[0]]))
        ]
