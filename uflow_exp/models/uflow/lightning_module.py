"""Lightning wiring of the pure-torch U-Flow: training, validation, testing, thresholds, metrics."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from uflow_exp.metrics import AnomalyMetrics
from uflow_exp.models.uflow.feature_cache import CacheSpec, FeatureCache, open_feature_cache, parse_mode
from uflow_exp.models.uflow.loss import nll_loss
from uflow_exp.models.uflow.model import UFlow
from uflow_exp.thresholds import Threshold

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so checkpoints load with ``weights_only=True``."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class UFlowModule(L.LightningModule):
    """Trains the flow by NLL; validates on held-out normal images (``val/loss``) and, when the
    validation set holds anomalies, with the test metrics; tests with the threshold mode.

    Args:
        backbone: ``{name, input_size, pretrained, weights, layers}``.
        flow: ``{flow_steps, affine_clamp, subnet_channels_ratio, permute_soft, compile_coupling,
            feature_noise, train_norm_affine, map_blur_sigma}`` (keyword arguments of ``UFlow``).
        threshold: a ``_target_`` config of a ``uflow_exp.thresholds.Threshold``.
        optimizer: a ``_partial_`` optimizer config (called with the trainable parameters).
        scheduler: a ``_partial_`` epoch-wise scheduler config, or None.
        eval_size: side of the maps that metrics and thresholds see (the reference uses 256).
        metric_bins: score bins of the pixel metrics (memory stays bounded; see uflow_exp.metrics).
        feature_cache: compute the frozen backbone's features of training and validation images
            once and reuse them every epoch: true (in memory when they fit in a quarter of the
            available memory, else on disk), false, ``memory`` or ``disk`` (see ``feature_cache.py``).
        feature_cache_dir: the folder of the disk caches (one subfolder per data set, backbone,
            weights and image set), shared by runs.
    """

    def __init__(
        self,
        backbone: dict,
        flow: dict,
        threshold: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        eval_size: int | None = None,
        metric_bins: int = 10_000,
        feature_cache: bool | str = True,
        feature_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self._feature_cache_mode = parse_mode(feature_cache)  # refused before the backbone is built
        self.save_hyperparameters(
            {
                "backbone": _plain(backbone),
                "flow": _plain(flow),
                "threshold": _plain(threshold),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "eval_size": eval_size,
                "metric_bins": metric_bins,
                "feature_cache": feature_cache,
                "feature_cache_dir": feature_cache_dir,
            }
        )
        hp = self.hparams
        self.model = UFlow.from_config(hp.backbone, hp.flow)
        self.threshold: Threshold = hydra.utils.instantiate(hp.threshold)
        self.eval_size = eval_size or hp.backbone["input_size"]
        self.val_metrics = AnomalyMetrics(n_bins=metric_bins)
        self.test_metrics = AnomalyMetrics(n_bins=metric_bins)
        self._val_anomalous = 0
        # a plain attribute (not a module or buffer): the cache never goes into a checkpoint
        self.feature_cache: FeatureCache | None = None

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> UFlowModule:
        """Load a trained model; the backbone's weights come from the checkpoint, not the hub."""
        hparams = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
        backbone = {**hparams["backbone"], "pretrained": False, "weights": None}
        return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, backbone=backbone)

    def replace_threshold(self, config: dict) -> None:
        """Threshold with another mode (a ``_target_`` config) from now on; the hyper-parameters, and so
        a checkpoint saved later, record it. A calibrated mode needs a validation pass before it segments."""
        self.threshold = hydra.utils.instantiate(_plain(config)).to(self.device)
        self.hparams.threshold = _plain(config)

    def on_fit_start(self) -> None:
        """Open the feature cache: the model is on its device and the datamodule set up by now."""
        if self._feature_cache_mode == "off":
            return
        extractor = self.model.feature_extractor
        datamodule = self.trainer.datamodule
        datasets = [getattr(datamodule, "train_dataset", None), getattr(datamodule, "val_dataset", None)]
        if not all(hasattr(dataset, "records") for dataset in datasets):
            log.info(
                "Feature cache in memory: no datamodule lists the training and validation images, "
                "which a disk cache is sized and keyed by"
            )
            self.feature_cache = FeatureCache(backbone=extractor.backbone_modules())
            return
        spec = CacheSpec(
            dataset=datamodule.name,
            category=datamodule.category,
            backbone=self.hparams.backbone["name"],
            layers=self.hparams.backbone.get("layers"),
            input_size=self.hparams.backbone["input_size"],
            image_size=datamodule.image_size,
        )
        paths = [str(record.image) for dataset in datasets for record in dataset.records]
        self.feature_cache = open_feature_cache(
            extractor, self._feature_cache_mode, paths, spec, self.hparams.feature_cache_dir
        )

    # -- steps -------------------------------------------------------------------------------------
    def _latents(
        self, batch: dict, cached: bool = False, jac: bool = True, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if cached and self.feature_cache is not None:
            raw = self.feature_cache.features(batch["path"], batch["image"], self.model.extract)
        else:
            raw = self.model.extract(batch["image"])
        return self.model.encode(self.model.normalize(raw, generator), jac=jac)

    def _noise_generator(self) -> torch.Generator | None:
        """The feature noise of this step, from (run seed, global step, rank) alone: the global RNG's
        state is not in a checkpoint, so a resumed run would otherwise draw other noise."""
        if not self.model.feature_noise:
            return None
        seed = (torch.initial_seed() * 1_000_003 + self.global_step * 101 + self.global_rank) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def _eval_masks(self, batch: dict) -> torch.Tensor:
        mask = batch["mask"].float()
        if mask.shape[-1] != self.eval_size:
            mask = F.interpolate(
                mask, size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False
            )
        return mask >= 0.5

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = nll_loss(*self._latents(batch, cached=True, generator=self._noise_generator()))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}). Usual causes: a learning rate too high for this batch size "
                "(try model.optimizer.lr 10x lower), constant or corrupt images, or a large affine_clamp."
            )
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["image"])
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_anomalous = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z, log_jac_det = self._latents(batch, cached=True)
        self.log(
            "val/loss",
            nll_loss(z, log_jac_det),
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch["image"]),
        )
        amap = self.model.anomaly_map(z, self.eval_size)
        mask = self._eval_masks(batch)
        if not self.trainer.sanity_checking:  # the sanity batches would count twice after a resume
            self.threshold.calibration_update(amap, mask)
        self.val_metrics.update(amap, mask, labels=batch["label"], has_mask=batch["has_mask"])
        self._val_anomalous += int(batch["label"].sum())

    def on_validation_epoch_end(self) -> None:
        if self.threshold.needs_calibration and not self.trainer.sanity_checking:
            self.threshold.calibrate()
        anomalous = self.trainer.strategy.reduce(
            torch.tensor(float(self._val_anomalous), device=self.device), reduce_op="sum"
        )
        if anomalous > 0:  # validating on the test set (paper protocol): pixel metrics mean something
            metrics = self.val_metrics.compute()
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.val_metrics.reset()

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Anomaly map, segmentation and the map it thresholds, at ``eval_size``."""
        z, _ = self._latents(batch, jac=False)  # maps and thresholds need only the latents
        amap = self.model.anomaly_map(z, self.eval_size)
        segmentation, significance = self.threshold.segment(z, amap)
        return {"anomaly_map": amap, "segmentation": segmentation, "significance": significance}

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = self.predict_step(batch, batch_idx)
        outputs["mask"] = self._eval_masks(batch)
        self.test_metrics.update(
            outputs["anomaly_map"],
            outputs["mask"],
            outputs["segmentation"],
            labels=batch["label"],
            has_mask=batch["has_mask"],
        )
        return outputs

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metrics.compute()
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.test_metrics.reset()

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
