"""Test a trained checkpoint on a data set: the same metrics as at the end of training."""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from uflow_exp.callbacks import TestImageLogger
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.onnx_runner import apply_backend
from uflow_exp.thresholds import threshold_override
from uflow_exp.utils import instantiate_dict, print_config, require_checkpoint, write_metrics
from uflow_exp.utils.checks import ConfigValueError
from uflow_exp.utils.runs import run_config_path

log = logging.getLogger(__name__)


def read_checkpoint(path: Path, trusted: bool) -> dict:
    """A checkpoint's contents; tensors and plain values only unless ``trusted``."""
    require_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds pickled Python objects besides tensors (as the authors' released checkpoints "
            "do); loading it runs code from the file. If you trust its source, add trust_checkpoint=true."
        ) from err


def run_dataset(ckpt: Path) -> DictConfig:
    """The data set config of the run that wrote ``ckpt`` (its ``config_resolved.yaml``), for an
    evaluation whose command names none."""
    config = run_config_path(ckpt)
    dataset = OmegaConf.load(config).get("dataset") if config.is_file() else None
    if dataset is None:
        raise ConfigValueError(
            f"ckpt_path={ckpt}: the command names no data set and {config} (the config of the run that "
            "wrote the checkpoint) is missing; name one, e.g. dataset=mvtec dataset.root=... "
            "dataset.category=..."
        )
    log.info(
        "Evaluating on the data set of the checkpoint's run: %s (root %s, category %s); dataset=... "
        "names another", dataset.get("layout"), dataset.get("root"), dataset.get("category"),
    )  # fmt: skip
    if "val_whole_groups" not in dataset:  # a run from before the key validated on single images
        dataset.val_whole_groups = False
    return dataset


# the reference's threshold, for the authors' checkpoints when no threshold= is given
REFERENCE_THRESHOLD = {"_target_": "uflow_exp.thresholds.NFATreeThreshold", "log_nfa_threshold": 0.0}


def load_model(
    cfg: DictConfig, ckpt: Path, reference: dict | None, new_mode: bool, rate: float | None
) -> UFlowModule:
    """Our checkpoint (``reference`` None), with ``cfg.threshold`` in place of its own mode given
    ``new_mode``, or the authors' release ``reference`` in the model ``cfg`` describes; at the false-alarm
    ``rate`` when one is given (recalibrated by the caller)."""
    if reference is None:
        model = UFlowModule.from_checkpoint(str(ckpt))
        if new_mode:
            model.replace_threshold(cfg.threshold)
    else:
        model = hydra.utils.instantiate(cfg.model)
        model.model.load_reference_state_dict(reference, require_backbone=True)
        log.info("Loaded %s as a checkpoint of the authors' release", ckpt)
    if rate is not None:
        model.set_false_alarm_rate(rate, stored=False)
    return model


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test metrics of ``cfg.ckpt_path`` on ``cfg.dataset`` (none: the data set the checkpoint's run
    trained on), thresholded with the checkpoint's mode or,
    given ``threshold=<mode>``, with that one (a calibrated mode is calibrated on the validation split
    first), and given ``threshold.false_alarm_rate=R``, at that rate (recalibrated);
    ``config_resolved.yaml`` records the threshold that ran."""
    ckpt = Path(cfg.ckpt_path)
    checkpoint = read_checkpoint(ckpt, cfg.get("trust_checkpoint", False))
    hparams = checkpoint.get("hyper_parameters")
    ours = isinstance(hparams, dict) and isinstance(hparams.get("backbone"), dict)
    override, rate = threshold_override(
        OmegaConf.to_container(cfg.threshold) if cfg.get("threshold") else None
    )
    with open_dict(cfg):
        if cfg.get("dataset") is None:
            cfg.dataset = run_dataset(ckpt)
        if ours:  # the data set's image and mask sizes follow the checkpoint
            cfg.backbone = hparams["backbone"]
            cfg.dataset.resize = "square"  # to the checkpoint's input_size as it stands (int or rectangle)
            cfg.model.eval_size = hparams.get("eval_size")
            cfg.dataset.tiling = hparams.get("tiling")
            cfg.threshold = override or hparams["threshold"]
        else:  # the authors' release: described by the config; its backbone weights are inside
            cfg.backbone.pretrained = False
            cfg.backbone.weights = None
            cfg.threshold = override or REFERENCE_THRESHOLD
        if rate is not None:
            cfg.threshold.false_alarm_rate = rate
    output_dir = Path(cfg.paths.output_dir)
    print_config(cfg, output_dir / "config_resolved.yaml")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    model = load_model(cfg, ckpt, checkpoint if not ours else None, override is not None, rate)
    apply_backend(model, cfg.get("backend", "torch"), cfg.get("onnx_path"), ckpt)
    # the test panels, as training draws them: the masks of the mode that ran, beside its metrics
    panels = TestImageLogger(output_dir=str(output_dir / "test_images"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=instantiate_dict(cfg.get("logger")) or False, callbacks=[panels]
    )
    # a new mode or rate, or a checkpoint saved before its run calibrated it (a run stopped mid-fit)
    changed = override is not None or rate is not None
    if model.threshold.needs_calibration and (changed or not model.threshold.calibrated):
        log.info("Calibrating threshold %s on the validation split", cfg.threshold["_target_"])
        trainer.validate(model, datamodule=datamodule)
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule)
    seconds = time.perf_counter() - start  # decoding, model (torch or onnxruntime), threshold, metrics
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["time/test_images_per_s"] = len(datamodule.test_dataset) / seconds
    if trainer.is_global_zero:
        metrics = write_metrics(metrics, output_dir / "metrics.json")
        log.info("Metrics: %s", metrics)
    return {k: float(v) for k, v in metrics.items()}
