"""A user's own images: a folder of normal images, a folder of anomalous ones and, optionally, masks."""

from __future__ import annotations

import logging
from pathlib import Path

from uflow_exp.data.records import (
    DatasetError,
    LayoutContext,
    Record,
    Splits,
    abnormal_records,
    images_and_masks,
    list_images,
    normal_records,
    require_dir,
    root_dir,
    split_off,
)

log = logging.getLogger(__name__)

EXPECTED = (
    "ROOT/<normal_dir>/* (normal; a seeded test_fraction of them is tested unless normal_test_dir is set), "
    "ROOT/<abnormal_dir>/<name>.* or ROOT/<abnormal_dir>/<defect type>/<name>.* (anomalous, test only), "
    "optional masks ROOT/<mask_dir>/<name><mask_suffix>.* (or ROOT/<mask_dir>/<defect type>/...)"
)


def find_records(
    ctx: LayoutContext,
    normal_dir: str = "normal",
    abnormal_dir: str = "abnormal",
    mask_dir: str | None = None,
    mask_suffix: str = "_mask",
    normal_test_dir: str | None = None,
    test_fraction: float = 0.2,
) -> Splits:
    """Folder names are relative to the root (or absolute)."""
    root = root_dir(ctx, "folder", EXPECTED)
    normal = normal_records(list_images(require_dir(root / normal_dir, "folder", EXPECTED)))
    if normal_test_dir is None:
        train, normal_test = split_off(normal, test_fraction, ctx.seed)
    else:
        train = normal
        normal_test = normal_records(list_images(require_dir(root / normal_test_dir, "folder", EXPECTED)))
    abnormal_folder = require_dir(root / abnormal_dir, "folder", EXPECTED)
    # one folder of anomalous images, or one subfolder per defect type (as MVTec AD has)
    masks = None if mask_dir is None else require_dir(root / mask_dir, "folder", EXPECTED)
    subfolders = [p for p in abnormal_folder.iterdir() if p.is_dir() and (masks is None or p != masks)]
    groups = [Path()] + sorted(p.relative_to(abnormal_folder) for p in subfolders)
    if masks is None:
        log.info("folder: no mask_dir, so the anomalous images have image-level labels only")
    abnormal: list[Record] = []
    by_mask_folder: dict[Path, list[Path]] = {}  # paired per mask folder, so no mask looks orphaned
    for group in groups:
        folder = abnormal_folder / group
        images = list_images(folder)
        if masks is None:
            abnormal += [Record(image, None, 1) for image in images]
            continue
        group_masks = masks / group if (masks / group).is_dir() else masks
        if group_masks.resolve() == folder.resolve():
            images, _ = images_and_masks(folder, mask_suffix)
        by_mask_folder.setdefault(group_masks, []).extend(images)
    for folder, images in by_mask_folder.items():
        abnormal += abnormal_records(images, folder, lambda image: image.stem + mask_suffix, ctx.problems)
    if not abnormal:
        raise DatasetError(f"folder: no anomalous images in {abnormal_folder}. Expected layout: {EXPECTED}")
    return Splits(train, normal_test + abnormal)
