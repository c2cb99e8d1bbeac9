"""BTAD (beanTech): `ROOT/{01,02,03}/train/ok`, `test/ok`, `test/ko` and `ground_truth/ko`.

Images and masks are .bmp or .png depending on the product, so masks are matched by file stem.
"""

from __future__ import annotations

from dataclasses import replace

from uflow_exp.data.mvtec import defect_folder_splits
from uflow_exp.data.records import LayoutContext, Splits, category_dir, two_digits

PRODUCTS = ("01", "02", "03")
EXPECTED = (
    "ROOT/PRODUCT/train/ok/* (normal), ROOT/PRODUCT/test/ok/* (normal), ROOT/PRODUCT/test/ko/<name>.bmp|png "
    "and ROOT/PRODUCT/ground_truth/ko/<name>.bmp|png, with PRODUCT one of 01, 02, 03"
)


def find_records(ctx: LayoutContext) -> Splits:
    base = category_dir(replace(ctx, category=two_digits(ctx.category)), "btad", EXPECTED, PRODUCTS)
    return defect_folder_splits(base, "ok", lambda image: image.stem, ctx.problems, "btad", EXPECTED)
