"""Run bookkeeping: instantiating name-keyed component dicts, resuming, metrics files, failures."""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a name-keyed group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry and "_target_" in entry]


def require_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path, or a FileNotFoundError that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file")
    return path


def find_last_checkpoint(log_dir: Path, task_name: str) -> Path:
    """The newest ``last.ckpt`` of any run of ``task_name`` (for ``ckpt_path=last``)."""
    candidates = sorted(
        (log_dir / task_name).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no last.ckpt under {log_dir / task_name}; give the checkpoint's path instead"
        )
    return candidates[-1]


def write_metrics(metrics: Mapping[str, Any], path: Path) -> dict[str, float]:
    """Write flat ``{"test/pixel_auroc": ...}`` JSON (NaN as null) and return the floats."""
    flat = {key: float(value) for key, value in sorted(metrics.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({k: (v if math.isfinite(v) else None) for k, v in flat.items()}, indent=2) + "\n"
    )
    return flat


def run_task(
    task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig, multirun: bool
) -> dict[str, float]:
    """Run a task; in a multirun one failing job is logged (``error.txt`` in its folder) and the
    sweep goes on, so the other jobs' results are kept."""
    try:
        return task(cfg)
    except Exception:
        if not multirun:
            raise
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "error.txt").write_text(traceback.format_exc())
        log.exception("Job failed; the sweep continues. Traceback in %s", output_dir / "error.txt")
        return {}
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    # Each multirun job must be its own W&B run, even when the job failed.
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
