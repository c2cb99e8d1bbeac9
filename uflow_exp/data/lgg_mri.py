"""LGG MRI (Kaggle lgg-mri-segmentation): `ROOT/kaggle_3m/<patient>/<patient>_<n>.tif` + `_mask.tif`.

There is no official split. Normal images are the slices whose mask is empty. Patients, never slices,
are split (seeded), so no patient is in both train and test; slices with tumour appear only in test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from uflow_exp.data.io import read_mask
from uflow_exp.data.records import (
    BadFileError,
    DatasetError,
    LayoutContext,
    Record,
    Splits,
    images_and_masks,
    pair_masks,
    require_dir,
    root_dir,
)

log = logging.getLogger(__name__)

EXPECTED = "ROOT/kaggle_3m/<patient>/<patient>_<slice>.tif with <patient>_<slice>_mask.tif beside it"


def _patient_records(patient: Path, ctx: LayoutContext) -> list[Record]:
    images, masks = images_and_masks(patient, "_mask")
    records = []
    for image, mask in pair_masks(images, masks, lambda image: f"{image.stem}_mask", patient, ctx.problems):
        try:
            records.append(Record(image, mask, int(read_mask(mask).any()), group=patient.name))
        except BadFileError as error:
            ctx.problems.report(error.path, error.reason)
    return records


def find_records(ctx: LayoutContext, test_fraction: float = 0.2) -> Splits:
    base = require_dir(root_dir(ctx, "lgg_mri", EXPECTED) / "kaggle_3m", "lgg_mri", EXPECTED)
    patients = sorted(p for p in base.iterdir() if p.is_dir())
    if len(patients) < 2:
        raise DatasetError(
            f"lgg_mri: {base} holds {len(patients)} patient folder(s); a patient split needs 2+"
        )
    n_test = min(len(patients) - 1, max(1, round(len(patients) * test_fraction)))
    order = np.random.default_rng(ctx.seed).permutation(len(patients))
    test_patients = {patients[i] for i in order[:n_test]}
    train: list[Record] = []
    test: list[Record] = []
    left_out = 0
    for patient in patients:
        records = _patient_records(patient, ctx)
        if patient in test_patients:
            test += records
        else:
            train += [r for r in records if r.label == 0]
            left_out += sum(r.label for r in records)
    log.info(
        "lgg_mri: %d train / %d test patients; %d tumour slices of training patients are not used",
        len(patients) - n_test,
        n_test,
        left_out,
    )
    return Splits(train, test)
