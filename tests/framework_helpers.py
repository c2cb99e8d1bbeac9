"""Composing the project's configs for tests: tiny, fast, writing under a temporary folder."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from uflow_exp.utils import CONFIG_DIR

# A small random-weight backbone at 64 px, one epoch in float32 (whatever the machine's bfloat16), CSV
# logging: seconds per run.
TINY = [
    "backbone=resnet18",
    "backbone.pretrained=false",
    "backbone.input_size=64",
    "flow.flow_steps=2",
    "model.eval_size=64",
    "logger=csv",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
    "+trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "dataset.num_workers=0",
    "dataset.batch_size=4",
]


def compose_train(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    return cfg
