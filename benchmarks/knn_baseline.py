"""A nearest-neighbour baseline (PatchCore as published) on the same data, backbone and weights as a run
of ``python -m uflow_exp``, scored by the project's own metrics: the instrument ``bench_accuracy``
compares the default recipe against. Not a product model.

Run: .venv/bin/python benchmarks/knn_baseline.py --json OUT.json [--seed 42] [--coreset-ratio 1.0]
-- dataset=... [overrides] (the overrides a run of ``python -m uflow_exp`` takes; the data set, its
splits, the backbone, its weights and ``model.eval_size`` come from them).

PatchCore (Roth et al., CVPR 2022), as the paper describes it:
- two mid-level feature maps of the backbone (timm feature levels 2 and 3, strides 8 and 16: ResNets'
  layer2 and layer3, EfficientNet-Lite0's 40- and 112-channel stages), each averaged over 3 x 3
  neighbourhoods (stride 1), the coarser upsampled bilinearly to the finer's size, concatenated;
- a memory bank of every training patch (the training split and the normal validation images: the
  baseline has no use for a validation set, so it gets every normal image ours sees). The paper
  reduces it to a greedy k-center coreset of 10 % of the patches (``--coreset-ratio 0.1``: seeded,
  selected on a random projection to 128 dimensions) only to make the search cheaper; its distances
  approximate the full bank's. The benchmark searches the full bank (ratio 1, the default): exact,
  at least as accurate, and on this CPU faster than the greedy selection, which is sequential (on
  kolektor_dev's uniform surfaces it ran over 18 minutes against about one for the full search);
- a test patch's score is its Euclidean distance to the nearest coreset patch; the map of patch scores
  is upsampled bilinearly to ``model.eval_size`` and smoothed with a Gaussian of sigma 4 px; the image
  score is the map's maximum (the paper's re-weighting of it is left out).
The maps of the whole test set are scaled to [0, 1] together (a monotone map: AUROC and AUPRO are
unchanged) because the project's metrics bin scores in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchvision.transforms.functional import gaussian_blur

from uflow_exp.metrics import AnomalyMetrics
from uflow_exp.models.uflow.feature_extraction import build_feature_extractor
from uflow_exp.utils import CONFIG_DIR
from uflow_exp.utils.shapes import as_shape

LEVELS = [2, 3]  # timm feature levels: strides 8 and 16
PROJECTION_DIMS = 128
SIGMA = 4.0  # Gaussian smoothing of the map, pixels at eval_size
DISTANCES_PER_CHUNK = 2**26  # query x bank distances computed at once (256 MB of float32)


def greedy_coreset(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` rows of ``x`` chosen by greedy k-center: start from a seeded random row, then
    repeatedly add the row farthest from every row chosen so far.

    Written here because no installed library has it. Exact, but each step recomputes only the rows
    the new center can be nearer to: by the triangle inequality a row ``p`` whose nearest center is
    ``a`` cannot come nearer to the new center ``c`` when ``d(c, a) >= 2 d(p, a)``. Late steps, whose
    centers lie close to their neighbours, then touch a few rows instead of all of them.
    """
    n = len(x)
    if not 0 < k <= n:
        raise ValueError(f"a coreset of {k} from {n} rows")
    first = int(torch.randint(n, (1,), generator=generator))
    centers = x.new_empty(k, x.shape[1])
    centers_sq = x.new_empty(k)  # squared norms of the centers
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0], centers[0], centers_sq[0] = first, x[first], x[first].dot(x[first])
    nearest = ((x - x[first]) ** 2).sum(1)  # squared distance to the nearest chosen row
    owner = torch.zeros(n, dtype=torch.long)  # which chosen row that is
    for i in range(1, k):
        index = int(nearest.argmax())
        center = x[index]
        chosen[i], centers[i], centers_sq[i] = index, center, center.dot(center)
        # squared center-to-center distances, only to prune: a 1 % margin covers their rounding
        to_centers = centers_sq[:i] - 2 * (centers[:i] @ center) + centers_sq[i]
        candidates = (to_centers[owner] < 4.04 * nearest).nonzero().squeeze(1)
        distance = ((x[candidates] - center) ** 2).sum(1)
        closer = distance < nearest[candidates]
        rows = candidates[closer]
        nearest[rows] = distance[closer]
        owner[rows] = i
    return chosen


def patch_features(extractor, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) locally aggregated patch features at the finer level's resolution."""
    maps = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in extractor.extract(images)]
    size = maps[0].shape[-2:]
    maps = [maps[0], *(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:])]
    return torch.cat(maps, 1)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row, in chunks of queries (memory
    bounded by ``DISTANCES_PER_CHUNK``)."""
    chunk = max(1, DISTANCES_PER_CHUNK // len(bank))
    return torch.cat([torch.cdist(q, bank).amin(1) for q in queries.split(chunk)])


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def memory_bank(extractor, images: Iterable[torch.Tensor], coreset_ratio: float, seed: int) -> torch.Tensor:
    """Every patch feature of the batches of ``images``, or a seeded greedy coreset of
    ``coreset_ratio`` of them (on a random projection, as PatchCore does)."""
    with torch.inference_mode():
        bank = torch.cat([patch_features(extractor, x).permute(0, 2, 3, 1).flatten(0, 2) for x in images])
        if coreset_ratio < 1:
            generator = torch.Generator().manual_seed(seed)
            projection = torch.randn(bank.shape[1], PROJECTION_DIMS, generator=generator) / math.sqrt(
                PROJECTION_DIMS
            )
            k = max(1, round(coreset_ratio * len(bank)))
            bank = bank[greedy_coreset(bank @ projection, k, generator)]
    return bank


def scored(maps: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """The project's test metrics of the baseline's maps, scaled together to [0, 1]."""
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    metrics = AnomalyMetrics()
    for amap, batch in zip(maps, batches, strict=True):
        metrics.update(
            (amap - low) / max(high - low, 1e-12),
            batch["mask"].bool(),
            labels=batch["label"],
            has_mask=batch["has_mask"],
        )
    return {f"test/{name}": value for name, value in metrics.compute().items()}


def run(overrides: list[str], seed: int, coreset_ratio: float = 1.0) -> dict[str, float]:
    cfg = compose_run(overrides)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    # the images and maps U-Flow's run sees: a square, or the data's rectangle (resize keep_aspect or auto)
    input_shape, eval_size = datamodule.image_shape()
    datamodule.setup("fit")
    # under dataset.tiling, as U-Flow does: the memory bank from every tile, each test tile's map
    # blended (mean where tiles overlap) into the whole image's
    tiler = datamodule.tiler
    if tiler is not None:
        input_shape, tile_map = tiler.tile, as_shape(cfg.model.eval_size)

    def inputs(batch: dict) -> torch.Tensor:
        return batch["image"] if tiler is None else tiler.cut(batch["image"])

    extractor = build_feature_extractor(
        backbone["name"],
        input_shape,
        backbone.get("pretrained", True),
        backbone.get("weights"),
        LEVELS,
    ).eval()

    start = time.perf_counter()
    normal = [r for dataset in datamodule.fit_datasets() for r in dataset.records if not r.label]
    images = (inputs(batch) for batch in datamodule.image_loader(normal))
    bank = memory_bank(extractor, images, coreset_ratio, seed)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    maps, batches = [], []
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            features = patch_features(extractor, inputs(batch))
            b, _, h, w = features.shape
            scores = nearest_distances(features.permute(0, 2, 3, 1).flatten(0, 2), bank).view(b, 1, h, w)
            size = eval_size if tiler is None else tile_map
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
            scores = scores if tiler is None else tiler.blend(scores)
            maps.append(gaussian_blur(scores, kernel_size=2 * math.ceil(4 * SIGMA) + 1, sigma=SIGMA))
            batches.append({k: batch[k] for k in ("mask", "label", "has_mask")})
    result = scored(maps, batches)
    test_s = time.perf_counter() - start
    return result | {
        "time/fit_s": fit_s,
        "time/test_images_per_s": len(datamodule.test_dataset) / test_s,
        "memory_bank_patches": float(len(bank)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the metrics")
    parser.add_argument("--seed", type=int, default=42, help="seeds the coreset and its projection")
    parser.add_argument(
        "--coreset-ratio", type=float, default=1.0, help="the share of patches kept (the paper: 0.1; 1: all)"
    )
    parser.add_argument("overrides", nargs="*", help="the overrides of the run to compare with (after --)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    metrics = run(args.overrides, args.seed, args.coreset_ratio)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
