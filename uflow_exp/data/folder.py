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


def _normal_folders(root: Path, abnormal: Path, normal_dir: str, normal_test_dir: str | None) -> set[Path]:
    """The normal folders, resolved; refuses an abnormal_dir that is one of them. A normal folder inside
    abnormal_dir (``normal_test_dir=test/good abnormal_dir=test``, as an MVTec-like tree invites) is
    not a defect type: its images count once, as normal, and the log says so."""
    named = {"normal_dir": normal_dir} | (
        {} if normal_test_dir is None else {"normal_test_dir": normal_test_dir}
    )
    folders = {}
    for key, name in named.items():
        folder = (root / name).resolve()
        if folder == abnormal.resolve():
            raise DatasetError(
                f"folder: {key}={name} and abnormal_dir are the same folder ({folder}); its images would be "
                "labelled both normal and anomalous. Point them at different folders."
            )
        if folder.parent == abnormal.resolve():
            log.info("folder: %s=%s lies inside abnormal_dir; its images count as normal only", key, name)
        folders[folder] = key
    return set(folders)


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
    normal_folders = _normal_folders(root, abnormal_folder, normal_dir, normal_test_dir)
    # one folder of anomalous images, or one subfolder per defect type (as MVTec AD has)
    masks = None if mask_dir is None else require_dir(root / mask_dir, "folder", EXPECTED)
    subfolders = [
        p
        for p in abnormal_folder.iterdir()
        if p.is_dir() and (masks is None or p != masks) and p.resolve() not in normal_folders
    ]
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
