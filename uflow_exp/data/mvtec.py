"""MVTec AD: `ROOT/CATEGORY/train/good`, `test/<defect>` and `ground_truth/<defect>/<name>_mask.png`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from uflow_exp.data.records import (
    FileProblems,
    LayoutContext,
    Record,
    Splits,
    abnormal_records,
    category_dir,
    list_images,
    normal_records,
    require_dir,
)

log = logging.getLogger(__name__)

CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
EXPECTED = (
    "ROOT/CATEGORY/train/good/*.png (normal), ROOT/CATEGORY/test/good/*.png (normal), "
    "ROOT/CATEGORY/test/<defect>/<name>.png and ROOT/CATEGORY/ground_truth/<defect>/<name>_mask.png"
)


def mask_stem(image: Path) -> str:
    return f"{image.stem}_mask"


def defect_folder_splits(
    base: Path,
    normal: str,
    mask_stem: Callable[[Path], str],
    problems: FileProblems,
    layout: str,
    expected: str,
) -> Splits:
    """The MVTec-style tree shared by MVTec AD, BTAD and the generated textures: `train/<normal>`,
    `test/<normal>`, `test/<defect>` with masks in `ground_truth/<defect>` named by `mask_stem`.

    Without any `ground_truth/` folder the anomalous images carry image-level labels only (no mask):
    image AUROC is reported, pixel metrics are not. With one, every anomalous image needs its mask.
    """
    train = normal_records(list_images(require_dir(base / "train" / normal, layout, expected)))
    test_dir = require_dir(base / "test", layout, expected)
    truth_dir = base / "ground_truth"
    defects = {p.name for p in test_dir.iterdir() if p.is_dir()} - {normal}
    if truth_dir.is_dir():
        # A ground-truth folder with no test folder of the same name holds only orphan masks.
        defects |= {p.name for p in truth_dir.iterdir() if p.is_dir()}
    test: list[Record] = []
    if (test_dir / normal).is_dir():
        test += normal_records(list_images(test_dir / normal))
    if not truth_dir.is_dir():
        log.info("%s: no %s, so the anomalous test images have image-level labels only", layout, truth_dir)
    for defect in sorted(defects):
        images = list_images(test_dir / defect) if (test_dir / defect).is_dir() else []
        if truth_dir.is_dir():
            test += abnormal_records(images, truth_dir / defect, mask_stem, problems)
        else:
            test += [Record(image, None, 1) for image in images]
    return Splits(train, test)


def find_records(ctx: LayoutContext) -> Splits:
    base = category_dir(ctx, "mvtec", EXPECTED, CATEGORIES)
    return defect_folder_splits(base, "good", mask_stem, ctx.problems, "mvtec", EXPECTED)
