"""Data sets: one module per on-disk layout, one shared Dataset, one LightningDataModule."""

from uflow_exp.data.datamodule import LAYOUTS, AnomalyDataModule
from uflow_exp.data.dataset import AnomalyDataset, validate_records
from uflow_exp.data.records import (
    BadFileError,
    DatasetError,
    DatasetNotFoundError,
    FileProblems,
    LayoutContext,
    NpyFrame,
    Record,
    Splits,
)

__all__ = [
    "LAYOUTS",
    "AnomalyDataModule",
    "AnomalyDataset",
    "BadFileError",
    "DatasetError",
    "DatasetNotFoundError",
    "FileProblems",
    "LayoutContext",
    "NpyFrame",
    "Record",
    "Splits",
    "validate_records",
]
