"""Lightning wiring of the pure-torch U-Flow: training, validation, testing, thresholds, metrics."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from uflow_exp.metrics import AnomalyMetrics
from uflow_exp.models.uflow.anomaly_map import relative_map
from uflow_exp.models.uflow.image_score import ScalePeakStandardizer
from uflow_exp.models.uflow.loss import nll_loss
from uflow_exp.models.uflow.model import UFlow
from uflow_exp.thresholds import Threshold
from uflow_exp.tiling import tiler_of
from uflow_exp.utils.shapes import as_shape, shape_text

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so checkpoints load with ``weights_only=True``."""
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    )


class Maps(NamedTuple):
    """What the model makes of a batch: the anomaly map, the significance the threshold decides on,
    the NLL loss and the map the image score is the maximum of (None: the anomaly map), each None
    when not asked for. Under ``image_score_standardize`` the score map is, until `_maps` reduces it,
    each scale's map (B, scales, H, W)."""

    anomaly_map: torch.Tensor
    significance: torch.Tensor | None
    loss: torch.Tensor | None
    score_map: torch.Tensor | None


def _check_score_options(
    scales: int | None, map_quantile: float | None, score_quantile: float | None
) -> None:
    """Refuse ``model.image_score_scales`` below 1 and relative-map quantiles outside (0, 1)."""
    if scales is not None and scales < 1:
        raise ValueError(f"model.image_score_scales must be a number of scales >= 1 or null, got {scales}")
    for key, quantile in (
        ("map_relative_quantile", map_quantile),
        ("image_score_relative_quantile", score_quantile),
    ):
        if quantile is not None and not 0.0 < quantile < 1.0:
            raise ValueError(f"model.{key} must be in (0, 1) or null, got {quantile}")


class UFlowModule(L.LightningModule):
    """Trains the flow by NLL; validates on held-out normal images (``val/loss``) and, when the
    validation set holds anomalies, with the test metrics; tests with the threshold mode.

    A batch holds ``image`` (RGB in [0, 1] at the backbone's input size) or, when the training task
    serves cached features, ``features`` (the backbone's raw outputs); ``mask`` is at ``eval_size``.

    Args:
        backbone: ``{name, input_size, pretrained, weights, layers}``.
        flow: ``{flow_steps, affine_clamp, subnet_channels_ratio, subnet_kernel, permute_soft,
            compile_coupling, feature_noise, train_norm_affine, map_blur_sigma, position_channels,
            feature_pool, base_mixture_components}`` (keyword arguments of ``UFlow``).
        threshold: a ``_target_`` config of a ``uflow_exp.thresholds.Threshold``.
        optimizer: a ``_partial_`` optimizer config (called with the trainable parameters).
        scheduler: a ``_partial_`` scheduler config, stepped after every optimizer step, or None; a
            ``total_iters`` it leaves open is the run's number of optimizer steps.
        eval_size: side of the maps that metrics and thresholds see (the reference uses 256), or
            their ``[height, width]``; None: the backbone's input size. Under tiling, each tile's.
        tiling: None, or the data's ``{scale, overlap, shape, batch}`` (``uflow_exp.tiling``): whole
            images of ``shape`` are cut into tiles of the backbone's input size, ``batch`` tiles at
            a time go through the model, and the tile maps are blended into each image's map.
        image_score_scales: an image's anomaly score is the maximum of the anomaly map of its
            ``image_score_scales`` coarsest latent scales (None: of the whole map, the method's); the
            pixel map keeps every scale.
        map_relative_quantile: the pixel map each image shows, scores and is thresholded on is its
            likelihood map against the image's own ``map_relative_quantile`` level (``relative_map``;
            None: the likelihood map as it is, the method's). The image score and the NFA's latents
            are not affected.
        image_score_relative_quantile: the image score's map (``image_score_scales``) against the
            image's own level the same way before its maximum is taken (None: as it is, the default):
            an image is scored by how far its peak rises above the rest of it.
        image_score_standardize: the image score is the largest, over the scales it reads, of the
            scale's peak and of its peak above the image's own level, in standard deviations above the
            normal validation images' (`ScalePeakStandardizer`, set where the threshold is calibrated);
            False: the maximum of those scales' merged map.
        metric_bins: score bins of the pixel metrics (memory stays bounded; see uflow_exp.metrics).
    """

    def __init__(
        self,
        backbone: dict,
        flow: dict,
        threshold: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        eval_size: int | list[int] | None = None,
        tiling: dict | None = None,
        image_score_scales: int | None = None,
        map_relative_quantile: float | None = None,
        image_score_relative_quantile: float | None = None,
        image_score_standardize: bool = False,
        metric_bins: int = 10_000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "backbone": _plain(backbone),
                "flow": _plain(flow),
                "threshold": _plain(threshold),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "eval_size": _plain(eval_size),
                "tiling": _plain(tiling) or None,
                "image_score_scales": image_score_scales,
                "map_relative_quantile": map_relative_quantile,
                "image_score_relative_quantile": image_score_relative_quantile,
                "image_score_standardize": image_score_standardize,
                "metric_bins": metric_bins,
            },
            # the task logs the whole run config, nested; Lightning would flatten these beside it
            logger=False,
        )
        hp = self.hparams
        self.model = UFlow.from_config(hp.backbone, hp.flow)
        self.threshold: Threshold = hydra.utils.instantiate(hp.threshold)
        # (H, W) of the maps that metrics and thresholds see
        self.eval_size = as_shape(eval_size or hp.backbone["input_size"], "model.eval_size")
        self.tiler = tiler_of(hp.tiling, self.model.input_shape)
        self.tile_batch = int((hp.tiling or {}).get("batch", 16))
        _check_score_options(image_score_scales, map_relative_quantile, image_score_relative_quantile)
        self.image_score_scales = image_score_scales
        self.map_relative_quantile = map_relative_quantile
        self.image_score_relative_quantile = image_score_relative_quantile
        n_scales = len(self.model.feature_extractor.channels)
        scored = n_scales if image_score_scales is None else min(image_score_scales, n_scales)
        self.score_standardizer = ScalePeakStandardizer(scored) if image_score_standardize else None
        self.val_metrics = AnomalyMetrics(n_bins=metric_bins)
        self.test_metrics = AnomalyMetrics(n_bins=metric_bins)
        self._val_anomalous = 0
        # the pixel ROC and PRO curves of the last test epoch, for callbacks that draw them
        self.test_curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # images -> (anomaly map, latents) in place of the torch model at prediction and test time
        # (an exported graph run by onnxruntime: ``use_onnx``); None: the torch model
        self.inference: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None
        # whether validation calibrates a calibrated threshold (e.g. the tree NFA's level on the normal
        # validation images); the training task turns it off during the fit and calibrates the kept
        # checkpoints once at its end, since only the tested checkpoint's level is ever used
        self.calibrate_in_validation = True

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> UFlowModule:
        """Load a trained model; the backbone's weights come from the checkpoint, not the hub.

        Hyper-parameters this version no longer takes (``feature_cache`` and ``feature_cache_dir``
        of checkpoints written before the training task owned the cache) are ignored.
        """
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
        hparams["backbone"] = {**hparams["backbone"], "pretrained": False, "weights": None}
        module = cls(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location)

    @property
    def image_shape(self) -> tuple[int, int]:
        """The (height, width) images are given at: the backbone's input, or under tiling the whole
        image the tiles are cut from."""
        return self.model.input_shape if self.tiler is None else self.tiler.shape

    @property
    def map_shape(self) -> tuple[int, int]:
        """The (height, width) of an image's maps: ``eval_size``, or under tiling the tiles' blended."""
        return self.eval_size if self.tiler is None else self.tiler.blended_shape(self.eval_size)

    def use_onnx(self, path: str) -> None:
        """Predict and test with the exported graph at ``path`` (onnxruntime on the CPU) instead of
        the torch model; thresholds still segment in Python. Training and validation stay in torch."""
        from uflow_exp.onnx_runner import OnnxAnomalyModel

        n_scales = len(self.model.feature_extractor.channels)
        self.inference = OnnxAnomalyModel(path, self.model.input_shape, self.eval_size, n_scales)

    def replace_threshold(self, config: dict) -> None:
        """Threshold with another mode (a ``_target_`` config) from now on; the hyper-parameters, and so
        a checkpoint saved later, record it. A calibrated mode needs a validation pass before it segments."""
        self.threshold = hydra.utils.instantiate(_plain(config)).to(self.device)
        self.hparams.threshold = _plain(config)

    def set_false_alarm_rate(self, rate: float, stored: bool = True) -> None:
        """Set the NFA level so that at most ``rate`` of normal images are flagged. ``stored``: from
        the normal validation scores the checkpoint keeps (else the caller recalibrates next); the
        hyper-parameters, and so a checkpoint saved later, record the rate."""
        from uflow_exp.utils.checks import ConfigValueError

        mode = type(self.threshold).__name__
        if not hasattr(self.threshold, "set_false_alarm_rate"):
            raise ConfigValueError(
                f"threshold.false_alarm_rate applies to the NFA modes; this threshold is {mode}"
            )
        try:
            if stored:
                self.threshold.set_false_alarm_rate(rate)
            else:
                self.threshold.false_alarm_rate = self.threshold._checked_rate(rate)
        except (ValueError, RuntimeError) as error:
            raise ConfigValueError(f"threshold.false_alarm_rate={rate} ({mode}): {error}") from None
        self.hparams.threshold = {**_plain(self.hparams.threshold), "false_alarm_rate": float(rate)}

    def fit_base_mixture(self, loader: DataLoader, batches: int | None = None) -> None:
        """Fit the model's base mixture (``flow.base_mixture_components``) to the latents of the normal
        training images: the first ``batches`` batches of ``loader`` (None: all; the training loader:
        the images, or tiles, the fit drew, their cached features where the fit read those). Each
        batch's positions are kept with the chance that leaves about ``fit_points`` latent vectors per
        scale in all, drawn from a seeded generator, so the same run fits the same mixture."""
        mixture = self.model.base_mixture
        images = (
            len(loader.dataset) if batches is None else min(len(loader.dataset), batches * loader.batch_size)
        )
        generator = torch.Generator().manual_seed(0)
        samples: list[list[torch.Tensor]] = [[] for _ in mixture.channels]
        self.eval()
        with torch.inference_mode():
            for batch in itertools.islice(loader, batches):  # stops before reading a batch it does not use
                z, _ = self._latents(self.transfer_batch_to_device(batch, self.device, 0), jac=False)
                for kept, zs in zip(samples, z, strict=True):
                    vectors = zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1]).float().cpu()
                    share = mixture.fit_points / (images * zs.shape[2] * zs.shape[3])
                    kept.append(vectors[torch.rand(len(vectors), generator=generator) < share])
        mixture.fit([torch.cat(scale) for scale in samples])

    # -- steps -------------------------------------------------------------------------------------
    def _latents(
        self, batch: dict, jac: bool = True, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents and log-det of a batch. Only the training step runs under the trainer's autocast
        (``trainer.precision=bf16-mixed``: the flow's subnet convolutions in bfloat16): the backbone
        always runs in float32, as the feature cache does, and so do validation, test and prediction,
        so that maps, thresholds and metrics do not depend on the training precision and equal the
        exported graph's."""
        with torch.autocast(
            self.device.type, enabled=self.training and torch.is_autocast_enabled(self.device.type)
        ):
            raw = batch["features"] if "features" in batch else self._extract(batch["image"])
            return self.model.encode(self.model.normalize(raw, generator), jac=jac)

    def _extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(self.device.type, enabled=False):
            return self.model.extract(images)

    def _noise_generator(self) -> torch.Generator | None:
        """The feature noise of this step, from (run seed, global step, rank) alone: the global RNG's
        state is not in a checkpoint, so a resumed run would otherwise draw other noise."""
        if not self.model.feature_noise:
            return None
        seed = (torch.initial_seed() * 1_000_003 + self.global_step * 101 + self.global_rank) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def _eval_masks(self, batch: dict) -> torch.Tensor:
        """The batch's masks, which the data set resized once to the maps' shape."""
        mask = batch["mask"]
        if tuple(mask.shape[-2:]) != self.map_shape:
            raise ValueError(
                f"the data yields {shape_text(mask.shape[-2:])} masks, the model evaluates "
                f"{shape_text(self.map_shape)} maps: set dataset.eval_size to model.eval_size "
                "(the configs do: ${model.eval_size}) and dataset.tiling to the model's"
            )
        return mask.bool()

    def _maps(
        self, batch: dict, loss: bool = False, significance: bool = True, score_calibration: bool = False
    ) -> Maps:
        """`Maps` of a batch of images at ``image_shape``, or of their cached ``features``: the
        significance and the loss only if asked. With ``map_relative_quantile`` the anomaly map is
        each whole image's map against its own level (after the tiles are blended), and so is the
        significance of the modes that threshold the map; the image score keeps the likelihood map,
        standardised per scale under ``image_score_standardize`` (whose statistics take the batch's
        normal images under ``score_calibration``), against its own level only under
        ``image_score_relative_quantile``."""
        maps = self._image_maps(batch, loss, significance)
        score_map = maps.score_map
        if self.score_standardizer is not None:
            if score_calibration:
                self.score_standardizer.update(score_map[(batch["label"] == 0).to(score_map.device)])
            score_map = self.score_standardizer.score_map(score_map)
        if self.image_score_relative_quantile is not None:
            score_map = maps.anomaly_map if score_map is None else score_map
            score_map = relative_map(score_map, self.image_score_relative_quantile)
        if self.map_relative_quantile is None:
            return maps._replace(score_map=score_map)
        amap = relative_map(maps.anomaly_map, self.map_relative_quantile)
        thresholds_map = maps.significance is not None and self.threshold.significance == "anomaly_map"
        return Maps(
            amap,
            amap if thresholds_map else maps.significance,
            maps.loss,
            maps.anomaly_map if score_map is None else score_map,
        )

    def _image_maps(self, batch: dict, loss: bool, significance: bool) -> Maps:
        """`_maps` before the relative map. Under tiling each image's tiles go through the model
        ``tile_batch`` at a time, the significance counting every tile of the image as tests, and the
        tile maps are blended (maps: faded across overlaps; significance: the maximum)."""
        if self.tiler is None:
            return self._tile_maps(batch, loss, significance, tests=1)
        if "features" in batch:  # (B, tiles, C, h, w) per scale, as the tiled feature cache stores them
            tiles = [scale.flatten(0, 1) for scale in batch["features"]]
            chunks = [
                {"features": [scale[i : i + self.tile_batch] for scale in tiles]}
                for i in range(0, len(tiles[0]), self.tile_batch)
            ]
        else:
            chunks = [{"image": part} for part in self.tiler.cut(batch["image"]).split(self.tile_batch)]
        parts = [self._tile_maps(chunk, loss, significance, tests=len(self.tiler)) for chunk in chunks]

        def blended(field: str, reduce: str = "mean") -> torch.Tensor:
            return self.tiler.blend(torch.cat([getattr(part, field) for part in parts]), reduce)

        amap = blended("anomaly_map")
        nll = None
        if loss:
            sizes = torch.tensor([len(part.anomaly_map) for part in parts], device=amap.device)
            nll = (torch.stack([part.loss for part in parts]) * sizes).sum() / sizes.sum()
        return Maps(
            amap,
            blended("significance", "max") if significance else None,
            nll,
            None if parts[0].score_map is None else blended("score_map"),
        )

    def _tile_maps(self, batch: dict, loss: bool, significance: bool, tests: int) -> Maps:
        """`_maps` of images (or features) the model takes as they are: the backbone's input size."""
        if self.inference is not None:
            amap, z = self.inference(batch["image"])
            nll = None
        else:
            z, log_jac_det = self._latents(batch, jac=loss)  # maps and thresholds need only the latents
            amap = self.model.anomaly_map(z, self.eval_size)
            nll = nll_loss(z, log_jac_det) if loss else None
        signif = None
        if significance:
            with self._profiled("threshold_calibration"):
                signif = self.threshold.significance_map(z, amap, tests)
        return Maps(amap, signif, nll, self._score_map(z))

    def _score_map(self, z: list[torch.Tensor]) -> torch.Tensor | None:
        """The map the image score reads, as `Maps` holds it: under ``image_score_standardize`` each
        scale's own map, else the merged map of the ``image_score_scales`` coarsest (None: all, the
        anomaly map itself)."""
        if self.score_standardizer is not None:
            return self.model.scale_maps(z[-self.score_standardizer.scales :], self.eval_size)
        k = self.image_score_scales
        return None if k is None or k >= len(z) else self.model.anomaly_map(z[-k:], self.eval_size)

    def _profiled(self, action: str):
        """The trainer's profiler around a validation-time ``action`` (a no-op unless profiling, and
        outside validation: the test's and prediction's significance is not calibration)."""
        if self._trainer is None or not self.trainer.validating:
            return contextlib.nullcontext()
        return self.trainer.profiler.profile(action)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = nll_loss(*self._latents(batch, generator=self._noise_generator()))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}). Usual causes: a learning rate too high for this batch size "
                "(try model.optimizer.lr 10x lower), constant or corrupt images, or a large affine_clamp."
            )
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["label"])
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_anomalous = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        calibrating = self._calibrating()
        amap, significance, loss, score_map = self._maps(
            batch, loss=True, significance=calibrating, score_calibration=calibrating
        )
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["label"])
        )
        mask = self._eval_masks(batch)
        if significance is not None:
            # only images whose pixels are known: an anomalous image labelled without a mask has an
            # empty mask, and would calibrate as a normal one (val_split=test with image labels)
            known = (batch["has_mask"].bool() | (batch["label"] == 0)).to(amap.device)
            with self._profiled("threshold_calibration"):
                self.threshold.calibration_update(significance[known], amap[known], mask[known])
        self.val_metrics.update(
            amap, mask, labels=batch["label"], has_mask=batch["has_mask"], score_map=score_map
        )
        self._val_anomalous += int(batch["label"].sum())

    def _calibrating(self) -> bool:
        # not the sanity batches: they would count twice after a resume
        return self.calibrate_in_validation and not self.trainer.sanity_checking

    def on_validation_epoch_end(self) -> None:
        if self.threshold.needs_calibration and self._calibrating():
            self.threshold.calibrate()
        if self.score_standardizer is not None and self._calibrating():
            self.score_standardizer.fit()
        anomalous = self.trainer.strategy.reduce(
            torch.tensor(float(self._val_anomalous), device=self.device), reduce_op="sum"
        )
        if anomalous > 0:  # validating on the test set (paper protocol): pixel metrics mean something
            metrics = self.val_metrics.compute()
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.val_metrics.reset()

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Anomaly map, segmentation and the map it thresholds, at ``map_shape``."""
        maps = self._maps(batch)
        segmentation = self.threshold.decide(maps.significance, maps.anomaly_map)
        score_map = maps.anomaly_map if maps.score_map is None else maps.score_map
        return {
            "anomaly_map": maps.anomaly_map,
            "segmentation": segmentation.mask,
            "significance": segmentation.significance,
            "image_score": score_map.flatten(1).amax(1),
        }

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = self.predict_step(batch, batch_idx)
        outputs["mask"] = self._eval_masks(batch)
        self.test_metrics.update(
            outputs["anomaly_map"],
            outputs["mask"],
            outputs["segmentation"],
            labels=batch["label"],
            has_mask=batch["has_mask"],
            score_map=outputs["image_score"][:, None],
        )
        return outputs

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metrics.compute()
        # the level the threshold segmented at (a calibrated one is known only after validation), and
        # for an NFA level set on normal images, the share of normal images it promises to flag at most
        metrics["threshold_level"] = torch.tensor(self.threshold.level)
        promised = getattr(self.threshold, "promised_false_alarm_rate", float("nan"))
        if promised == promised:
            metrics["promised_false_alarm_rate"] = torch.tensor(promised)
        self.test_curves = self.test_metrics.curves()  # synced: every rank calls it
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.test_metrics.reset()

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=params)
        if not self.hparams.scheduler:
            return optimizer
        build = hydra.utils.instantiate(self.hparams.scheduler)
        spans = (
            "total_iters" in inspect.signature(build.func).parameters and "total_iters" not in build.keywords
        )
        # a schedule over iterations that the config leaves open spans the run: its optimizer steps,
        # whether max_epochs or max_steps ends it (Lightning counts them, limit_train_batches included)
        extra = {"total_iters": int(self.trainer.estimated_stepping_batches)} if spans else {}
        scheduler = build(optimizer=optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
