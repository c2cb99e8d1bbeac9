"""A mixture as each scale's base density, fitted after training: a probe on trained runs, no retraining.

Run: .venv/bin/python benchmarks/probe_mixture_base.py RUN_DIR [RUN_DIR ...] [--components 32]
[--source train|val], each RUN_DIR a training run's folder (as `bench_accuracy.py --keep DIR` leaves in
DIR/<case>/run_seed<S>/). For each run, the best checkpoint's latents of the normal training (or
validation) images are pooled per latent scale and a diagonal Gaussian mixture is fitted to them by EM.
The test maps are then scored twice, both as the run's own map is (the default: against each image's
0.8 level): with the standard normal the flow was trained towards (the run's own result) and with the
mixture, whose per-position negative log-likelihood per channel replaces 0.5 mean_c z^2. Prints pixel
AUROC / AUPRO@0.3 of both. The NFA is untouched (it needs the standard normal).

A flow's latents of real normal data are not one Gaussian: rare normal structure lands in regions of
the latent space the standard normal calls unlikely. Development numbers: a screen for what to build,
not a result (docs/real-data.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from bench_maps import test_latents
from omegaconf import OmegaConf

from uflow_exp.metrics import PixelAUPRO, PixelAUROC
from uflow_exp.models.uflow.anomaly_map import anomaly_map, relative_map
from uflow_exp.models.uflow.lightning_module import UFlowModule

FIT_POINTS = 60_000  # latent vectors per scale the mixture is fitted on (a random subset)
CHUNK = 20_000


def fit_latents(module: UFlowModule, run: Path, source: str) -> list[torch.Tensor]:
    """Per scale, the (N, C) latent vectors of the normal images of the run's training or validation split."""
    datamodule = hydra.utils.instantiate(OmegaConf.load(run / "config_resolved.yaml").dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if source == "train" else datamodule.val_dataloader()
    batches = []
    with torch.inference_mode():
        for batch in loader:
            normal = ~module._eval_masks(batch).flatten(1).any(1)
            z, _ = module._latents(batch, jac=False)
            batches.append([zs[normal].permute(0, 2, 3, 1).reshape(-1, zs.shape[1]) for zs in z])
    return [torch.cat(scale) for scale in zip(*batches, strict=True)]


def log_likelihoods(x: torch.Tensor, mixture: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(N, K) log of each component's weighted density at each row of x."""
    mean, var, log_weight = mixture
    squared = ((x[:, None, :] - mean[None]) ** 2 / var[None]).sum(-1)
    return -0.5 * (squared + var.log().sum(-1)[None] + x.shape[1] * math.log(2 * math.pi)) + log_weight[None]


def fit_mixture(x: torch.Tensor, components: int, iterations: int = 40) -> tuple[torch.Tensor, ...]:
    """Diagonal Gaussian mixture by EM. By hand because the probe needs only these few lines and the
    project does not otherwise depend on scikit-learn."""
    generator = torch.Generator().manual_seed(0)
    x = x[torch.randperm(len(x), generator=generator)[:FIT_POINTS]]
    mean = x[torch.randperm(len(x), generator=generator)[:components]].clone()
    var = torch.ones_like(mean)
    log_weight = torch.full((components,), -math.log(components))
    for _ in range(iterations):
        resp = torch.softmax(log_likelihoods(x, (mean, var, log_weight)), dim=1)
        mass = resp.sum(0) + 1e-6
        mean = resp.T @ x / mass[:, None]
        var = (resp.T @ (x * x) / mass[:, None] - mean**2).clamp(min=1e-3)
        log_weight = (mass / len(x)).log()
    return mean, var, log_weight


def mixture_likelihood(zs: torch.Tensor, mixture: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, 1, H, W): exp(-NLL per channel) with the standard normal's constant taken out, so that the
    standard normal itself gives the method's exp(-0.5 mean_c z^2)."""
    b, c, h, w = zs.shape
    x = zs.permute(0, 2, 3, 1).reshape(-1, c)
    nll = -torch.cat(
        [torch.logsumexp(log_likelihoods(x[i : i + CHUNK], mixture), 1) for i in range(0, len(x), CHUNK)]
    )
    excess = (nll - 0.5 * c * math.log(2 * math.pi)) / c
    return torch.exp(-excess.clamp(min=-20.0)).reshape(b, 1, h, w)


def mixture_map(likelihoods: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``anomaly_map``'s merge (one minus the mean of the upsampled likelihoods) of the mixture's
    likelihoods, which can exceed 1 where a latent is likelier than the standard normal's centre."""
    up = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in likelihoods]
    return (1.0 - torch.stack(up, dim=-1).mean(dim=-1)).clamp(0.0, 1.0)


def probe(run: Path, components: int, source: str) -> tuple[float, ...]:
    module, batches = test_latents(run)
    mixtures = [fit_mixture(x, components) for x in fit_latents(module, run, source)]
    quantile = module.map_relative_quantile  # both maps as the run's own map is: relative to its level or not

    def as_run(amap: torch.Tensor) -> torch.Tensor:
        return amap if quantile is None else relative_map(amap, quantile)

    metrics = [PixelAUROC(), PixelAUPRO(), PixelAUROC(), PixelAUPRO()]
    for z, mask, _ in batches:
        standard = as_run(anomaly_map(z, module.map_shape))
        likelihoods = [mixture_likelihood(zs, m) for zs, m in zip(z, mixtures, strict=True)]
        mixture = as_run(mixture_map(likelihoods, module.map_shape))
        for metric, amap in zip(metrics, (standard, standard, mixture, mixture), strict=True):
            metric.update(amap, mask)
    return tuple(float(metric.compute()) for metric in metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--source", choices=("train", "val"), default="train")
    args = parser.parse_args()
    print(f"mixture of {args.components} diagonal Gaussians per scale, fitted on the {args.source} latents")
    print("| run | standard normal: pixel AUROC / AUPRO@0.3 | mixture: pixel AUROC / AUPRO@0.3 |")
    print("|---|---|---|")
    for run in args.runs:
        auroc, aupro, mix_auroc, mix_aupro = probe(run, args.components, args.source)
        print(f"| {run} | {auroc:.3f} / {aupro:.3f} | {mix_auroc:.3f} / {mix_aupro:.3f} |", flush=True)


if __name__ == "__main__":
    main()
