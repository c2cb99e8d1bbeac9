"""Test a trained checkpoint on a data set: the same metrics as at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.utils import instantiate_dict, print_config, write_metrics

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    with open_dict(cfg):
        cfg.backbone = hparams["backbone"]  # the data set's image size follows the checkpoint
    output_dir = Path(cfg.paths.output_dir)
    print_config(cfg, output_dir / "config_resolved.yaml")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    model = UFlowModule.from_checkpoint(str(ckpt))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=instantiate_dict(cfg.get("logger")) or False
    )
    trainer.test(model, datamodule=datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        metrics = write_metrics(metrics, output_dir / "metrics.json")
        log.info("Metrics: %s", metrics)
    return {k: float(v) for k, v in metrics.items()}
