"""Rectangular inputs: config sides, the keep_aspect rectangle and the model built for it."""

from __future__ import annotations

import pytest
import torch

from uflow_exp.models.uflow import UFlow
from uflow_exp.models.uflow.model import position_encoding
from uflow_exp.nfa.block import block_nfa
from uflow_exp.nfa.tree import tree_nfa
from uflow_exp.utils.shapes import as_shape, keep_aspect, size_key


def test_a_side_is_a_square_and_a_pair_is_height_width():
    assert as_shape(256) == (256, 256)
    assert as_shape([256, 640]) == (256, 640)
    for bad in ("256", [256], [256, 0], 2.5, True):
        with pytest.raises(ValueError, match="input_size"):
            as_shape(bad, "input_size")
    assert size_key(256) == size_key([256, 256]) == "256"
    assert size_key([640, 256]) == "640x256"


@pytest.mark.parametrize(
    ("short", "height", "width", "multiple", "expected"),
    [
        (256, 630, 250, 32, (640, 256)),  # KolektorSDD: tall, the long side 645 -> 640
        (256, 400, 300, 32, (352, 256)),  # the tyre: 341 -> 352
        (256, 300, 400, 32, (256, 352)),  # the same, wide
        (256, 256, 256, 32, (256, 256)),
        (256, 250, 630, 1, (256, 645)),  # maps need no multiple
        (64, 10, 1000, 32, (64, 6400)),
    ],
)
def test_keep_aspect_scales_the_short_side_and_rounds_the_long_one(short, height, width, multiple, expected):
    assert keep_aspect(short, height, width, multiple) == expected


def test_the_model_and_its_maps_take_a_rectangle():
    model = UFlow("resnet18", input_size=[64, 128], flow_steps=2, pretrained=False, position_channels=8)
    assert model.feature_extractor.feature_sizes == [(16, 32), (8, 16), (4, 8)]
    model.eval()
    with torch.no_grad():
        z, _ = model(torch.rand(2, 3, 64, 128))
    assert [tuple(zs.shape[-2:]) for zs in z] == [(16, 32), (8, 16), (4, 8)]
    assert model.anomaly_map(z).shape == (2, 1, 64, 128)
    assert model.anomaly_map(z, (32, 64)).shape == (2, 1, 32, 64)
    assert tree_nfa(z, (32, 64)).shape == (2, 1, 32, 64)
    assert block_nfa(z, (32, 64)).shape == (2, 1, 32, 64)
    with pytest.raises(ValueError, match="not divisible"):
        UFlow("resnet18", input_size=[64, 100], pretrained=False)


def test_position_encoding_of_a_rectangle_codes_rows_and_columns_by_their_own_length():
    enc = position_encoding(8, (4, 8))
    assert enc.shape == (8, 4, 8)
    # rows vary down a column only, columns along a row only; the square case is unchanged
    assert torch.equal(enc[:4, :, 0], enc[:4, :, 7]) and torch.equal(enc[4:, 0, :], enc[4:, 3, :])
    assert torch.allclose(enc[:4, 1, 0], position_encoding(8, 4)[:4, 1, 0])
    assert torch.allclose(enc[4:, 0, 3], position_encoding(8, 8)[4:, 0, 3])


def test_a_run_on_wide_images_keeps_their_aspect_and_evaluates_predicts_and_exports_it(tmp_path):
    import numpy as np
    from omegaconf import OmegaConf

    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.models.uflow.lightning_module import UFlowModule
    from uflow_exp.tasks.evaluate import evaluate
    from uflow_exp.tasks.predict import predict
    from uflow_exp.tasks.train import train

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=(32, 80))  # wide images
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    trained = train(compose_train([*TINY, *data], tmp_path / "run"))  # resize=auto: images of one shape
    # TINY's 64 px: the shorter side 64, the longer 64 * 80 / 32 = 160; recorded for every later command
    saved = OmegaConf.load(tmp_path / "run" / "config_resolved.yaml")
    assert list(saved.backbone.input_size) == [64, 160] and list(saved.model.eval_size) == [64, 160]
    assert saved.dataset.resize == "keep_aspect"  # the mode auto chose
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = UFlowModule.from_checkpoint(str(ckpt))
    assert module.model.input_shape == (64, 160) and module.eval_size == (64, 160)

    cfg = compose_train([*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    evaluated = evaluate(cfg)
    for key in ("test/pixel_auroc", "test/pixel_aupro", "test/image_auroc", "test/miou"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key

    out = tmp_path / "predicted"
    overrides = [f"ckpt_path={ckpt}", f"input={root / 'bottle' / 'test' / 'broken'}", f"output={out}"]
    cfg = compose_train([*overrides, "num_workers=0", "device=cpu", "raw_map=npy"], out / "run", "predict")
    assert predict(cfg) == {"images": 2, "failed": 0}
    assert np.load(out / "maps" / "000.npy").shape == (32, 80)  # back at the file's own size

    pytest.importorskip("onnxruntime")
    import onnx

    from uflow_exp.tasks.export import export_onnx, onnx_max_abs_difference

    path = export_onnx(module, tmp_path / "model.onnx")
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["input_size"] == "64x160" and metadata["eval_size"] == "64x160"
    assert onnx_max_abs_difference(module, path) < 1e-4


def test_a_square_checkpoint_is_evaluated_square_on_images_auto_would_keep_the_aspect_of(tmp_path):
    from omegaconf import OmegaConf

    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.tasks.evaluate import evaluate
    from uflow_exp.tasks.train import train

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=(32, 80))
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0"]
    trained = train(compose_train([*TINY, *data, "dataset.resize=square"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # the data set's default (auto) would choose a 64 x 160 rectangle; the model was built for 64 x 64
    cfg = compose_train([*data, "logger=csv", "trainer=cpu", f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    evaluated = evaluate(cfg)
    assert evaluated["test/pixel_auroc"] == pytest.approx(trained["test/pixel_auroc"], rel=1e-6)
    assert OmegaConf.load(tmp_path / "eval" / "config_resolved.yaml").dataset.resize == "square"
