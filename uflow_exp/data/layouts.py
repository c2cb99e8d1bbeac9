"""The on-disk layouts, and listing a data set's records with light imports only (numpy, PIL, no torch).

Each layout module has ``find_records(ctx, **options) -> Splits`` and ``EXPECTED`` (its layout in
words). The command line lists the files with ``preflight`` before torch and Lightning load, so that a
wrong root or layout fails within about a second; the data module then takes that listing over
instead of listing again.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from uflow_exp.data import btad, folder, lgg_mri, mvtec, stc, textures
from uflow_exp.data.records import DatasetError, FileProblems, LayoutContext, Splits

LAYOUTS: dict[str, ModuleType] = {
    "textures": textures,
    "mvtec": mvtec,
    "btad": btad,
    "lgg_mri": lgg_mri,
    "stc": stc,
    "folder": folder,
}
# preflight's listing, waiting for the data module of the same data set to take it over
_PREFLIGHT: dict[str, tuple[Splits, FileProblems]] = {}


def check_options(layout: str, options: Mapping) -> None:
    """Refuse an unknown layout, or options its ``find_records`` does not take, naming them."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    accepted = layout_options(layout)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"dataset layout {layout!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts {', '.join(accepted)}"
        )


def layout_options(layout: str) -> list[str]:
    return list(inspect.signature(LAYOUTS[layout].find_records).parameters)[1:]


def list_records(
    layout: str, root: str | Path | None, category, seed: int, on_bad_file: str, options: Mapping
) -> tuple[Splits, FileProblems]:
    """The layout's records and the bad files found while listing them (``on_bad_file=warn``)."""
    check_options(layout, options)
    key = _key(layout, root, category, seed, on_bad_file, options)
    if key in _PREFLIGHT:
        return _PREFLIGHT.pop(key)
    problems = FileProblems(on_bad_file)
    ctx = LayoutContext(None if root is None else Path(root), category, seed, problems)
    return LAYOUTS[layout].find_records(ctx, **options), problems


def preflight(dataset: Mapping) -> None:
    """List the files of a data set config (``conf/dataset``) as its data module will, raising the
    same errors; the data module built next for the same data set takes this listing over."""
    layout = dataset.get("layout")
    check_options(layout, {})
    options = {key: dataset[key] for key in layout_options(layout) if key in dataset}
    args = (layout, dataset.get("root"), dataset.get("category"), dataset.get("seed", 0))
    args += (dataset.get("on_bad_file", "error"), options)
    _PREFLIGHT[_key(*args)] = list_records(*args)


def _key(layout, root, category, seed, on_bad_file, options) -> str:
    where = None if root is None else str(Path(root).resolve())
    return repr((layout, where, category, seed, on_bad_file, sorted(options.items())))
