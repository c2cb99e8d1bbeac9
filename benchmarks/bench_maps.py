"""Anomaly-map and image-score variants on trained runs, without retraining: one table per run.

Run: .venv/bin/python benchmarks/bench_maps.py RUN_DIR [RUN_DIR ...] (`make bench-maps ARGS="RUN_DIR
..."`), where each RUN_DIR is a training run's folder (`config_resolved.yaml` and `checkpoints/`), e.g.
those that `bench_accuracy.py --keep DIR` leaves in DIR/<case>/run_seed<S>/. For each run the best
checkpoint's latents of the test images are computed once, and each scale's likelihood map from them
(the run's base mixture's when it has one, else the standard normal's); every variant is then a
different way of turning the same likelihoods into a pixel map and an image score, scored by the
project's metrics (pixel AUROC, AUPRO@0.3; image AUROC exact). Variants:

- `mean p` (the method's map; the run's own result under `model.map_relative_quantile=null`): 1 - mean
  over scales of the likelihood p (exp(-0.5 mean_c z^2) under the standard normal), upsampled;
- `relative q`: that map against each image's own q-quantile level (`model.map_relative_quantile`;
  the default's row is the run's own pixel result);
- `product p`: 1 - exp(-mean over scales of -log p), the scales' likelihoods multiplied
  (a monotone function of the mean negative log-likelihood: no scale saturates the others);
- `scale k`: one scale's likelihood alone (finest first), to see which scales carry the defects;
- `mean p, scales k-n`: the method's map without the scales finer than k;
- `+ blur s`: a Gaussian of s pixels at the evaluation size (`flow.map_blur_sigma`);
- image score `max` (the method's) or `top 1 %` (mean of the highest 1 % of the map's pixels).

Development numbers: use it to choose what to measure with `bench_accuracy.py`, not as results.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from bench_accuracy import best_checkpoint
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc
from torchvision.transforms.functional import gaussian_blur

from uflow_exp.data.datamodule import AnomalyDataModule
from uflow_exp.metrics import PixelAUPRO, PixelAUROC
from uflow_exp.models.uflow.anomaly_map import merged_map, relative_map
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.utils.shapes import as_shape

RELATIVE_QUANTILES = (0.75, 0.8, 0.85, 0.9, 0.95)


def scale_nll(p: list[torch.Tensor], size: int | tuple[int, int]) -> torch.Tensor:
    """(B, S, H, W): each scale's negative log-likelihood per pixel and channel (-log p; 0.5 mean_c z^2
    under the standard normal), upsampled."""
    up = [
        torch.nn.functional.interpolate(-ps.log(), size=as_shape(size), mode="bilinear", align_corners=False)
        for ps in p
    ]
    return torch.cat(up, dim=1)


def variants(n_scales: int) -> dict[str, Callable[[list[torch.Tensor], int], torch.Tensor]]:
    """Map makers from each scale's likelihood map ``p`` (the run's: its base mixture's if it has one)."""
    maps = {
        "mean p": lambda p, size: merged_map(p, size),
        "product p": lambda p, size: 1.0 - torch.exp(-scale_nll(p, size).mean(dim=1, keepdim=True)),
    }
    for q in RELATIVE_QUANTILES:
        maps[f"relative {q:g}"] = lambda p, size, q=q: relative_map(merged_map(p, size), q)
    for k in range(n_scales):
        maps[f"scale {k + 1}"] = lambda p, size, k=k: merged_map(p[k : k + 1], size)
    for k in range(1, n_scales - 1):
        maps[f"mean p, scales {k + 1}-{n_scales}"] = lambda p, size, k=k: merged_map(p[k:], size)
    for name in ("mean p", "product p"):
        for sigma in (2.0, 4.0):
            radius = max(1, int(4 * sigma + 0.5))
            maps[f"{name} + blur {sigma:g}"] = lambda p, size, f=maps[name], s=sigma, r=radius: gaussian_blur(
                f(p, size), [2 * r + 1] * 2, [s] * 2
            )
    return maps


def load_run(run: Path, *stages: str) -> tuple[UFlowModule, AnomalyDataModule]:
    """A training run's tested (best) checkpoint, in eval mode, and its data set, set up for ``stages``
    ("fit", "test")."""
    module = UFlowModule.from_checkpoint(str(best_checkpoint(run))).eval()
    datamodule = hydra.utils.instantiate(OmegaConf.load(run / "config_resolved.yaml").dataset)
    datamodule.prepare_data()
    for stage in stages:
        datamodule.setup(stage)
    return module, datamodule


def test_latents(
    run: Path,
) -> tuple[UFlowModule, list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]]:
    """The run's best checkpoint and, per test batch, its latents, masks and labels."""
    module, datamodule = load_run(run, "test")
    batches = []
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            z, _ = module._latents(batch, jac=False)
            batches.append(([zs.clone() for zs in z], batch["mask"].bool(), batch["label"]))
    return module, batches


def test_likelihoods(
    run: Path,
) -> tuple[UFlowModule, list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]]:
    """`test_latents` with each scale's likelihood map (``UFlow.likelihoods``) in place of the latents."""
    module, batches = test_latents(run)
    with torch.inference_mode():
        return module, [(module.model.likelihoods(z), mask, label) for z, mask, label in batches]


def score(batches, make_map, size: int) -> dict[str, float]:
    auroc, aupro = PixelAUROC(), PixelAUPRO()
    image_max, image_top, labels = [], [], []
    for p, mask, label in batches:
        amap = make_map(p, size).clamp(0.0, 1.0)
        auroc.update(amap, mask)
        aupro.update(amap, mask)
        flat = amap.flatten(1)
        image_max.append(flat.amax(dim=1))
        image_top.append(flat.topk(max(1, math.ceil(0.01 * flat.shape[1])), dim=1).values.mean(dim=1))
        labels.append(label.long())
    labels = torch.cat(labels)
    return {
        "pixel AUROC": float(auroc.compute()),
        "AUPRO@0.3": float(aupro.compute()),
        "image AUROC (max)": float(binary_auroc(torch.cat(image_max), labels)),
        "image AUROC (top 1 %)": float(binary_auroc(torch.cat(image_top), labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    args = parser.parse_args()
    columns = ["pixel AUROC", "AUPRO@0.3", "image AUROC (max)", "image AUROC (top 1 %)"]
    for run in args.runs:
        module, batches = test_likelihoods(run)
        print(f"\n{run}\n\n| variant | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
        for name, make_map in variants(len(batches[0][0])).items():
            row = score(batches, make_map, module.eval_size)
            print(f"| {name} | {' | '.join(f'{row[c]:.3f}' for c in columns)} |", flush=True)


if __name__ == "__main__":
    main()
