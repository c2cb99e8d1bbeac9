"""`python -m uflow_exp.predict`: files at each image's resolution, one CSV row per readable image,
unreadable files named and counted, and the exit status."""

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.predict import CSV_COLUMNS, CSV_NAME, predict
from uflow_exp.tasks.train import train

ROOT = Path(__file__).resolve().parents[1]
# (name, width, height) of the readable inputs; the corrupt one is "broken.png"
GOOD = {"rgb_small.png": (48, 40), "rgb_wide.png": (150, 70), "grey.png": (60, 90), "deep16.png": (33, 57)}


def _train(tmp: Path, threshold: str, *extra: str) -> Path:
    root = fake_layouts.make_mvtec(tmp / "data", n_train=10, size=64)  # 2 normal validation images
    overrides = [
        *TINY,
        "dataset=mvtec",
        f"dataset.root={root}",
        f"threshold={threshold}",
        "test=false",
        # the score is then the map's maximum, which the saved maps let these tests bound (the
        # likelihood map itself: not shown against each image's level)
        "model.image_score_scales=null",
        "model.map_relative_quantile=null",
        *extra,
    ]
    train(compose_train(overrides, tmp / "run"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("nfa"), "nfa_tree")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name in ("rgb_small.png", "rgb_wide.png"):
        w, h = GOOD[name]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    w, h = GOOD["grey.png"]
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / "grey.png")
    w, h = GOOD["deep16.png"]
    Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(folder / "deep16.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image: ignored by suffix")
    return folder


def _predict(ckpt: Path, input_: Path | str, out: Path, *extra: str) -> dict:
    cfg = compose_train(
        [f"ckpt_path={ckpt}", f"input={input_}", f"output={out}", "num_workers=0", "device=cpu", *extra],
        out / "run",
        "predict",
    )
    return predict(cfg)


def _rows(out: Path) -> list[dict]:
    with open(out / CSV_NAME, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def test_outputs_at_original_resolution_and_bad_file_counted(checkpoint, inputs, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        result = _predict(checkpoint, inputs, out, "raw_map=npy", "batch_size=2")
    assert result == {"images": 4, "failed": 1}
    assert "broken.png" in caplog.text

    rows = _rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(GOOD)
    for row in rows:
        name = Path(row["path"]).stem
        w, h = GOOD[Path(row["path"]).name]
        score, area = float(row["score"]), float(row["area_fraction"])
        assert 0.0 <= score <= 1.0 and 0.0 <= area <= 1.0
        assert row["decision"] == ("anomalous" if area > 0 else "normal")
        assert (float(row["max_neg_log10_nfa"]) > 0) == (row["decision"] == "anomalous")  # log NFA = 0 rule

        raw = np.load(out / "maps" / f"{name}.npy")
        assert raw.shape == (h, w) and raw.dtype == np.float32
        # score: the model map's maximum (image_score_scales=null); the saved map is that map resized
        # bilinearly (convex weights), so its maximum can only be lower, and by little
        assert 0.0 <= raw.min() and score - 0.05 < raw.max() <= score + 1e-6
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert mask.any() == (row["decision"] == "anomalous")
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert overlay.width > w and overlay.height >= h  # the image plus the colour-bar strip
    assert not (out / "maps" / "broken.npy").exists()


def test_overlay_top_left_is_the_image_blended(checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    _predict(checkpoint, inputs / "rgb_wide.png", out, "overlay_alpha=0")
    image = np.asarray(Image.open(inputs / "rgb_wide.png"))
    overlay = np.asarray(Image.open(out / "overlays" / "rgb_wide.png").convert("RGB"))
    mask = np.asarray(Image.open(out / "masks" / "rgb_wide.png")) > 0
    h, w = mask.shape
    # with no heat-map weight, every pixel off the mask outline is the input pixel, so not transposed
    same = (overlay[:h, :w] == image).all(axis=2)
    assert same[~mask].all()


def test_png16_maps_and_no_nfa_column_for_a_calibrated_threshold(inputs, tmp_path):
    ckpt = _train(tmp_path / "quantile", "normal_quantile")
    out = tmp_path / "out"
    result = _predict(ckpt, f"{inputs}/*.png", out, "raw_map=png16")
    assert result["failed"] == 1
    rows = _rows(out)
    assert len(rows) == 4 and all(r["max_neg_log10_nfa"] == "" for r in rows)
    raw = Image.open(out / "maps" / "grey.png")
    assert raw.mode.startswith("I") and raw.size == GOOD["grey.png"]
    score = float(next(r for r in rows if r["path"].endswith("grey.png"))["score"])
    assert score - 0.05 < np.asarray(raw).max() / 65535 <= score + 1e-5


def test_colliding_names_keep_apart(checkpoint, inputs, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    image = Image.open(inputs / "rgb_small.png")
    image.save(folder / "a.png")
    image.save(folder / "a.bmp")
    image.save(folder / "sub" / "a.png")
    out = tmp_path / "out"
    assert _predict(checkpoint, f"{folder}/**/a.*", out)["images"] == 3
    assert {p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")} == {
        "a_png.png",
        "a_bmp.png",
        "sub/a.png",
    }


def test_command_line_exit_status(checkpoint, inputs, tmp_path):
    common = [
        sys.executable,
        "-m",
        "uflow_exp.predict",
        f"ckpt_path={checkpoint}",
        "num_workers=0",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    failed = subprocess.run(
        [*common, f"input={inputs}", f"output={tmp_path / 'out'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1, failed.stderr
    assert "broken.png" in failed.stdout + failed.stderr
    assert len(_rows(tmp_path / "out")) == 4


def test_threshold_override_applies_another_nfa_mode(checkpoint, inputs, tmp_path):
    tree = _rows_of(_predict_ok(checkpoint, inputs, tmp_path / "tree"))
    block = _rows_of(_predict_ok(checkpoint, inputs, tmp_path / "block", "threshold=nfa_block"))
    assert [r["score"] for r in tree] == [r["score"] for r in block]  # same maps
    assert [r["max_neg_log10_nfa"] for r in tree] != [r["max_neg_log10_nfa"] for r in block]
    resolved = (tmp_path / "block" / "run" / "config_resolved.yaml").read_text()
    assert "NFABlockThreshold" in resolved
    from uflow_exp.utils.checks import ConfigValueError

    with pytest.raises(ConfigValueError, match="must be calibrated on held-out images"):
        _predict(checkpoint, inputs, tmp_path / "quantile", "threshold=normal_quantile")
    # refused before the checkpoint (or anything else) is read
    with pytest.raises(ConfigValueError, match="must be calibrated on held-out images"):
        _predict(
            tmp_path / "no.ckpt", tmp_path / "no_input", tmp_path / "quantile", "threshold=normal_quantile"
        )


def test_a_false_alarm_rate_sets_the_level_from_the_checkpoints_normal_scores(inputs, tmp_path):
    """threshold.false_alarm_rate alone keeps the checkpoint's mode and takes its level from the
    normal validation scores the checkpoint stores: no validation images needed."""
    from uflow_exp.thresholds import conformal_rank
    from uflow_exp.utils.checks import ConfigValueError

    # a one-epoch model's normal scores lie below the NFA's level 0 (let the calibration decide alone),
    # and are all alike: make the least unusual normal image score far lower
    checkpoint = _train(tmp_path, "nfa_tree", "threshold.log_nfa_threshold=-1e6")
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"]["threshold.normal_scores"][0] = -50.0
    torch.save(saved, checkpoint)
    stored = UFlowModule.from_checkpoint(str(checkpoint)).threshold
    scores = stored.normal_scores
    assert scores.numel() >= 2 and float(scores[-1]) == float(stored.calibrated_level)
    rate = 0.9  # k = 1: the smallest of the normal scores, below the default (their largest)
    level = float(scores[conformal_rank(len(scores), rate) - 1])
    assert level < stored.level
    rows = _rows_of(_predict_ok(checkpoint, inputs, tmp_path / "rate", f"threshold.false_alarm_rate={rate}"))
    assert [r["decision"] for r in rows] == [
        "anomalous" if float(r["max_neg_log10_nfa"]) > level else "normal" for r in rows
    ]
    assert {r["decision"] for r in rows} == {"anomalous"}  # every input scores above -50 ...
    default = _rows_of(_predict_ok(checkpoint, inputs, tmp_path / "default"))
    assert [r["max_neg_log10_nfa"] for r in rows] == [r["max_neg_log10_nfa"] for r in default]
    assert [r["decision"] for r in default] == [
        "anomalous" if float(r["max_neg_log10_nfa"]) > stored.level else "normal" for r in default
    ]  # ... the default level, the largest normal score, decides as before
    resolved = (tmp_path / "rate" / "run" / "config_resolved.yaml").read_text()
    assert "NFATreeThreshold" in resolved and f"false_alarm_rate: {rate}" in resolved
    with pytest.raises(ConfigValueError, match=r"false_alarm_rate=1.5.*must lie in \(0, 1\)"):
        _predict(checkpoint, inputs, tmp_path / "bad", "threshold.false_alarm_rate=1.5")


def _predict_ok(ckpt: Path, input_: Path, out: Path, *extra: str) -> Path:
    _predict(ckpt, input_, out, *extra)
    return out


def _rows_of(out: Path) -> list[dict]:
    return sorted(_rows(out), key=lambda r: r["path"])


def test_onnxruntime_backend_predicts_what_torch_predicts(checkpoint, inputs, tmp_path, monkeypatch):
    from uflow_exp import onnx_runner
    from uflow_exp.tasks.export import export_onnx

    runs = []
    call = onnx_runner.OnnxAnomalyModel.__call__
    monkeypatch.setattr(
        onnx_runner.OnnxAnomalyModel, "__call__", lambda self, x: runs.append(len(x)) or call(self, x)
    )

    export_onnx(UFlowModule.from_checkpoint(str(checkpoint)), tmp_path / "model.onnx")
    torch_rows = _rows_of(_predict_ok(checkpoint, inputs, tmp_path / "torch", "raw_map=npy"))
    onnx_rows = _rows_of(
        _predict_ok(
            checkpoint,
            inputs,
            tmp_path / "onnx",
            "raw_map=npy",
            "backend=onnxruntime",
            f"onnx_path={tmp_path / 'model.onnx'}",
        )
    )
    assert sum(runs) == len(GOOD)  # the graph ran on every readable image
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    for ours, theirs in zip(onnx_rows, torch_rows, strict=True):
        assert float(ours["score"]) == pytest.approx(float(theirs["score"]), abs=1e-4)
        assert float(ours["max_neg_log10_nfa"]) == pytest.approx(float(theirs["max_neg_log10_nfa"]), abs=1e-2)
        assert ours["decision"] == theirs["decision"]
    for name in GOOD:
        stem = Path(name).stem
        a, b = (np.load(tmp_path / kind / "maps" / f"{stem}.npy") for kind in ("torch", "onnx"))
        assert np.abs(a - b).max() < 1e-4 and a.std() > 0


def test_onnxruntime_backend_without_a_graph_says_how_to_export(checkpoint, inputs, tmp_path):
    from uflow_exp.onnx_runner import OnnxRunError

    with pytest.raises(OnnxRunError, match=r"no graph .*missing.onnx.*uflow_exp.export ckpt_path="):
        _predict(
            checkpoint,
            inputs,
            tmp_path / "out",
            "backend=onnxruntime",
            f"onnx_path={tmp_path / 'missing.onnx'}",
        )
    with pytest.raises(ValueError, match="backend=tensorrt: expected one of torch, onnxruntime"):
        _predict(checkpoint, inputs, tmp_path / "out", "backend=tensorrt")


def test_overlay_colours_span_the_overlay_range_and_default_to_the_upper_half_for_a_relative_map():
    from matplotlib import colormaps

    from uflow_exp.tasks.predict import overlay_range, render_overlay
    from uflow_exp.utils.checks import ConfigValueError

    assert overlay_range(None, 0.8) == (0.5, 1.0)  # the relative map's level sits at 0.5
    assert overlay_range(None, None) == (0.0, 1.0)
    assert overlay_range([0.2, 0.6], 0.8) == (0.2, 0.6)
    for bad in ([0.6, 0.2], [0.5], [0.0, 1.5], "0.5"):
        with pytest.raises(
            ConfigValueError,
            match=r"overlay_range must be null or \[low, high\] .*got " + re.escape(str(bad)),
        ):
            overlay_range(bad, None)

    image, mask = np.zeros((40, 40, 3)), np.zeros((40, 40), dtype=bool)
    amap = np.full((40, 40), 0.75)
    jet = colormaps["jet"]
    for value_range, share in (((0.5, 1.0), 0.5), ((0.0, 1.0), 0.75), ((0.0, 0.5), 1.0)):
        pixel = np.asarray(render_overlay(image, amap, mask, 1.0, value_range=value_range))[20, 20]
        assert np.abs(pixel / 255.0 - np.asarray(jet(share)[:3])).max() < 1 / 255 + 1e-9
