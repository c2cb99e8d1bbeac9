"""The base mixture refitted on trained runs, without retraining: one row per run and setting.

Run: .venv/bin/python benchmarks/bench_mixture.py RUN_DIR [RUN_DIR ...] [--components 16 32 64]
[--variance-floor 1e-3] [--fit-points 60000] (`make bench-mixture ARGS="RUN_DIR ..."`), each RUN_DIR a
training run's folder (`config_resolved.yaml` and `checkpoints/`), e.g. those that `bench_accuracy.py
--keep DIR` leaves in DIR/<case>/run_seed<S>/. The base mixture (`flow.base_mixture_components`) is fitted
after training, so other mixtures of the same flow need no training: for each setting the best
checkpoint's mixture is refitted as the training task fits it (`UFlowModule.fit_base_mixture` on the
run's training images), the image score's per-scale statistics set again on the normal validation
images (`model.image_score_standardize`), and the test set scored as the run scores it (the anomaly map
against each image's level, the coarse-scale image score): pixel AUROC, AUPRO@0.3, image AUROC. With the
run's own setting the row is the run's own test result.

Development numbers: use it to choose what to measure with `bench_accuracy.py`, not as results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_maps import load_run
from torchmetrics.functional.classification import binary_auroc

import uflow_exp.models.uflow.base_mixture as base_mixture
from uflow_exp.metrics import PixelAUPRO, PixelAUROC
from uflow_exp.models.uflow.lightning_module import UFlowModule


def refitted_scores(module: UFlowModule, datamodule, components: int, fit_points: int) -> tuple[float, ...]:
    """Pixel AUROC, AUPRO@0.3 and image AUROC of ``module`` with its mixture refitted."""
    module.model.base_mixture = base_mixture.LatentMixture(
        module.model.base_mixture.channels, components, fit_points=fit_points
    )
    module.fit_base_mixture(datamodule.train_dataloader())
    auroc, aupro, scores, labels = PixelAUROC(), PixelAUPRO(), [], []
    with torch.inference_mode():
        if module.score_standardizer is not None:  # the image score's per-scale statistics follow the mixture
            for batch in datamodule.val_dataloader():
                module._maps(batch, significance=False, score_calibration=True)
            module.score_standardizer.fit()
        for batch in datamodule.test_dataloader():
            maps = module._maps(batch, significance=False)
            mask = module._eval_masks(batch)
            auroc.update(maps.anomaly_map, mask)
            aupro.update(maps.anomaly_map, mask)
            score_map = maps.anomaly_map if maps.score_map is None else maps.score_map
            scores.append(score_map.flatten(1).amax(dim=1))
            labels.append(batch["label"].long())
    image = binary_auroc(torch.cat(scores), torch.cat(labels))
    return float(auroc.compute()), float(aupro.compute()), float(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--components", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--variance-floor", type=float, default=base_mixture.VARIANCE_FLOOR)
    parser.add_argument("--fit-points", type=int, default=60_000)
    args = parser.parse_args()
    base_mixture.VARIANCE_FLOOR = args.variance_floor
    print(f"variance floor {args.variance_floor:g}, at most {args.fit_points} vectors per scale\n")
    print("| run | components | pixel AUROC | AUPRO@0.3 | image AUROC |\n|---|---|---|---|---|")
    for run in args.runs:
        module, datamodule = load_run(run, "fit", "test")
        if module.model.base_mixture is None:
            raise ValueError(f"{run}: trained with flow.base_mixture_components=0, no mixture to refit")
        for components in args.components:
            row = refitted_scores(module, datamodule, components, args.fit_points)
            print(f"| {run} | {components} | {' | '.join(f'{v:.3f}' for v in row)} |", flush=True)


if __name__ == "__main__":
    main()
