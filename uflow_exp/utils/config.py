"""Where the configs live, the project's OmegaConf resolvers, and a readable config tree."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _config_dir() -> str:
    # A source checkout (editable install) keeps conf/ beside the package; a wheel ships it inside.
    source = Path(__file__).resolve().parents[2] / "conf"
    if source.is_dir():
        return str(source)
    return str(files("uflow_exp") / "conf")


CONFIG_DIR = _config_dir()


def _wandb_offline() -> bool:
    # W&B's own variable decides when set; otherwise offline, so no server is ever required.
    return os.environ.get("WANDB_MODE", "offline") != "online"


def _sweep_group() -> str | None:
    """Multirun jobs share a W&B group named after their sweep folder; single runs have none."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).name


def _num_workers(most: int = 4) -> int:
    """Data loader workers: ``most``, or fewer on a machine with fewer usable cores (PyTorch warns
    when workers outnumber them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(int(most), cores))


def _job_overrides() -> str:
    """A multirun job's own command-line overrides (paths left out), e.g. ``-3 model.optimizer.lr=0.001``,
    so that a sweep's W&B runs can be told apart by name; empty for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hydra_cfg = HydraConfig.get()
    shown = [o for o in hydra_cfg.overrides.task if "/" not in o.partition("=")[2]]
    return f"-{hydra_cfg.job.num} {' '.join(shown)}"[:120].rstrip()


def _native_bfloat16(accelerator: str = "auto", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the device that ``accelerator`` (Lightning's name) picks runs bfloat16 arithmetic
    natively: a CUDA device that supports it, or a CPU with AVX-512 BF16 or AMX (elsewhere bfloat16 is
    emulated and slower than float32)."""
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as lines:
            flags = {word for line in lines if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _train_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where the training device runs bfloat16 natively (the training step's flow
    convolutions in bfloat16, see UFlowModule._latents), else ``32-true``."""
    return "bf16-mixed" if _native_bfloat16(str(accelerator)) else "32-true"


def _register_resolvers() -> None:
    """The ``uflow_*`` resolvers the configs use; registered when this module is imported (so anything
    that composes the configs from ``CONFIG_DIR`` resolves them)."""
    OmegaConf.register_new_resolver("uflow_wandb_offline", _wandb_offline, replace=True)
    OmegaConf.register_new_resolver("uflow_sweep_group", _sweep_group, replace=True)
    OmegaConf.register_new_resolver("uflow_job_overrides", _job_overrides, replace=True)
    OmegaConf.register_new_resolver("uflow_num_workers", _num_workers, replace=True)
    OmegaConf.register_new_resolver("uflow_train_precision", _train_precision, replace=True)


_register_resolvers()


def is_rank_zero() -> bool:
    """Whether this process is the first (or only) one: Lightning's DDP launcher starts the other ranks
    as copies of the command with ``RANK`` / ``LOCAL_RANK`` set (read here without importing it)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK"))


def print_config(cfg: DictConfig, path: Path | None = None) -> None:
    """Print the resolved config as a rich tree (and save it as YAML beside the run), once: not in the
    other ranks of a multi-process run."""
    if not is_rank_zero():
        return
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), guide_style="dim")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def quiet_expected_warnings() -> None:
    """Silence Lightning warnings that describe this project's intended set-up."""
    import warnings

    # Lightning 2.6's own use of a torch API deprecated in torch 2.14 (inside Lightning, nothing to act on).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The frozen backbone stays in eval mode while the flow trains.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # The model summary sizes parameters in float32 under bf16-mixed, which is right: they are float32.
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    # Small data sets have fewer batches than the logging interval; epoch metrics are logged anyway.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
