"""Raw backbone features computed once per image and reused across epochs (and, on disk, across runs).

Valid only while the backbone is frozen (eval mode, no gradients; checked when a cache is opened and
before it is filled) and the data transform is deterministic (a resize): an image's features then
never change. A random transform (augmentation) would make every stored entry stale, so a
cache must never be combined with one.

One lookup (`FeatureCache`) over two stores: `MemoryStore` (a dict, per process) and `DiskStore` (a
folder under the cache folder, one ``numpy.memmap`` per scale, float32 or float16, rows indexed by
image path). The training task fills the cache before the first epoch; the data sets then read it.
The disk folder is named after what the features depend on -- backbone, input size, the backbone's
actual weights, the image size and each image file's path, size and mtime -- so a sweep over learning
rates computes the backbone once, and a changed image or backbone gets a new folder. A row counts only
once its flag is set, after its data is flushed: a crash leaves it to be recomputed, never read
half-written. Processes (DDP ranks, sweep jobs) share a folder: it appears atomically, complete, and
each writes the rows of the images it sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from uflow_exp.utils.shapes import as_shape, size_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODES = ("true", "false", "memory", "disk")  # as written in the config
# how stored features are kept: float16 halves the memory (rounding each value to 11 significant bits)
DTYPES = {"float32": torch.float32, "float16": torch.float16}
Extract = Callable[[torch.Tensor], list[torch.Tensor]]


class FeatureCacheError(RuntimeError):
    """A feature cache that would be wrong to use: a trainable backbone or a folder of another key."""


class Extractor(Protocol):
    """What a cache needs of a feature extractor (``FeatureExtractor`` has both)."""

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]: ...

    def backbone_modules(self) -> list[nn.Module]: ...


def parse_mode(value: bool | str) -> str:
    """The config value as the one spelling used everywhere: ``true`` (memory when it fits, else
    disk), ``false`` (no cache), ``memory`` or ``disk``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value in ("memory", "disk"):
        return value
    raise ValueError(f"feature_cache must be one of {', '.join(MODES)}; got {value!r}")


def require_frozen(backbone: Sequence[nn.Module]) -> None:
    """Refuse a backbone whose features could change during training."""
    trainable = [name for module in backbone for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        problem = f"its parameter {trainable[0]} requires grad"
    elif any(sub.training for module in backbone for sub in module.modules()):
        problem = "it is in training mode"
    else:
        return
    raise FeatureCacheError(
        f"the feature cache needs a frozen backbone (eval mode, no gradients), but {problem}, so its "
        "features would change during training; set feature_cache=false"
    )


def available_memory() -> int:
    """Bytes the machine can give without swapping (Linux MemAvailable counts reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CacheSpec:
    """What the features depend on besides the backbone's weights and the image files."""

    dataset: str
    category: str | int | None
    backbone: str
    input_size: int | Sequence[int]  # a side, or [height, width]
    image_size: int | Sequence[int]
    layers: Sequence[int] | None = None  # the backbone's feature levels (None: its default)
    dtype: str = "float32"  # how the features are stored, one of DTYPES
    tile_overlap: float | None = None  # under tiling (image_size cut into input_size tiles); else None

    @property
    def label(self) -> str:
        """The readable part of the folder name, e.g. ``mvtec-bottle-resnet18-L123-256``."""
        levels = None if self.layers is None else "L" + "".join(map(str, self.layers))
        stored = None if self.dtype == "float32" else self.dtype
        parts = (self.dataset, self.category, self.backbone, levels, size_key(self.input_size), stored)
        return "-".join(re.sub(r"[^\w.]+", "_", str(part)) for part in parts if part is not None)


def weights_digest(backbone: Sequence[nn.Module]) -> str:
    """A digest of every backbone tensor, so random inits and local weight files key apart too."""
    digest = hashlib.sha256()
    for i, module in enumerate(backbone):
        for name, tensor in module.state_dict().items():
            digest.update(f"{i}.{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(spec: CacheSpec, weights: str, paths: Sequence[str]) -> str:
    """A digest of the spec, the weights digest and each image's (absolute path, size, mtime_ns)."""
    digest = hashlib.sha256(json.dumps({**asdict(spec), "weights": weights}, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class MemoryStore:
    """Per-scale features of each key, in this process's memory, stored as ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._rows: dict[str, list[torch.Tensor]] = {}

    def missing(self, keys: Sequence[str]) -> list[int]:
        return [i for i, key in enumerate(keys) if key not in self._rows]

    def write(self, keys: Sequence[str], scales: Sequence[torch.Tensor]) -> None:
        for row, key in enumerate(keys):
            self._rows[key] = [scale[row].to(self.dtype) for scale in scales]

    def read(self, keys: Sequence[str], tile: int | None = None) -> list[torch.Tensor]:
        n_scales = len(self._rows[keys[0]])
        pick = slice(None) if tile is None else tile
        return [torch.stack([self._rows[key][s][pick] for key in keys]) for s in range(n_scales)]


class DiskStore:
    """One ``numpy.memmap`` (``scale<s>.npy``, float32 or float16) per scale in ``folder``, a row per image
    (``index.json``: absolute path -> row) and ``filled.npy``, set only after a row's data is flushed.

    ``open`` creates the folder (atomically) or reuses it; a folder whose metadata, index or arrays
    differ from what this run expects is refused, never read or overwritten.
    """

    def __init__(self, folder: Path, meta: dict, paths: Sequence[str], created: bool) -> None:
        self.folder = folder
        self.created = created
        self.dtype = DTYPES[meta["dtype"]]
        try:
            found = json.loads((folder / "meta.json").read_text())
            index = json.loads((folder / "index.json").read_text())
            self._scales = [
                open_memmap(folder / f"scale{s}.npy", mode="r+") for s in range(len(meta["shapes"]))
            ]
            self._filled = open_memmap(folder / "filled.npy", mode="r+")
        except (OSError, ValueError) as err:
            raise self._refusal(f"unreadable: {err}") from err
        self._index = {path: row for row, path in enumerate(paths)}
        problem = self._mismatch(meta, found, index)
        if problem:
            raise self._refusal(problem)

    @classmethod
    def open(
        cls,
        root: Path,
        label: str,
        key: str,
        paths: Sequence[str],
        shapes: Sequence[Sequence[int]],
        dtype: str = "float32",
    ) -> DiskStore:
        """The store for ``key`` (``paths`` sorted absolute, ``shapes`` per image and scale)."""
        folder = root / f"{label}-{key[:12]}"
        meta = {
            "version": FORMAT_VERSION,
            "key": key,
            "rows": len(paths),
            "dtype": dtype,
            "shapes": [list(shape) for shape in shapes],
        }
        created = not folder.is_dir() and _create_atomically(
            folder, lambda tmp: _write_layout(tmp, meta, paths)
        )
        return cls(folder, meta, paths, created)

    def _mismatch(self, meta: dict, found: object, index: object) -> str | None:
        if not isinstance(found, dict):
            return "meta.json holds no object"
        for field, value in meta.items():
            if found.get(field) != value:
                return f"meta.json {field} is {found.get(field)!r}, expected {value!r}"
        if index != self._index:
            return "index.json lists other images or rows"
        arrays = [*self._scales, self._filled]
        shapes = [(meta["rows"], *shape) for shape in meta["shapes"]] + [(meta["rows"],)]
        dtypes = [np.dtype(meta["dtype"])] * len(self._scales) + [np.dtype(np.uint8)]
        for array, shape, dtype in zip(arrays, shapes, dtypes, strict=True):
            if array.shape != shape or array.dtype != dtype:
                return f"{Path(array.filename).name} is {array.dtype}{array.shape}, expected {dtype}{shape}"
        return None

    def _refusal(self, reason: str) -> FeatureCacheError:
        return FeatureCacheError(
            f"feature cache folder {self.folder} does not match this run ({reason}); it was left as it "
            f"is. Delete the folder to rebuild it: rm -r '{self.folder}'"
        )

    @property
    def filled_rows(self) -> int:
        return int(np.count_nonzero(self._filled))

    def _rows(self, keys: Sequence[str]) -> list[int]:
        try:
            return [self._index[os.path.abspath(key)] for key in keys]
        except KeyError as err:
            raise FeatureCacheError(
                f"image {err.args[0]} is not among the {len(self._index)} images the feature cache in "
                f"{self.folder} was opened for (the data changed after the fit started?)"
            ) from None

    def missing(self, keys: Sequence[str]) -> list[int]:
        filled = self._filled[self._rows(keys)]
        return [i for i, flag in enumerate(filled) if not flag]

    def write(self, keys: Sequence[str], scales: Sequence[torch.Tensor]) -> None:
        rows = self._rows(keys)
        for array, scale in zip(self._scales, scales, strict=True):
            array[rows] = scale.to(DTYPES[str(array.dtype)]).numpy()
            array.flush()
        self._filled[rows] = 1  # only now: a crash before this line leaves the rows to recompute
        self._filled.flush()

    def read(self, keys: Sequence[str], tile: int | None = None) -> list[torch.Tensor]:
        rows = self._rows(keys)
        pick = slice(None) if tile is None else tile  # one tile's slice is all that is read
        return [torch.from_numpy(np.asarray(array[rows, pick])) for array in self._scales]


def _write_layout(folder: Path, meta: dict, paths: Sequence[str]) -> None:
    """An empty store in ``folder``: zero-filled (sparse) arrays, no row flagged."""
    (folder / "index.json").write_text(json.dumps({path: row for row, path in enumerate(paths)}, indent=0))
    for s, shape in enumerate(meta["shapes"]):
        open_memmap(folder / f"scale{s}.npy", mode="w+", dtype=meta["dtype"], shape=(meta["rows"], *shape))
    open_memmap(folder / "filled.npy", mode="w+", dtype=np.uint8, shape=(meta["rows"],))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _create_atomically(folder: Path, fill: Callable[[Path], None]) -> bool:
    """Fill a private temporary folder, then move it to ``folder`` in one ``os.replace``.

    Returns whether this call created ``folder``: False when another process (a DDP rank, a sweep
    job) moved its own there first, whose folder is then used.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        fill(partial)
        os.replace(partial, folder)
        return True
    except OSError:
        if not folder.is_dir():
            raise
        return False
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class FeatureCache:
    """Per-scale raw features by image key (absolute path), filled once before training and then read
    by the data sets in place of the images (``AnomalyDataset(features=...)``).

    Args:
        store: a ``MemoryStore`` (the default) or a ``DiskStore``.
        backbone: the modules whose features are cached; checked to be frozen before the first fill.
    """

    def __init__(
        self, store: MemoryStore | DiskStore | None = None, backbone: Sequence[nn.Module] = ()
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        self._backbone = list(backbone)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys whose features are not stored yet."""
        keys = [os.path.abspath(key) for key in keys]
        return [keys[i] for i in self.store.missing(keys)]

    def fill(self, batches: Iterable[tuple[Sequence[str], torch.Tensor]], extract: Extract) -> int:
        """Extract and store the features of every ``(keys, images)`` batch; returns the image count."""
        require_frozen(self._backbone)
        count = 0
        for keys, images in batches:
            fresh = extract(images)
            self._check_range(fresh)
            self.store.write(
                [os.path.abspath(key) for key in keys], [scale.detach().cpu() for scale in fresh]
            )
            count += len(keys)
        return count

    def read(self, key: str, tile: int | None = None) -> list[torch.Tensor]:
        """The stored features of one image, (C, ...) per scale, on the CPU; under tiling (rows of
        (tiles, C, ...)) only tile ``tile`` when given, so a tile sample copies its own slice."""
        key = os.path.abspath(key)
        if self.store.missing([key]):
            raise FeatureCacheError(
                f"image {key} has no features in the cache: it was not among the images the cache "
                "was filled with before training (the data changed after the fit started?)"
            )
        return [scale[0].float() for scale in self.store.read([key], tile)]

    def _check_range(self, features: Sequence[torch.Tensor]) -> None:
        dtype = self.store.dtype
        if dtype == torch.float32:
            return
        largest = max(float(scale.abs().max()) for scale in features)
        if largest > torch.finfo(dtype).max:
            raise FeatureCacheError(
                f"a backbone feature reaches {largest:.4g}, beyond what feature_cache_dtype={str(dtype)[6:]} "
                f"holds ({torch.finfo(dtype).max:.4g}); set feature_cache_dtype=float32"
            )


def _feature_shapes(extractor: Extractor, image_size: int | Sequence[int]) -> list[tuple[int, ...]]:
    """Per-image feature shapes, from one blank image: the disk layout needs them before any batch."""
    param = next(p for module in extractor.backbone_modules() for p in module.parameters())
    blank = torch.zeros(1, 3, *as_shape(image_size), device=param.device, dtype=param.dtype)
    with torch.no_grad():
        return [tuple(scale.shape[1:]) for scale in extractor.extract(blank)]


def open_feature_cache(
    extractor: Extractor, mode: str, paths: Sequence[str], spec: CacheSpec, root: str | Path | None
) -> FeatureCache:
    """The cache for the features of ``paths`` (the training and validation images).

    ``mode`` ``true`` keeps them in memory when all of them (stored as ``spec.dtype``) take at most a
    quarter of the available memory, else on disk under ``root``; ``memory`` and ``disk`` force a store.
    """
    if spec.dtype not in DTYPES:
        raise ValueError(f"feature_cache_dtype must be one of {', '.join(DTYPES)}; got {spec.dtype!r}")
    backbone = extractor.backbone_modules()
    require_frozen(backbone)
    shapes = _feature_shapes(extractor, spec.image_size)
    images = sorted({os.path.abspath(path) for path in paths})
    itemsize = DTYPES[spec.dtype].itemsize
    nbytes = len(images) * sum(math.prod(shape) for shape in shapes) * itemsize
    why = f"feature_cache={mode}"
    if mode == "true":
        budget = available_memory() // 4
        mode = "memory" if nbytes <= budget else "disk"
        why = f"feature_cache=true and {'within' if mode == 'memory' else 'over'} {budget / 2**20:.0f} MB"
    size = f"{nbytes / 2**20:.1f} MB ({spec.dtype}) for {len(images)} images ({why})"
    if mode == "memory":
        log.info("Feature cache in memory: %s", size)
        return FeatureCache(MemoryStore(DTYPES[spec.dtype]), backbone)
    if root is None:
        raise ValueError("a feature cache on disk needs a folder: set feature_cache_dir")
    key = cache_key(spec, weights_digest(backbone), images)
    store = DiskStore.open(Path(root), spec.label, key, images, shapes, spec.dtype)
    state = "new" if store.created else f"reused, {store.filled_rows} of {len(images)} rows already filled"
    log.info("Feature cache on disk in %s: %s; %s", store.folder, size, state)
    return FeatureCache(store, backbone)
