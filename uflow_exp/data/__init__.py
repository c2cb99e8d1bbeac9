"""Data sets: one module per on-disk layout, one shared Dataset, one LightningDataModule.

Names load on first use, so that listing files (``uflow_exp.data.layouts``) imports neither torch
nor Lightning.
"""

import importlib

_WHERE = {
    "LAYOUTS": "layouts",
    "AnomalyDataModule": "datamodule",
    "AnomalyDataset": "dataset",
    "validate_records": "dataset",
    "BadFileError": "records",
    "DatasetError": "records",
    "DatasetNotFoundError": "records",
    "FileProblems": "records",
    "LayoutContext": "records",
    "NpyFrame": "records",
    "Record": "records",
    "Splits": "records",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"uflow_exp.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'uflow_exp.data' has no attribute {name!r}")
