"""A user's own images: a folder of normal images, a folder of anomalous ones and, optionally, masks."""

from __future__ import annotations

import logging

from uflow_exp.data.records import (
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
    "ROOT/<abnormal_dir>/<name>.* (anomalous, test only), optional ROOT/<mask_dir>/<name><mask_suffix>.*"
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
    abnormal = list_images(abnormal_folder)
    if mask_dir is None:
        log.warning(
            "folder: no mask_dir, so the %d anomalous images get empty masks: image-level metrics are "
            "meaningful, pixel-level ones are not",
            len(abnormal),
        )
        return Splits(train, normal_test + [Record(image, None, 1) for image in abnormal])
    masks = require_dir(root / mask_dir, "folder", EXPECTED)
    if masks.resolve() == abnormal_folder.resolve():
        abnormal, _ = images_and_masks(abnormal_folder, mask_suffix)
    return Splits(
        train,
        normal_test + abnormal_records(abnormal, masks, lambda image: image.stem + mask_suffix, ctx.problems),
    )
