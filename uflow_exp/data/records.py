"""Sample records and the shared helpers layout modules use to list, pair and report files.

A layout module turns (root, category, options) into `Splits` of `Record`s and nothing else; reading
pixels is the job of `uflow_exp.data.dataset`, so every data set goes through one reading path.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
ON_BAD_FILE = ("error", "warn")


class DatasetError(ValueError):
    """A data set on disk does not match what its layout expects."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A root, category or split folder is missing."""


class BadFileError(DatasetError):
    """One file is unreadable, unpaired or inconsistent with its partner."""

    def __init__(self, path: Path | str, reason: str | None = None) -> None:
        # A DataLoader worker's exception is re-raised as type(message): one argument must work too.
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class NpyFrame:
    """Frame `index` of a (frames, H, W) array saved with `numpy.save` (ShanghaiTech pixel masks)."""

    path: Path
    index: int


MaskSource = Path | NpyFrame


@dataclass(frozen=True)
class Record:
    """One sample: an image file, its mask (None: all normal), its label (0 normal, 1 anomalous) and the
    group it was taken from where the layout knows one (an MRI patient, a video): images of one group
    are near-copies of each other, so a held-out split keeps a group whole (`split_off`)."""

    image: Path
    mask: MaskSource | None
    label: int
    group: str | None = None


class Splits(NamedTuple):
    train: list[Record]
    test: list[Record]


@dataclass
class FileProblems:
    """Bad files found while listing or validating: the first one raises under `on_bad_file="error"`;
    under `"warn"` each is logged, the caller skips it, and `summarise` logs how many were skipped."""

    on_bad_file: str = "error"
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_file not in ON_BAD_FILE:
            raise DatasetError(f"on_bad_file must be one of {ON_BAD_FILE}, got {self.on_bad_file!r}")

    def report(self, path: Path | str, reason: str) -> None:
        if self.on_bad_file == "error":
            raise BadFileError(path, f"{reason} (dataset.on_bad_file=warn skips such files)")
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

    def summarise(self, dataset: str) -> None:
        if self.skipped:
            log.warning(
                "%s: skipped %d bad file(s) (on_bad_file=warn); first: %s",
                dataset,
                len(self.skipped),
                f"{self.skipped[0][0]}: {self.skipped[0][1]}",
            )


@dataclass(frozen=True)
class LayoutContext:
    """What every layout receives besides its own options."""

    root: Path | None
    category: str | None
    seed: int
    problems: FileProblems


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Fill the cache folder `target` with `build(folder)` unless it exists.

    `build` writes into a private temporary folder that is renamed at the end, so an interrupted or
    failed build never leaves a folder that looks complete, and concurrent builders do not collide.
    """
    if target.is_dir():
        return
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        build(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(target)
    except OSError:  # another process finished the same build first
        shutil.rmtree(partial)


def natural_key(path: Path) -> list[int | str]:
    """Sort key that orders `slice_2` before `slice_10`, so record order is the human one."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def require_dir(path: Path, layout: str, expected: str) -> Path:
    if not path.is_dir():
        raise DatasetNotFoundError(f"{layout}: no folder {path}. Expected layout: {expected}")
    return path


def root_dir(ctx: LayoutContext, layout: str, expected: str) -> Path:
    if ctx.root is None:
        raise DatasetNotFoundError(f"{layout}: dataset.root is not set. Expected layout: {expected}")
    return require_dir(ctx.root, layout, expected)


def category_dir(ctx: LayoutContext, layout: str, expected: str, known: Sequence[str]) -> Path:
    """ROOT/CATEGORY, or an error that lists the categories present and the ones the layout knows."""
    root = root_dir(ctx, layout, expected)
    path = root / str(ctx.category)
    if ctx.category is None or not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetNotFoundError(
            f"{layout}: no category folder {path} (present under the root: {', '.join(present) or 'none'};"
            f" known categories: {', '.join(known)}). Expected layout: {expected}"
        )
    return path


def two_digits(category: str | int | None) -> str | None:
    """BTAD products and ShanghaiTech scenes are '01', '02', ...; a command line turns 01 into 1."""
    return f"{int(category):02d}" if isinstance(category, int) or str(category).isdigit() else category


def split_off(
    records: Sequence[Record], fraction: float, seed: int, whole_groups: bool = True
) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded `fraction` of `records` (at least one); both parts keep their original order.
    With `whole_groups`, records of one `Record.group` (a patient's slices, a video's frames) are held
    out together: images held out beside their group's others would be near-copies of training images,
    and the checkpoint chosen and the threshold calibrated on them would be judged on images the model
    has as good as seen, not on new ones as at test. Groups are drawn (seeded) until the held-out images
    reach the fraction; records without a group are groups of one, so without groups this is a plain
    image split. With a single group there is nothing to hold out whole, and the images are split (the
    log says so)."""
    count = len(records)
    held = max(1, round(count * fraction))
    if held >= count:
        raise DatasetError(f"cannot hold out {fraction:.0%} of {count} image(s) and keep some for training")
    keys = [r.group if whole_groups and r.group is not None else i for i, r in enumerate(records)]
    groups = list(dict.fromkeys(keys))
    if len(groups) == 1:
        log.warning("one group (%s) holds every image: the held-out images are drawn from it", groups[0])
        groups, keys = list(range(count)), list(range(count))
    size = Counter(keys)
    chosen: set = set()
    taken = 0
    for index in np.random.default_rng(seed).permutation(len(groups))[: len(groups) - 1].tolist():
        if taken >= held:
            break
        chosen.add(groups[index])
        taken += size[groups[index]]
    named = sorted(str(g) for g in chosen if isinstance(g, str))
    if named:
        log.info("held out whole: %d of %d groups (%s)", len(named), len(groups), ", ".join(named))
        if taken > 2 * held:
            log.warning(
                "the %d held-out groups hold %d of %d images, far more than the %.0f%% asked for (few, large "
                "groups): dataset.val_whole_groups=false holds out single images instead",
                len(named), taken, count, 100 * fraction,
            )  # fmt: skip
    kept = [r for r, key in zip(records, keys, strict=True) if key not in chosen]
    return kept, [r for r, key in zip(records, keys, strict=True) if key in chosen]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (any supported suffix, any case), in natural order; the
    other files there are counted in the log by name, so that none is left out without a word."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = sorted(p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        log.info("%s: ignored %d files that are not images (%s)", folder, len(others), shown)
    return sorted(images, key=natural_key)


def images_and_masks(folder: Path, mask_suffix: str) -> tuple[list[Path], list[Path]]:
    """Split a folder that holds both images and their `<name><mask_suffix>.*` masks."""
    files = list_images(folder)
    masks = [p for p in files if p.stem.endswith(mask_suffix)]
    return [p for p in files if not p.stem.endswith(mask_suffix)], masks


def pair_masks(
    images: Sequence[Path],
    masks: Iterable[Path],
    mask_stem: Callable[[Path], str],
    mask_dir: Path,
    problems: FileProblems,
) -> list[tuple[Path, Path]]:
    """Pair each anomalous image with the mask whose stem is `mask_stem(image)`.

    An image without a mask, a mask without an image and two masks for one image are reported, never
    dropped silently; under `on_bad_file="warn"` the unpaired files are left out.
    """
    by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        by_stem.setdefault(mask.stem, []).append(mask)
    pairs = []
    for image in images:
        found = by_stem.pop(mask_stem(image), [])
        if not found:
            problems.report(image, f"image without its mask (expected {mask_stem(image)}.* in {mask_dir})")
        elif len(found) > 1:
            problems.report(image, f"several masks match: {', '.join(str(m) for m in found)}")
        else:
            pairs.append((image, found[0]))
    for orphans in by_stem.values():
        for mask in orphans:
            problems.report(mask, "mask without a matching image")
    return pairs


def abnormal_records(
    images: Sequence[Path],
    mask_dir: Path,
    mask_stem: Callable[[Path], str],
    problems: FileProblems,
) -> list[Record]:
    """Records of the anomalous images in one folder, each paired with its mask from `mask_dir`."""
    # Masks may sit beside their images (mask_dir == the image folder): an image is never a mask.
    masks = sorted(set(list_images(mask_dir)) - set(images), key=natural_key) if mask_dir.is_dir() else []
    return [
        Record(image, mask, 1) for image, mask in pair_masks(images, masks, mask_stem, mask_dir, problems)
    ]


def normal_records(images: Iterable[Path], group: str | None = None) -> list[Record]:
    return [Record(image, None, 0, group) for image in images]
