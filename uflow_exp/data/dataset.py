"""The one Dataset every layout goes through, and the up-front validation of its records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from uflow_exp.data.io import image_shape, mask_shape, read_image, read_mask
from uflow_exp.data.records import BadFileError, FileProblems, NpyFrame, Record
from uflow_exp.tiling import Tiler
from uflow_exp.utils.shapes import as_shape


class FeatureLookup(Protocol):
    """Stored backbone features of an image file (``uflow_exp.feature_cache.FeatureCache``)."""

    def read(self, key: str, tile: int | None = None) -> list[torch.Tensor]: ...


class AnomalyDataset(Dataset):
    """Reads any `Record` as a dict of `image` (3, H, W) float32 RGB in [0, 1], `mask` (1, h, w)
    bool, `label` int64 scalar, `has_mask` bool scalar (False for an anomalous image without a mask:
    its pixels are unlabelled, and its zero mask means nothing) and `path` str, where (H, W) is
    `image_size` (what the backbone takes: a side or [H, W]) and (h, w) is `eval_size` (the maps that
    metrics and thresholds see; `image_size` when None). Pixel normalisation belongs to the model.

    With `features` (set by the training task once it has computed them) a sample carries the
    image's stored backbone `features` (a list of per-scale tensors; under tiling (tiles, C, h, w)
    each) instead of `image`, and the image file is not decoded.

    With `tiles` (a `Tiler` of images at `image_size`) every tile of every image is a sample of its
    own, whose `image` (or `features`) is that tile's, without a `mask`: training takes tiles as
    samples, evaluation takes whole images and the model tiles them.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int | Sequence[int],
        eval_size: int | Sequence[int] | None = None,
        features: FeatureLookup | None = None,
        tiles: Tiler | None = None,
    ) -> None:
        self.records = list(records)
        self.image_size = as_shape(image_size, "image_size")
        self.eval_size = as_shape(eval_size or image_size, "eval_size")
        self.features = features
        self.tiles = tiles
        self._per_image = 1 if tiles is None else len(tiles)

    def __len__(self) -> int:
        return len(self.records) * self._per_image

    def record_of(self, index: int) -> Record:
        """The record sample ``index`` comes from (one of its tiles, under `tiles`)."""
        return self.records[index // self._per_image]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        record = self.record_of(index)
        tile = None if self.tiles is None else index % self._per_image
        sample = {
            "label": torch.tensor(record.label, dtype=torch.int64),
            "has_mask": torch.tensor(record.mask is not None or record.label == 0),
            "path": str(record.image),
        }
        if tile is None:  # training, the one reader of tiles, reads no mask
            sample["mask"] = self._mask(record)
        if self.features is not None:
            sample["features"] = self.features.read(str(record.image), tile)
        else:
            image = self.load_image(record)
            sample["image"] = image if tile is None else self.tiles.crop(image, tile)
        return sample

    def _mask(self, record: Record) -> torch.Tensor:
        """The record's mask at ``eval_size`` (all False without a mask file)."""
        if record.mask is None:
            return torch.zeros(1, *self.eval_size, dtype=torch.bool)
        full = torch.from_numpy(read_mask(record.mask)).float()[None, None]
        # Once, from the file's resolution: area averaging then >= 0.5 keeps a thin defect's
        # share of each output pixel honest.
        return F.interpolate(full, self.eval_size, mode="area")[0] >= 0.5

    def load_image(self, record: Record) -> torch.Tensor:
        """The record's image as (3, *image_size) float32 RGB in [0, 1]."""
        image = torch.from_numpy(read_image(record.image)).permute(2, 0, 1)
        return F.interpolate(
            image[None], self.image_size, mode="bilinear", antialias=True, align_corners=False
        )[0]


def _problem(record: Record, decode: bool) -> tuple[Path | str, str] | None:
    """What is wrong with one record, as (file, reason), or None."""
    try:
        image_hw = read_image(record.image).shape[:2] if decode else image_shape(record.image)
        if record.mask is None:
            return None
        mask_hw = read_mask(record.mask).shape if decode else mask_shape(record.mask)
    except BadFileError as error:
        return error.path, error.reason
    if tuple(mask_hw) == tuple(image_hw):
        return None
    where = (
        f"{record.mask.path}[frame {record.mask.index}]" if isinstance(record.mask, NpyFrame) else record.mask
    )
    sizes = f"{mask_hw[1]}x{mask_hw[0]} pixels but its image {record.image} is {image_hw[1]}x{image_hw[0]}"
    return where, f"mask is {sizes}"


def validate_records(records: Sequence[Record], problems: FileProblems, decode: bool = True) -> list[Record]:
    """Check that every image (and mask) opens and that mask and image sizes agree.

    With `decode` the pixels are decoded too, which is what catches truncated files; without it only
    headers are read. Problems go to `problems` in record order, so the first error is deterministic.
    """
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # decoders release the GIL
        found = list(pool.map(lambda record: _problem(record, decode), records))
    kept = []
    for record, problem in zip(records, found, strict=True):
        if problem is None:
            kept.append(record)
        else:
            problems.report(*problem)
    return kept
