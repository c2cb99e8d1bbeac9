"""Run bookkeeping: instantiating name-keyed component dicts, resuming, metrics files, failures."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a name-keyed group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry and "_target_" in entry]


class CheckpointNotFoundError(FileNotFoundError):
    """``ckpt_path`` names no checkpoint."""


def require_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path, or a CheckpointNotFoundError that names it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"ckpt_path={path}: no such checkpoint file")
    return path


def run_config_path(ckpt: Path) -> Path:
    """Where the run that wrote ``<run>/checkpoints/<name>.ckpt`` keeps its resolved config."""
    return Path(ckpt).parent.parent / "config_resolved.yaml"


def _run_dataset(ckpt: Path) -> tuple[str | None, str | None]:
    """(dataset layout, category) of the run that wrote ``<run>/checkpoints/last.ckpt`` (runs written
    before the key was called ``layout`` call it ``name``)."""
    config = run_config_path(ckpt)
    dataset = (OmegaConf.load(config).get("dataset") or {}) if config.is_file() else {}
    return dataset.get("layout", dataset.get("name")), dataset.get("category")


def find_last_checkpoint(log_dir: Path, task_name: str, dataset: str | None, category: str | None) -> Path:
    """The newest ``last.ckpt`` of a single run (``<log_dir>/<task_name>/runs/``) of the same data set
    and category (for ``ckpt_path=last``): another data set's run or a sweep's job is never taken."""
    scope = f"task {task_name}, dataset {dataset}, category {category}"
    candidates = sorted(
        (
            p
            for p in (log_dir / task_name / "runs").glob("*/checkpoints/last.ckpt")
            if _run_dataset(p) == (dataset, category)
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise CheckpointNotFoundError(
            f"ckpt_path=last: no last.ckpt of a run with {scope} under {log_dir / task_name / 'runs'}; "
            "give the checkpoint's path instead"
        )
    log.info("ckpt_path=last: resuming from %s (the newest run with %s)", candidates[-1], scope)
    return candidates[-1]


def write_metrics(metrics: Mapping[str, Any], path: Path) -> dict[str, float]:
    """Write flat ``{"test/pixel_auroc": ...}`` JSON (NaN as null) and return the floats."""
    flat = {key: float(value) for key, value in sorted(metrics.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({k: (v if math.isfinite(v) else None) for k, v in flat.items()}, indent=2) + "\n"
    )
    return flat


def _is_usage_error(error: Exception) -> bool:
    """A wrong config value, data root, layout, weights file, cache or checkpoint path (not a bug).

    The error classes of modules not loaded yet cannot have been raised: they are not imported here,
    so an early data error stays quick.
    """
    from uflow_exp.data.records import DatasetError

    kinds = [DatasetError, CheckpointNotFoundError]
    for module, name in (
        ("uflow_exp.utils.checks", "ConfigValueError"),  # checks imports this module, not the reverse
        ("uflow_exp.feature_cache", "FeatureCacheError"),
        ("uflow_exp.models.uflow.feature_extraction", "BackboneWeightsError"),
        ("uflow_exp.onnx_runner", "OnnxRunError"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def run_task(
    task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig, multirun: bool
) -> dict[str, float]:
    """Run a task; in a multirun one failing job is logged (``error.txt`` in its folder) and the
    sweep goes on, so the other jobs' results are kept."""
    route_lightning_logs()
    try:
        return task(cfg)
    except Exception as error:
        if not multirun:
            if _is_usage_error(error) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                # the message names the file, key or value and what was expected: a traceback adds nothing
                log.error("%s: %s", type(error).__name__, error)
                raise SystemExit(1) from None
            raise
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "error.txt").write_text(traceback.format_exc())
        log.exception("Job failed; the sweep continues. Traceback in %s", output_dir / "error.txt")
        return {}
    finally:
        _finish_wandb()


class _DropProductTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def route_lightning_logs() -> None:
    """Lightning's messages once, through the run's own handlers (console and ``<task>.log``).

    Lightning gives its loggers a stderr handler of their own when it is imported before logging is
    configured, as it is here (Hydra configures it later), so every line came twice. Its product tips
    (install litlogger / litmodels) are dropped: nothing a user of this project needs to act on.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropProductTips) for f in tips.filters):
        tips.addFilter(_DropProductTips())


def _finish_wandb() -> None:
    # Each multirun job must be its own W&B run, even when the job failed.
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


class SweepReport(Callback):
    """At the end of a multirun: lists the jobs that failed, adds them to Optuna's
    ``optimization_results.yaml`` when there is one, and fails the command (exit code 1) so that a
    scheduler does not record a partly failed sweep as a success. The other jobs all ran first
    (``run_task`` keeps a failing job from ending the sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted((p.parent for p in sweep_dir.glob("*/error.txt")), key=lambda p: natural_key(p.name))
        if not failed:
            return
        results = sweep_dir / "optimization_results.yaml"
        if results.is_file():
            summary = OmegaConf.load(results)
            summary.failed_jobs = [{"job": p.name, "error": last_line(p / "error.txt")} for p in failed]
            OmegaConf.save(summary, results)
        lines = "\n".join(f"  {p}: {last_line(p / 'error.txt')}" for p in failed)
        # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings
        raise SystemExit(
            f"{len(failed)} job(s) of the multirun in {sweep_dir} failed (tracebacks in their "
            f"error.txt); the others finished:\n{lines}"
        )


def last_line(path: Path) -> str:
    """The last non-blank line of a text file (an ``error.txt``'s exception), stripped; "" if none."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def natural_key(text: str) -> list:
    """Sort key under which job folders "2" < "10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
