"""Tiling: the grid, cutting and blending, the NFA's count of tests, the data's tile samples, and runs
that train on tiles and find a defect only the full resolution shows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from uflow_exp.tiling import Tiler, tile_starts, tiler_of, whole_shape


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (64, 64, 0.25, [0]),
        (100, 64, 0.25, [0, 36]),
        (256, 64, 0.25, [0, 48, 96, 144, 192]),
        (256, 64, 0.0, [0, 64, 128, 192]),
        (250, 64, 0.5, [0, 31, 62, 93, 124, 155, 186]),
    ],
)
def test_tiles_cover_the_side_flush_with_both_edges_and_overlap_at_least_as_asked(
    length, tile, overlap, expected
):
    starts = tile_starts(length, tile, overlap)
    assert starts == expected
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:], strict=False))


def test_a_side_smaller_than_a_tile_or_an_overlap_out_of_range_is_refused():
    with pytest.raises(ValueError, match="50 px cannot hold a 64 px tile"):
        tile_starts(50, 64, 0.25)
    with pytest.raises(ValueError, match="smaller than one 64 x 64 tile"):
        Tiler((50, 300), 64, 0.25)
    with pytest.raises(ValueError, match=r"overlap must lie in \[0, 1\)"):
        Tiler(256, 64, 1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        tiler_of({"shape": [256, 256], "stride": 3}, 64)
    with pytest.raises(ValueError, match="not known yet"):
        tiler_of({"scale": "native"}, 64)


def test_blending_the_cut_tiles_gives_the_image_back_by_mean_and_by_max():
    images = torch.rand(2, 3, 100, 180)
    tiler = Tiler((100, 180), (64, 48), 0.3)
    tiles = tiler.cut(images)
    assert tiles.shape == (2 * len(tiler), 3, 64, 48)
    assert torch.equal(
        tiles[len(tiler) + 1], images[1, :, :64, tiler.origins[1][1] : tiler.origins[1][1] + 48]
    )
    assert torch.allclose(tiler.blend(tiles, "mean"), images, atol=1e-6)
    assert torch.equal(tiler.blend(tiles, "max"), images)
    with pytest.raises(ValueError, match="expects images of 100 x 180"):
        tiler.cut(torch.rand(1, 3, 100, 100))


def test_blending_fades_from_tile_to_tile_across_overlaps_keeps_the_largest_and_scales_tile_maps():
    tiler = Tiler((64, 112), 64, 0.25)  # two tiles, columns 0-63 and 48-111
    assert tiler.origins == [(0, 0), (0, 48)]
    maps = torch.stack([torch.full((1, 64, 64), 1.0), torch.full((1, 64, 64), 3.0)])
    mean, top = tiler.blend(maps, "mean")[0, 0], tiler.blend(maps, "max")[0, 0]
    assert mean[:, :48].eq(1).all() and mean[:, 64:].eq(3).all()
    # across the 16 overlapping columns the weight passes linearly from the left tile to the right one
    expected = 1 + 2 * (torch.arange(16) + 0.5) / 16
    assert torch.allclose(mean[0, 48:64], expected) and mean[:, 48:64].eq(mean[0, 48:64]).all()
    assert top[0, :48].eq(1).all() and top[0, 48:].eq(3).all()
    half = tiler.blend(maps[..., ::2, ::2], "mean")  # 32 px maps of 64 px tiles: a half-size image map
    assert half.shape == (1, 1, 32, 56) and torch.allclose(
        half[0, 0, 0, 24:32], 1 + 2 * (torch.arange(8) + 0.5) / 8
    )
    three = Tiler((64, 160), 64, 0.5)  # columns 0, 32, 64, 96: overlaps of half a tile
    assert torch.allclose(three.blend(torch.full((4, 1, 64, 64), 2.0)), torch.full((1, 1, 64, 160), 2.0))


def test_the_cut_shape_is_native_or_the_long_side_and_always_holds_a_tile():
    assert whole_shape(500, 1250, "native", (256, 256)) == (500, 1250)
    assert whole_shape(500, 1250, 640, (256, 256)) == (256, 640)
    assert whole_shape(500, 1250, 512, (256, 256)) == (256, 640)  # scaled up to hold a tile
    assert whole_shape(100, 120, "native", (64, 64)) == (100, 120)
    with pytest.raises(ValueError, match="expected 'native' or the longer side"):
        whole_shape(100, 120, "full", (64, 64))


@pytest.mark.parametrize("mode", ["tree", "block"])
def test_the_nfa_of_a_tile_counts_every_tile_of_its_image_as_tests(mode):
    from uflow_exp.thresholds import NFABlockThreshold, NFATreeThreshold

    threshold = NFATreeThreshold() if mode == "tree" else NFABlockThreshold()
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 8, 16, 16, generator=g) * 1.5, torch.randn(2, 8, 8, 8, generator=g) * 1.5]
    amap = torch.rand(2, 1, 32, 32)
    one = threshold.significance_map(z, amap)
    assert torch.allclose(threshold.significance_map(z, amap, tests=12), one - math.log10(12))
    plain = NFATreeThreshold().segment(z, amap) if mode == "tree" else threshold.segment(z, amap)
    assert torch.equal(threshold.decide(one, amap).mask, plain.mask)


def test_training_samples_are_tiles_and_evaluation_samples_whole_images(tmp_path):
    from tests import fake_layouts
    from uflow_exp.data import AnomalyDataModule

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=5, size=(40, 100))
    tiling = {"scale": "native", "overlap": 0.25}
    dm = AnomalyDataModule("mvtec", root, "bottle", image_size=32, tiling=tiling, val_fraction=0.4)
    dm.setup()
    tiler = dm.tiler
    assert tiler.shape == (40, 100) and len(tiler) == 2 * 4  # rows 0, 8; columns 0, 23, 45, 68
    assert dm.tiling["shape"] == [40, 100]
    train = dm.train_dataset
    assert len(train) == 3 * len(tiler)
    whole = train.load_image(train.records[1])
    sample = train[len(tiler) + 5]
    assert "mask" not in sample and torch.equal(sample["image"], tiler.crop(whole, 5))
    assert dm.test_dataset[0]["image"].shape == (3, 40, 100) and dm.test_dataset[0]["mask"].shape == (
        1,
        40,
        100,
    )
    drawn = dm.drawn_training_records(epochs=1, limit=1)  # one batch of 8 tiles draws some images
    assert 1 <= len(drawn) <= 3 and all(r in train.records for r in drawn)


# -- runs ---------------------------------------------------------------------------------------------
def _checkerboard(size: int, seed: int) -> np.ndarray:
    """A 1-px checkerboard (0.3 / 0.7) with a little noise: a pattern only the full resolution shows,
    since any downscaling by an even factor averages it to flat grey."""
    rng = np.random.default_rng(seed)
    board = np.indices((size, size)).sum(0) % 2 * 0.4 + 0.3
    return np.clip(board + rng.normal(0, 0.02, board.shape), 0, 1)


def _line_data(root: Path, size: int = 256, n_train: int = 8, n_test: int = 4) -> Path:
    """MVTec layout: checkerboards; each defect a one-pixel line 48 px long where the checkerboard's
    phase is inverted (no brighter, no darker: invisible once the image is scaled down by 4)."""
    from PIL import Image

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((array * 255).round().astype(np.uint8)).save(path)

    base = root / "board"
    for i in range(n_train):
        save(_checkerboard(size, i), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test):
        save(_checkerboard(size, 100 + i), base / "test" / "good" / f"{i:03d}.png")
        image = _checkerboard(size, 200 + i)
        mask = np.zeros((size, size))
        row, col = 40 + 50 * i, 60 + 30 * i
        image[row, col : col + 48] = 1.0 - image[row, col : col + 48]
        mask[row, col : col + 48] = 1.0
        save(image, base / "test" / "line" / f"{i:03d}.png")
        save(mask, base / "ground_truth" / "line" / f"{i:03d}_mask.png")
    return root


def test_a_one_pixel_line_is_found_with_tiling_and_lost_without(tmp_path):
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.tasks.train import train

    root = _line_data(tmp_path / "data")
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.category=board", "dataset.num_workers=0"]
    # the standard normal's map: what is under test is the resolution the tiles keep, not a base mixture
    # fitted to a random-weight model's few hundred latents
    data.append("flow.base_mixture_components=0")
    tiled = train(
        compose_train(
            [*TINY, *data, "dataset.tiling={scale:native,overlap:0.25}", "trainer.max_steps=60"],
            tmp_path / "tiled",
        )
    )
    whole = train(compose_train([*TINY, *data, "trainer.max_steps=60"], tmp_path / "whole"))
    # whole images at 64 px: the line is gone from the input, whatever the model does (measured: image
    # AUROC 0.31, nothing detected); tiles at full resolution: AUROC 1.0, pixel AUROC 0.999, all found
    assert whole["test/image_auroc"] < 0.8 and whole["test/detection_recall"] < 0.5
    assert tiled["test/image_auroc"] == 1.0 and tiled["test/pixel_auroc"] > 0.9
    assert tiled["test/detection_recall"] >= 0.75 and tiled["test/false_alarm_rate"] <= 0.25


def test_a_tiled_run_evaluates_predicts_and_runs_onnx_as_it_trained(tmp_path):
    from omegaconf import OmegaConf

    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.models.uflow.lightning_module import UFlowModule
    from uflow_exp.tasks.evaluate import evaluate
    from uflow_exp.tasks.predict import predict
    from uflow_exp.tasks.train import train

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=(96, 160))
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    tiling = "dataset.tiling={scale:native,overlap:0.25,batch:4}"
    trained = train(compose_train([*TINY, *data, tiling], tmp_path / "run"))
    saved = OmegaConf.load(tmp_path / "run" / "config_resolved.yaml")
    assert list(saved.dataset.tiling.shape) == [96, 160] and list(saved.model.tiling.shape) == [96, 160]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = UFlowModule.from_checkpoint(str(ckpt))
    assert len(module.tiler) == 6 and module.image_shape == (96, 160) and module.map_shape == (96, 160)

    # evaluate without dataset.tiling: the checkpoint's tiling is the data's
    cfg = compose_train([*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    evaluated = evaluate(cfg)
    for key in (
        "test/pixel_auroc",
        "test/pixel_aupro",
        "test/image_auroc",
        "test/miou",
        "test/threshold_level",
    ):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key

    out = tmp_path / "predicted"
    overrides = [f"ckpt_path={ckpt}", f"input={root / 'bottle' / 'test' / 'broken'}", f"output={out}"]
    cfg = compose_train([*overrides, "num_workers=0", "device=cpu", "raw_map=npy"], out / "run", "predict")
    assert predict(cfg) == {"images": 2, "failed": 0}
    assert np.load(out / "maps" / "000.npy").shape == (96, 160)

    pytest.importorskip("onnxruntime")
    import json

    import onnx

    from uflow_exp.tasks.export import export_onnx

    path = export_onnx(module, tmp_path / "model.onnx")  # one tile in, one tile's maps out
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["input_size"] == "64" and json.loads(metadata["tiling"])["image_size"] == [96, 160]
    assert len(json.loads(metadata["tiling"])["tile_origins"]) == 6
    images = torch.rand(2, 3, 96, 160)
    expected = module.predict_step({"image": images})
    module.use_onnx(str(path))
    stitched = module.predict_step({"image": images})
    assert torch.allclose(stitched["anomaly_map"], expected["anomaly_map"], atol=1e-4)
    assert (stitched["segmentation"] != expected["segmentation"]).float().mean() < 1e-3
