"""Train U-Flow, then test the best checkpoint."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from uflow_exp.data import AnomalyDataModule
from uflow_exp.data.records import Record
from uflow_exp.feature_cache import CacheSpec, FeatureCacheError, open_feature_cache, parse_mode
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tiling import TiledExtractor
from uflow_exp.utils import (
    find_last_checkpoint,
    instantiate_dict,
    print_config,
    require_checkpoint,
    write_metrics,
)
from uflow_exp.utils.config import is_rank_zero

log = logging.getLogger(__name__)

# the shell's status for a process ended by SIGTERM (128 + 15), so a scheduler sees the interruption
SIGTERM_EXIT_CODE = 143


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        dataset = cfg.dataset
        return str(
            find_last_checkpoint(
                Path(cfg.paths.log_dir), cfg.task_name, dataset.layout, dataset.get("category")
            )
        )
    return str(require_checkpoint(cfg.ckpt_path))


def interrupted_run_dir(ckpt_path: str | None) -> Path | None:
    """The run folder of a checkpoint this project wrote (``<run>/checkpoints/*.ckpt`` beside
    ``<run>/config_resolved.yaml``), or None for any other checkpoint."""
    if ckpt_path is None:
        return None
    run = Path(ckpt_path).resolve().parent.parent
    return (
        run
        if Path(ckpt_path).resolve().parent.name == "checkpoints" and (run / "config_resolved.yaml").is_file()
        else None
    )


def kept_checkpoints(trainer: L.Trainer) -> tuple[str, str]:
    """The fit's last and best checkpoint files so far ("" where there is none): last.ckpt is written at
    every validation by the checkpoint callback without a monitor (``callbacks.last_checkpoint``), the
    best by the first checkpoint callback (``callbacks.model_checkpoint``, best ``val/loss``)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.monitor is None), "")
    return last, best


def _interrupted_message(trainer: L.Trainer) -> str:
    """What a SIGTERM'd run tells its user: where it stopped and how to resume."""
    last = kept_checkpoints(trainer)[0]
    if last:
        how = (
            f"resume from the last finished epoch with the same command plus ckpt_path={last} "
            "(the interrupted epoch is lost)"
        )
    else:
        how = "no epoch had finished, so there is no checkpoint to resume from: run the command again"
    return f"Training stopped by SIGTERM at epoch {trainer.current_epoch}; {how}"


def fit_records(datamodule: AnomalyDataModule, trainer: L.Trainer) -> list[Record]:
    """The training and validation records the fit will read: with ``limit_train_batches`` below
    the whole set and a fixed number of epochs, only the training images those epochs draw (so the
    feature cache holds no image that is never read), else all of them. Under DDP, ``overfit_batches``
    (which replaces the sampler) or an open-ended run, all of them."""
    train, val = datamodule.fit_datasets()
    limit = trainer.limit_train_batches
    partial = isinstance(limit, int) or limit < 1.0
    if partial and trainer.world_size == 1 and not trainer.overfit_batches and (trainer.max_epochs or 0) > 0:
        drawn = datamodule.drawn_training_records(trainer.max_epochs, limit)
        log.info("Feature cache: %d epochs of %s batches draw %d of the %d training images",
                 trainer.max_epochs, limit, len(drawn), len(train.records))  # fmt: skip
        return drawn + val.records
    return train.records + val.records


class FeatureCacheFill(L.Callback):
    """Fills the feature cache when the fit sets up, on every process (``cache_features``): under DDP
    the processes exist only then, so each can compute its share and wait for the others."""

    def __init__(self, cfg: DictConfig, mode: str, datamodule: AnomalyDataModule) -> None:
        self.cfg, self.mode, self.datamodule = cfg, mode, datamodule

    def setup(self, trainer: L.Trainer, pl_module: UFlowModule, stage: str) -> None:
        if stage == "fit":
            cache_features(self.cfg, self.mode, self.datamodule, pl_module, trainer)


def cache_features(
    cfg: DictConfig, mode: str, datamodule: AnomalyDataModule, module: UFlowModule, trainer: L.Trainer
) -> None:
    """Compute the frozen backbone's features of the training and validation images once (each image
    decoded once, on the trainer's device) and have the data module serve them instead of images.

    Under DDP (``world_size`` processes) the cache is on disk, shared, and each process computes the
    features of every ``world_size``-th image, then waits for the others: N images cost N / world_size
    backbone passes per process. The task is the one place that knows both the data and the model, so
    it owns the cache: the module only sees batches that carry ``features`` or ``image``.
    """
    datamodule.setup("fit")
    records = list({os.path.abspath(r.image): r for r in fit_records(datamodule, trainer)}.values())
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    spec = CacheSpec(
        dataset=datamodule.layout,
        category=datamodule.category,
        backbone=backbone["name"],
        layers=backbone.get("layers"),
        input_size=backbone["input_size"],
        image_size=datamodule.image_size,
        dtype=cfg.get("feature_cache_dtype", "float32"),
        tile_overlap=None if module.tiler is None else module.tiler.overlap,
    )
    device = trainer.strategy.root_device
    extractor = module.model.feature_extractor.to(device)
    if module.tiler is not None:  # one row per image: its tiles' features together
        extractor = TiledExtractor(extractor, module.tiler, module.tile_batch)
    paths = [str(r.image) for r in records]
    world, rank = trainer.world_size, trainer.global_rank
    if world > 1 and mode != "disk":
        if mode == "memory":
            raise FeatureCacheError(
                f"feature_cache=memory keeps the features in each of the {world} processes, which would each "
                "compute all of them; under DDP use feature_cache=true or disk (one shared store on disk)"
            )
        mode = "disk"  # one store the processes share, each filling its share of the rows
    cache = open_feature_cache(extractor, mode, paths, spec, cfg.feature_cache_dir)
    # the share is taken from every record, not from the missing ones, which the other processes
    # are filling meanwhile: together the shares cover every image
    shard = records[rank::world]
    missing = set(cache.missing([str(r.image) for r in shard]))
    todo = [r for r in shard if os.path.abspath(r.image) in missing]
    if todo:
        start = time.perf_counter()
        batches = ((b["path"], b["image"].to(device)) for b in datamodule.image_loader(todo))
        count = cache.fill(batches, extractor.extract)
        seconds, share = time.perf_counter() - start, f" (process {rank} of {world})" if world > 1 else ""
        log.info("Feature cache: computed the features of %d images in %.1f s%s", count, seconds, share)
    if world > 1:
        trainer.strategy.barrier("feature_cache")
        left = cache.missing(paths)
        if left:
            raise FeatureCacheError(
                f"{len(left)} images have no features after every process filled its share"
            )
    datamodule.serve_features(cache)


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run logged in ``run_dir`` (``wandb/[offline-]run-<time>-<id>``), or None."""
    runs = sorted(
        (p for p in (run_dir / "wandb").glob("*run-*-*") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def continue_records(cfg: DictConfig, ckpt_path: str, run_dir: Path | None) -> None:
    """What a resumed run records: the checkpoint file it resumed from (not ``last``) and, when the
    interrupted run logged to W&B, the same W&B run (its id, resumed), so the history stays one run."""
    with open_dict(cfg):
        cfg.ckpt_path = ckpt_path
        wandb = (cfg.get("logger") or {}).get("wandb")
        run_id = wandb_run_id(run_dir) if wandb is not None and run_dir is not None else None
        if run_id is not None:
            log.info("Resuming W&B run %s", run_id)
            wandb.id, wandb.resume = run_id, "allow"


def _store_in_checkpoint(path: str, checkpoint: dict, parts: dict[str, torch.nn.Module]) -> None:
    """Write each module's state into ``checkpoint`` (the contents of the file at ``path``) under its
    prefix, and the result back to ``path``."""
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            checkpoint["state_dict"][f"{prefix}.{key}"] = value.detach().cpu().clone()
    torch.save(checkpoint, path)


def _complete(
    trainer: L.Trainer, model: UFlowModule, datamodule: AnomalyDataModule, mixture: bool, calibrate: bool
) -> dict[str, torch.nn.Module]:
    """Fit the model's base mixture to the training latents, then calibrate its threshold (and the image
    score's per-scale statistics) on the validation images with that mixture; the modules that changed,
    by their checkpoint prefix."""
    parts = {}
    if mixture:
        model.to(trainer.strategy.root_device)
        # the batches of the first epoch: images the feature cache holds (of a limited run, too)
        batches = datamodule.training_batches(trainer.limit_train_batches)
        model.fit_base_mixture(datamodule.train_dataloader(), batches)
        parts["model.base_mixture"] = model.model.base_mixture
    if calibrate:
        trainer.validate(model, datamodule=datamodule, verbose=False)
        parts["threshold"] = model.threshold
        if model.score_standardizer is not None:
            parts["score_standardizer"] = model.score_standardizer
    return parts


def finish_kept_checkpoints(trainer: L.Trainer, model: UFlowModule, datamodule: AnomalyDataModule) -> None:
    """Complete each checkpoint the fit kept (the last and the best) with what needs the trained flow,
    and store it in the file: the base mixture fitted to the training latents
    (``flow.base_mixture_components``), then the threshold and the image score's per-scale statistics
    (``model.image_score_standardize``) calibrated on the validation images. The
    fit's validations skip both, since only the tested checkpoint's are ever used. Each file is read
    once and written once; a best checkpoint of the last one's step (the usual case) is completed once
    for both. Without checkpoint files, the model in memory."""
    mixture = model.model.base_mixture is not None
    calibrate = model.threshold.needs_calibration or model.score_standardizer is not None
    if not (mixture or calibrate):
        return
    paths = list(dict.fromkeys(p for p in kept_checkpoints(trainer) if p and Path(p).is_file()))  # best last
    model.calibrate_in_validation = True
    start, flows, completed_step, parts = time.perf_counter(), 0, None, {}
    for path in paths or [None]:
        checkpoint = None if path is None else torch.load(path, map_location="cpu", weights_only=True)
        step = None if checkpoint is None else checkpoint["global_step"]
        if step is None or step != completed_step:
            if checkpoint is not None:
                model.load_state_dict(checkpoint["state_dict"])
            parts = _complete(trainer, model, datamodule, mixture, calibrate)
            completed_step, flows = step, flows + 1
        if checkpoint is not None and trainer.is_global_zero:
            _store_in_checkpoint(path, checkpoint, parts)
        trainer.strategy.barrier("finish_kept_checkpoints")
    if mixture:
        log.info("Base mixture of %d Gaussians per scale fitted to the training latents of %d flow(s)",
                 model.model.base_mixture.components, flows)  # fmt: skip
    if calibrate:
        log.info("Threshold %s calibrated on the validation images: level %.4g",
                 type(model.threshold).__name__, model.threshold.level)  # fmt: skip
    log.info("Checkpoints completed in %.1f s", time.perf_counter() - start)


def take_data_shape(cfg: DictConfig, datamodule: AnomalyDataModule, config_file: Path) -> None:
    """Under ``dataset.resize=keep_aspect`` (or ``auto`` choosing it) the data decide the rectangle the
    backbone takes and the maps are scored at: it becomes ``backbone.input_size`` and
    ``model.eval_size`` ([height, width]); under ``dataset.tiling``, the whole-image shape the tiles are
    cut from becomes ``tiling.shape``. So the model is built for it, the checkpoint records it and
    evaluate / predict / export follow it. ``dataset.resize`` records the mode ``auto`` chose."""
    chosen = datamodule.resize
    images, maps = datamodule.image_shape()  # resolves "auto"
    if chosen == "square" and datamodule.tiling is None:
        return
    with open_dict(cfg):
        cfg.dataset.resize = datamodule.resize
        if datamodule.tiling is not None:
            cfg.dataset.tiling.shape = list(images)
        elif datamodule.resize == "keep_aspect":
            cfg.backbone.input_size = list(images)
            cfg.model.eval_size = list(maps)
    if is_rank_zero():
        config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def train(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = resolve_ckpt_path(cfg)
    run_dir = interrupted_run_dir(ckpt_path)
    if run_dir is not None and run_dir != Path(cfg.paths.output_dir).resolve():
        # The same folder, so that the checkpoint callback restores its best score and the best
        # checkpoint tested at the end is the best of the whole run, not of the resumed epochs.
        log.info("Resuming the run in %s: its checkpoints, metrics and test images continue there", run_dir)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    if ckpt_path is not None:
        continue_records(cfg, ckpt_path, run_dir)
    output_dir = Path(cfg.paths.output_dir)
    print_config(cfg, output_dir / "config_resolved.yaml")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    # Everything that can be misconfigured is built (and the data validated) before any compute.
    cache_mode = parse_mode(cfg.get("feature_cache", False))
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()  # finds the files: a wrong root fails here, naming the layout
    take_data_shape(cfg, datamodule, output_dir / "config_resolved.yaml")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if getattr(model.threshold, "needs_labels", False) and cfg.dataset.get("val_split") != "test":
        raise ValueError("threshold=f1_adaptive uses labels: set dataset.val_split=test (paper protocol)")
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    if cfg.get("train") and cache_mode != "false":
        callbacks.append(FeatureCacheFill(cfg, cache_mode, datamodule))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict = {}
    if cfg.get("train"):
        start = time.perf_counter()  # the feature cache fills inside the fit (FeatureCacheFill)
        model.calibrate_in_validation = False  # once, at the end (calibrate_kept_checkpoints)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning stops after the current batch; its exit status would be 0
            log.error(_interrupted_message(trainer))
            raise SystemExit(SIGTERM_EXIT_CODE) from None
        metrics |= {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
        finish_kept_checkpoints(trainer, model, datamodule)
        metrics["time/fit_s"] = time.perf_counter() - start
    if cfg.get("test"):
        best = kept_checkpoints(trainer)[1]
        start = time.perf_counter()
        if cfg.get("train") and best:
            log.info("Testing the best checkpoint %s", best)
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        else:
            trainer.test(model, datamodule=datamodule)
        seconds = time.perf_counter() - start  # loading the checkpoint, decoding, model, NFA, metrics
        metrics |= {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        metrics["time/test_images_per_s"] = len(datamodule.test_dataset) / seconds
    if trainer.is_global_zero:
        metrics = write_metrics(metrics, output_dir / "metrics.json")
        log.info("Metrics: %s", metrics)
    return {k: float(v) for k, v in metrics.items()}
