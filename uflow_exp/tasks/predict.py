"""Predict with a trained checkpoint on any images: overlays, masks, raw maps and a CSV of scores.

Images take the training data path (``AnomalyDataset``: ``read_image``, resize; the model
normalises) and the module's ``predict_step``. The CSV's score (the image score evaluation ranks
images by: from the ``model.image_score_scales`` coarsest scales, or the whole map, standardised per
scale under ``model.image_score_standardize``, against the image's own level under
``model.image_score_relative_quantile``), decision and
area are computed on the model's maps, as in evaluation; the files are resized back to each image's
H x W.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image, ImageDraw, ImageFont
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, default_collate

from uflow_exp.data import AnomalyDataset, BadFileError, Record
from uflow_exp.data.io import read_image
from uflow_exp.data.records import IMAGE_SUFFIXES, list_images, natural_key
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.onnx_runner import apply_backend
from uflow_exp.thresholds import threshold_override
from uflow_exp.utils import print_config, require_checkpoint
from uflow_exp.utils.checks import ConfigValueError

log = logging.getLogger(__name__)

RAW_MAPS = ("none", "npy", "png16")
CSV_COLUMNS = ("path", "score", "decision", "max_neg_log10_nfa", "area_fraction")
CSV_NAME = "predictions.csv"


def find_inputs(spec: str) -> list[Path]:
    """The image files of a folder (not recursive), of a glob (``**`` recurses) or one named file."""
    path = Path(spec)
    if path.is_dir():
        files = list_images(path)
    elif path.is_file():
        files = [path]
    else:
        matches = sorted((Path(p) for p in glob.glob(spec, recursive=True)), key=natural_key)
        files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"input={spec}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def output_names(files: list[Path]) -> list[Path]:
    """Each input's output name: its path below the inputs' common folder, without the suffix, or with
    the suffix folded into the name where two inputs would collide (``a.png`` and ``a.jpg``)."""
    resolved = [p.resolve() for p in files]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    relative = [p.relative_to(common) for p in resolved]
    stems = Counter(r.with_suffix("") for r in relative)
    return [
        r.with_name(f"{r.stem}_{r.suffix.lstrip('.')}") if stems[r.with_suffix("")] > 1 else r.with_suffix("")
        for r in relative
    ]


class _Guarded(Dataset):
    """``AnomalyDataset`` samples, or why a file failed: one bad file must not end the run."""

    def __init__(self, files: list[Path], image_size: int | list[int]) -> None:
        self.samples = AnomalyDataset([Record(f, None, 0) for f in files], image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        try:
            return {"image": self.samples[index]["image"], "index": index}
        except BadFileError as error:
            return {"index": index, "error": error.reason or str(error)}
        except Exception as error:  # decoders raise more than BadFileError (e.g. PIL's decompression bomb)
            return {"index": index, "error": f"{type(error).__name__}: {error}"}


def _collate(items: list[dict]) -> tuple[dict | None, list[dict]]:
    good = [item for item in items if "error" not in item]
    return (default_collate(good) if good else None), [item for item in items if "error" in item]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def render_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray,
    alpha: float,
    threshold: float | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Image.Image:
    """The image (H, W, 3) with the anomaly map blended in as a jet heat-map (``value_range``: its low
    end blue, its high end red, values beyond clipped) and the mask's outline in white, pixel-aligned
    at the top left; a strip on the right holds the colour bar (with the threshold when it is a map
    value) and the outline's legend."""
    from matplotlib import colormaps
    from scipy.ndimage import binary_erosion

    jet = colormaps["jet"]
    h, w = mask.shape
    low, high = value_range

    def share(value):  # where a map value sits in the colour range, clipped to it
        return np.clip((value - low) / (high - low), 0.0, 1.0)

    blended = (1.0 - alpha) * image + alpha * jet(share(amap))[..., :3]
    thickness = max(1, round(min(h, w) / 200))
    outline = mask & ~binary_erosion(mask, iterations=thickness)
    blended[outline] = 1.0

    size = int(np.clip(h / 24, 10, 28))
    font = ImageFont.load_default(size=size)
    pad, bar_w = size // 2, size
    height = max(h, 12 * size)
    canvas = Image.new(
        "RGB", (w + 3 * pad + bar_w + int(font.getlength("0.75")) + 4 * size, height), (40, 40, 40)
    )
    canvas.paste(Image.fromarray((blended * 255).round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = w + 2 * pad
    top, bottom = pad + 2 * size, height - pad - 3 * size
    draw.text((x0, pad), "score", fill="white", font=font)
    levels = np.linspace(1.0, 0.0, bottom - top)[:, None]
    bar = (jet(np.repeat(levels, bar_w, axis=1))[..., :3] * 255).round().astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (x0, top))

    def y_of(value: float) -> int:
        return round(bottom - 1 - float(share(value)) * (bottom - top - 1))

    marks = [(value, f"{value:g}") for value in (high, (low + high) / 2, low)]
    if threshold is not None:  # its label wins over a fixed tick it would overlap
        marks = [m for m in marks if abs(y_of(m[0]) - y_of(threshold)) > size] + [(threshold, "thr")]
    for value, label in marks:
        draw.line([(x0, y_of(value)), (x0 + bar_w + pad // 2, y_of(value))], fill="white", width=1)
        draw.text((x0 + bar_w + pad, y_of(value)), label, fill="white", font=font, anchor="lm")
    legend_y = bottom + size + pad
    draw.line([(x0, legend_y), (x0 + bar_w, legend_y)], fill="white", width=max(2, thickness))
    draw.text((x0 + bar_w + pad, legend_y), "mask", fill="white", font=font, anchor="lm")
    return canvas


@dataclass(frozen=True)
class _Writer:
    """Writes one image's files and returns its CSV row."""

    output: Path
    raw_map: str
    alpha: float
    nfa: bool
    threshold: float | None  # calibrated modes: the map value the colour bar marks
    value_range: tuple[float, float]  # the overlay's colour range

    def __call__(self, path: Path, name: Path, sample: dict[str, torch.Tensor]) -> list[str]:
        """``sample``: one image's ``predict_step`` outputs: maps (1, h, w), ``image_score`` a scalar."""
        amap, segmentation, significance = (
            sample["anomaly_map"],
            sample["segmentation"],
            sample["significance"],
        )
        image = read_image(path)
        hw = image.shape[:2]
        full_map = F.interpolate(amap[None], hw, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
        # nearest-exact samples pixel centres, as bilinear with align_corners=False does
        full_mask = F.interpolate(segmentation[None].float(), hw, mode="nearest-exact")[0, 0] > 0.5
        full_map, full_mask = full_map.cpu().numpy(), full_mask.cpu().numpy()

        overlay = render_overlay(image, full_map, full_mask, self.alpha, self.threshold, self.value_range)
        self._save(overlay, "overlays", name, ".png")
        self._save(Image.fromarray(full_mask.astype(np.uint8) * 255), "masks", name, ".png")
        if self.raw_map == "npy":
            target = self._target("maps", name, ".npy")
            np.save(target, full_map.astype(np.float32))
        elif self.raw_map == "png16":
            self._save(Image.fromarray((full_map * 65535).round().astype(np.uint16)), "maps", name, ".png")

        anomalous = bool(segmentation.any())  # for NFA modes: max -log10 NFA > its threshold
        return [
            str(path),
            f"{float(sample['image_score']):.6f}",  # the image score, as evaluation ranks images
            "anomalous" if anomalous else "normal",
            f"{float(significance.max()):.4f}" if self.nfa else "",
            f"{float(segmentation.float().mean()):.6f}",
        ]

    def _target(self, kind: str, name: Path, suffix: str) -> Path:
        target = self.output / kind / name.parent / f"{name.name}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _save(self, image: Image.Image, kind: str, name: Path, suffix: str) -> None:
        image.save(self._target(kind, name, suffix))


def overlay_range(setting, relative_quantile: float | None) -> tuple[float, float]:
    """The overlays' colour range: ``setting`` ([low, high] within [0, 1]), or by default [0.5, 1] for
    a map relative to each image's level (the level sits at 0.5, and below it lies the image's ordinary
    bulk: drawn over [0, 1], every pixel of every image came out the same green) and [0, 1] otherwise."""
    if setting is None:
        return (0.5, 1.0) if relative_quantile is not None else (0.0, 1.0)
    values = list(setting) if isinstance(setting, Sequence) and not isinstance(setting, str) else []
    if len(values) != 2 or not 0.0 <= float(values[0]) < float(values[1]) <= 1.0:
        raise ConfigValueError(
            f"overlay_range must be null or [low, high] with 0 <= low < high <= 1, got {setting}"
        )
    return float(values[0]), float(values[1])


def _writer(cfg: DictConfig, module: UFlowModule, output: Path) -> _Writer:
    nfa = module.threshold.significance == "neg_log10_nfa"
    level = None if nfa else module.threshold.level  # calibrated modes: the map value the colour bar marks
    value_range = overlay_range(cfg.get("overlay_range"), module.map_relative_quantile)
    return _Writer(output, cfg.raw_map, float(cfg.overlay_alpha), nfa, level, value_range)


def refuse_uncalibrated(threshold: dict | None) -> None:
    """A ``threshold=`` mode that needs calibration is refused before anything loads."""
    if threshold and hydra.utils.instantiate(threshold).needs_calibration:
        raise ConfigValueError(
            f"threshold={threshold['_target_']} must be calibrated on held-out images, which "
            "predict does not have: run `python -m uflow_exp.evaluate ckpt_path=... threshold=...` "
            "on the data set, or predict with an NFA mode at its uncalibrated level "
            "(threshold=nfa_block, or threshold=nfa_tree threshold.calibrate_on_normal=false)"
        )


def _load_module(ckpt: Path, threshold: dict | None, rate: float | None, device: torch.device) -> UFlowModule:
    """The checkpoint's module in eval mode, with ``threshold`` (a config) in place of its own, or its
    own at the false-alarm ``rate`` (from the normal validation scores the checkpoint keeps)."""
    module = UFlowModule.from_checkpoint(str(ckpt), map_location=device).eval()
    if threshold:
        module.replace_threshold(threshold)
    if rate is not None:
        module.set_false_alarm_rate(rate)
    log.info(
        "Threshold %s: %s > %.4g",
        type(module.threshold).__name__,
        module.threshold.significance,
        module.threshold.level,
    )
    return module


def predict(cfg: DictConfig) -> dict[str, float]:
    """Returns ``{"images": predicted, "failed": unreadable}``; each failure is logged by name."""
    if cfg.raw_map not in RAW_MAPS:
        raise ValueError(f"raw_map must be one of {RAW_MAPS}, got {cfg.raw_map!r}")
    mode, rate = threshold_override(OmegaConf.to_container(cfg.threshold) if cfg.get("threshold") else None)
    refuse_uncalibrated(mode)
    ckpt, files, device = require_checkpoint(cfg.ckpt_path), find_inputs(str(cfg.input)), _device(cfg.device)
    names, output = output_names(files), Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    module = _load_module(ckpt, mode, rate, device)
    apply_backend(module, cfg.get("backend", "torch"), cfg.get("onnx_path"), ckpt)
    with open_dict(cfg):
        cfg.threshold = dict(module.hparams.threshold)  # what ran, in config_resolved.yaml
    print_config(cfg, Path(cfg.paths.output_dir) / "config_resolved.yaml")
    write = _writer(cfg, module, output)
    loader = DataLoader(
        _Guarded(files, list(module.image_shape)),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )

    failures: list[tuple[Path, str]] = []

    def fail(path: Path, reason: str) -> None:
        log.error("failed: %s: %s", path, reason)
        failures.append((path, reason))

    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        open(output / CSV_NAME, "w", newline="") as handle,
        Progress(*columns) as progress,
        torch.inference_mode(),
    ):
        rows = csv.writer(handle)
        rows.writerow(CSV_COLUMNS)
        bar = progress.add_task("predict", total=len(files))
        predicted = 0
        for batch_idx, (batch, bad) in enumerate(loader):
            for item in bad:
                fail(files[item["index"]], item["error"])
            if batch is not None:
                out = module.predict_step({"image": batch["image"].to(device)}, batch_idx)
                for i, index in enumerate(batch["index"].tolist()):
                    try:
                        rows.writerow(write(files[index], names[index], {k: v[i] for k, v in out.items()}))
                        predicted += 1
                    except BadFileError as error:  # the file changed since the batch read it
                        fail(files[index], error.reason or str(error))
                handle.flush()
            progress.advance(bar, len(bad) + (len(batch["index"]) if batch is not None else 0))

    log.info("Predicted %d image(s) into %s (%s)", predicted, output, output / CSV_NAME)
    if failures:
        names_failed = ", ".join(str(path) for path, _ in failures)
        log.error("%d of %d file(s) failed: %s", len(failures), len(files), names_failed)
    return {"images": predicted, "failed": len(failures)}
