"""Tiles: a large image cut into backbone-sized windows, and their maps blended back into one.

``dataset.tiling`` cuts each image, at one whole-image shape (``shape``, [height, width]), into tiles of
the backbone's input size that overlap by at least ``overlap`` of a tile; training takes the tiles as
samples, evaluation runs every tile of an image and blends the tile maps into the image's map.

Hand-written: torch's ``unfold`` / ``fold`` need one stride, and a grid whose last tile is flush with the
image's edge (so that no pixel is padding) has unequal strides; anomalib's tiler is not a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from uflow_exp.utils.shapes import Shape, as_shape, shape_text

# dataset.tiling's keys: the scale the image is cut at, the tiles' overlap, the resulting whole-image
# shape (written by the training task from the data), and how many tiles go through the model at once
TILING_KEYS = ("scale", "overlap", "shape", "batch")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where the tiles of one axis start: as few tiles as keep neighbours overlapping by at least
    ``overlap`` of a tile, spread evenly from 0 to ``length - tile`` (the last one flush with the edge)."""
    if length < tile:
        raise ValueError(f"an image side of {length} px cannot hold a {tile} px tile")
    if length == tile:
        return [0]
    step = tile * (1.0 - overlap)
    count = math.ceil((length - tile) / step - 1e-9) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


class Tiler:
    """The tiles of ``tile`` shape that cover images of ``shape`` with at least ``overlap`` (in [0, 1))
    of a tile shared by neighbours. ``origins`` lists each tile's (top, left) row by row."""

    def __init__(self, shape: int | Sequence[int], tile: int | Sequence[int], overlap: float) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"dataset.tiling.overlap must lie in [0, 1) (a share of a tile), got {overlap}")
        self.shape: Shape = as_shape(shape, "dataset.tiling.shape")
        self.tile: Shape = as_shape(tile, "the tile (backbone.input_size)")
        if any(s < t for s, t in zip(self.shape, self.tile, strict=True)):
            raise ValueError(
                f"dataset.tiling: images of {shape_text(self.shape)} px are smaller than one "
                f"{shape_text(self.tile)} tile (height x width)"
            )
        self.overlap = float(overlap)
        rows = tile_starts(self.shape[0], self.tile[0], overlap)
        cols = tile_starts(self.shape[1], self.tile[1], overlap)
        self.origins = [(top, left) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.origins)

    def crop(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """Tile ``index`` of ``image`` (..., H, W) at ``shape``."""
        top, left = self.origins[index]
        return image[..., top : top + self.tile[0], left : left + self.tile[1]]

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images at ``shape`` -> (B * len(self), C, *tile), each image's tiles together."""
        if tuple(images.shape[-2:]) != self.shape:
            raise ValueError(
                f"tiling expects images of {shape_text(self.shape)} px, got {shape_text(images.shape[-2:])}"
            )
        return torch.stack([self.crop(images, i) for i in range(len(self))], dim=1).flatten(0, 1)

    def blended_shape(self, tile_map: Sequence[int]) -> Shape:
        """The whole image's map shape for tile maps of ``tile_map`` (height, width)."""
        return tuple(round(s * m / t) for s, m, t in zip(self.shape, tile_map, self.tile, strict=True))

    def blend(self, maps: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """(B * len(self), C, h, w) tile maps (from `cut`'s order) -> (B, C, *blended_shape). Where tiles
        overlap: ``reduce="mean"`` (anomaly maps) weighs each tile by how far inside it a pixel lies,
        fading linearly to zero across the overlap towards its neighbour (the weights of two
        neighbours sum to one), so no seam shows where a tile ends and the features a tile computes at
        its padded border count least; ``"max"`` (significance) keeps the largest, so that a region any
        tile finds stays found."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        tiles = maps.unflatten(0, (-1, len(self)))
        h, w = maps.shape[-2:]
        height, width = self.blended_shape((h, w))
        fill = 0.0 if reduce == "mean" else float("-inf")
        out = maps.new_full((tiles.shape[0], maps.shape[1], height, width), fill)
        total = maps.new_zeros((1, 1, height, width))
        rows = _fades(self._starts(0), self.tile[0], h)
        cols = _fades(self._starts(1), self.tile[1], w)
        for i, (top, left) in enumerate(self.origins):
            y, x = round(top * h / self.tile[0]), round(left * w / self.tile[1])
            window = (..., slice(y, y + h), slice(x, x + w))
            if reduce == "mean":
                weight = (rows[top][:, None] * cols[left][None, :]).to(maps)
                out[window] += tiles[:, i] * weight
                total[window] += weight
            else:
                out[window] = torch.maximum(out[window], tiles[:, i])
        return out / total if reduce == "mean" else out

    def _starts(self, axis: int) -> list[int]:
        return sorted({origin[axis] for origin in self.origins})


def _fades(starts: list[int], tile: int, size: int) -> dict[int, torch.Tensor]:
    """Per tile start, the weights of a tile's ``size`` map pixels along one axis: 1 inside, falling
    linearly to 0 across each overlap with a neighbour (complementary, so two neighbours' weights sum
    to 1 there), never below a small floor (every pixel keeps some weight)."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) * tile / size  # in image pixels
    fades = {}
    for i, start in enumerate(starts):
        weight = torch.ones(size, dtype=torch.float64)
        if i > 0:  # rises across [start, previous end)
            weight = torch.minimum(weight, centres / (starts[i - 1] + tile - start))
        if i + 1 < len(starts):  # falls across [next start, end)
            weight = torch.minimum(weight, (tile - centres) / (start + tile - starts[i + 1]))
        fades[start] = weight.clamp(min=1e-3)
    return fades


def whole_shape(height: int, width: int, scale: int | str, tile: Sequence[int]) -> Shape:
    """The shape an image of ``height`` x ``width`` px is cut at: its own (``scale="native"``) or with
    its longer side at ``scale`` px, and scaled up, aspect kept, until it holds one ``tile``."""
    if scale == "native":
        factor = 1.0
    elif isinstance(scale, int) and not isinstance(scale, bool) and scale > 0:
        factor = scale / max(height, width)
    else:
        raise ValueError(
            f"dataset.tiling.scale={scale!r}: expected 'native' or the longer side in pixels (an int)"
        )
    factor = max(factor, *(t / s for t, s in zip(tile, (height, width), strict=True)))
    return max(tile[0], round(height * factor)), max(tile[1], round(width * factor))


def tiler_of(tiling: Mapping | None, tile: int | Sequence[int]) -> Tiler | None:
    """The `Tiler` of a ``tiling`` config whose ``shape`` is known (None: no tiling)."""
    if not tiling:
        return None
    unknown = set(tiling) - set(TILING_KEYS)
    if unknown:
        raise ValueError(f"dataset.tiling has unknown keys {sorted(unknown)}; expected some of {TILING_KEYS}")
    if tiling.get("shape") is None:
        raise ValueError("dataset.tiling.shape is not known yet: the training task sets it from the data")
    return Tiler(tiling["shape"], tile, tiling.get("overlap", 0.25))


class TiledExtractor:
    """A feature extractor (``extract``, ``backbone_modules``) of whole images that returns each
    image's tiles' features together, (B, tiles, C, h, w) per scale: what the feature cache stores
    under tiling, one row per image. ``batch`` tiles go through the backbone at a time."""

    def __init__(self, extractor, tiler: Tiler, batch: int = 16) -> None:
        self.extractor, self.tiler, self.batch = extractor, tiler, batch

    def backbone_modules(self) -> list:
        return self.extractor.backbone_modules()

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        parts = [self.extractor.extract(chunk) for chunk in self.tiler.cut(images).split(self.batch)]
        return [
            torch.cat(scale).unflatten(0, (len(images), len(self.tiler)))
            for scale in zip(*parts, strict=True)
        ]
