"""Checks of a run's config that need no heavy import, so that a wrong value fails in about a second
with one message naming the key, the value and what was expected (before torch and Lightning load)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from uflow_exp.utils.runs import require_checkpoint

# key -> (type, smallest value); None values are left to the defaults' meaning
_NUMBERS = {
    "trainer.max_epochs": (int, -1),  # -1: no limit (Lightning)
    "trainer.max_steps": (int, -1),
    "dataset.batch_size": (int, 1),
    "dataset.num_workers": (int, 0),
    "backbone.input_size": (int, 16),
    "flow.flow_steps": (int, 1),
    "model.optimizer.lr": (float, 0.0),
}


# sides that may also be [height, width] (each side checked as the single number would be)
_SIDES = ("backbone.input_size",)


class ConfigValueError(ValueError):
    """A config value of the wrong type or range, or naming a missing file."""


def check_run_config(cfg: DictConfig) -> None:
    """Numbers of the wrong type or range, missing weights files and checkpoints (``ckpt_path=last``
    is resolved later, by the training task)."""
    for key, (kind, smallest) in _NUMBERS.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None:
            continue
        if key in _SIDES and isinstance(value, ListConfig | list) and len(value) == 2:
            value = min(value, key=lambda v: v if isinstance(v, int) and not isinstance(v, bool) else -1)
        number = isinstance(value, int if kind is int else int | float) and not isinstance(value, bool)
        if not number or (value <= smallest if kind is float else value < smallest):
            what = "an integer" if kind is int else "a number"
            bound = f" > {smallest}" if kind is float else f" >= {smallest}"
            raise ConfigValueError(f"{key}={value!r}: expected {what}{bound}")
    weights = OmegaConf.select(cfg, "backbone.weights", throw_on_missing=False)
    files = [] if weights is None else [weights] if isinstance(weights, str) else list(weights)
    for file in files:
        if not Path(file).is_file():
            raise ConfigValueError(
                f"backbone.weights: {file} is not a file (expected a local state_dict, .pth or "
                ".safetensors; for mcait a list [cait_m48_448 file, cait_s24_224 file])"
            )
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last"):
        require_checkpoint(ckpt)


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU run on a machine without one fails here, in a second, rather than inside Lightning."""
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    if available < wanted:
        raise ConfigValueError(
            f"trainer.accelerator={accelerator} with trainer.devices={devices}: {available} CUDA device(s) "
            "visible here; use trainer=cpu (or trainer=default, which picks what there is)"
        )
