"""ONNX export of a tiny trained checkpoint: onnxruntime reproduces the torch anomaly map."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import fake_layouts
from tests.framework_helpers import TINY, compose_train
from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.tasks.export import AnomalyMapNet, export, export_onnx
from uflow_exp.tasks.train import train

ROOT = Path(__file__).resolve().parents[1]
HAVE_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx and onnxruntime are not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    root = fake_layouts.make_mvtec(tmp / "data", n_train=6, size=64)
    train(compose_train([*TINY, "dataset=mvtec", f"dataset.root={root}", "test=false"], tmp / "run"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


def _torch_and_onnx_maps(module: UFlowModule, path: Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    images = torch.randn(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
    model = module.model.eval()
    with torch.no_grad():  # the torch path's map, as the module tests and predicts with it
        expected = model.anomaly_map(model(images)[0], module.eval_size).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["anomaly_map"], {"images": images.numpy()})
    return expected, got


@needs_onnx
def test_onnx_map_matches_torch_for_any_batch_size(checkpoint, tmp_path):
    import onnx

    cfg = compose_train([f"ckpt_path={checkpoint}"], tmp_path / "out", "export")
    result = export(cfg)
    path = checkpoint.with_suffix(".onnx")  # output=null: beside the checkpoint
    assert path.is_file()
    assert result["max_abs_diff"] < 1e-4
    module = UFlowModule.from_checkpoint(str(checkpoint))
    for batch_size in (2, 3, 1):  # 2 is the export's example batch; the others need the dynamic axis
        expected, got = _torch_and_onnx_maps(module, path, batch_size)
        assert got.shape == (batch_size, 1, 64, 64)
        assert np.abs(got - expected).max() < 1e-4
        assert expected.std() > 0  # a real map, not a constant that would match trivially
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["input_size"] == "64" and metadata["eval_size"] == "64"
    assert metadata["flow_blocks"] == "fast" and metadata["latents"] == "3"
    # the latents come out too, for the NFA thresholds
    from uflow_exp.onnx_runner import OnnxAnomalyModel

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    amap, z = OnnxAnomalyModel(path, 64, 64, 3)(images)
    with torch.no_grad():
        expected = AnomalyMapNet(module.model.eval(), module.eval_size)(images)
    assert [tuple(t.shape) for t in z] == [tuple(t.shape) for t in expected[1:]]
    for got, want in zip((amap, *z), expected, strict=True):
        assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


@needs_onnx
@pytest.mark.parametrize(
    "override", ["flow.position_channels=4", "flow.base_mixture_components=4"], ids=["positions", "mixture"]
)
def test_positional_conditions_and_the_base_mixture_are_part_of_the_graph(checkpoint, tmp_path, override):
    # buffers, not graph inputs: the encoding must follow the batch, the fitted mixture score the map
    root = checkpoint.parents[2] / "data"
    train(
        compose_train(
            [*TINY, "dataset=mvtec", f"dataset.root={root}", "test=false", override], tmp_path / "run"
        )
    )
    module = UFlowModule.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    model = module.model
    assert model.position_0.shape[0] == 4 if "position" in override else model.base_mixture.is_fitted()
    path = export_onnx(module, tmp_path / "model.onnx")
    for batch_size in (2, 3):
        expected, got = _torch_and_onnx_maps(module, path, batch_size)
        assert np.abs(got - expected).max() < 1e-4 and expected.std() > 0


@needs_onnx
def test_evaluate_with_onnxruntime_gives_the_torch_metrics(checkpoint, tmp_path, monkeypatch):
    from uflow_exp import onnx_runner
    from uflow_exp.tasks.evaluate import evaluate

    runs = []
    call = onnx_runner.OnnxAnomalyModel.__call__
    monkeypatch.setattr(
        onnx_runner.OnnxAnomalyModel, "__call__", lambda self, x: runs.append(len(x)) or call(self, x)
    )

    export_onnx(UFlowModule.from_checkpoint(str(checkpoint)), tmp_path / "model.onnx")
    root = checkpoint.parents[2] / "data"
    data = ["dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0", "logger=csv", "trainer=cpu"]
    results = {}
    for backend in ("torch", "onnxruntime"):
        cfg = compose_train(
            [*data, f"ckpt_path={checkpoint}", f"backend={backend}", f"onnx_path={tmp_path / 'model.onnx'}"],
            tmp_path / backend,
            "eval",
        )
        results[backend] = evaluate(cfg)
    assert sum(runs) == 4  # the onnxruntime evaluation ran the graph on the 4 test images
    assert "test/pixel_auroc" in results["torch"] and "test/miou" in results["torch"]
    for key, value in results["torch"].items():
        if key.startswith("test/"):  # not time/test_images_per_s
            assert results["onnxruntime"][key] == pytest.approx(value, abs=1e-3, nan_ok=True), key


@needs_onnx
def test_a_graph_of_another_configuration_is_refused(checkpoint, tmp_path):
    from uflow_exp.onnx_runner import OnnxAnomalyModel, OnnxRunError

    path = export_onnx(UFlowModule.from_checkpoint(str(checkpoint)), tmp_path / "model.onnx")
    with pytest.raises(OnnxRunError, match=r"model.onnx was exported from another configuration.*input_size"):
        OnnxAnomalyModel(path, 128, 64, 3)


@needs_onnx
def test_falls_back_to_freia_blocks_with_the_same_map(checkpoint, tmp_path, monkeypatch):
    import onnx

    from uflow_exp.models.uflow.blocks import FastAllInOneBlock
    from uflow_exp.tasks import export as export_task

    real_export = export_task._export_onnx_graph

    def fast_block_unsupported(net, *args):
        # Stands in for an exporter that cannot trace the fast block's custom autograd Function.
        if any(isinstance(m, FastAllInOneBlock) for m in net.modules()):
            raise RuntimeError("unsupported autograd Function")
        real_export(net, *args)

    monkeypatch.setattr(export_task, "_export_onnx_graph", fast_block_unsupported)
    module = UFlowModule.from_checkpoint(str(checkpoint))
    path = export_onnx(module, tmp_path / "nested" / "reference.onnx")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["flow_blocks"] == "reference"
    expected, got = _torch_and_onnx_maps(module, path, 2)
    assert np.abs(got - expected).max() < 1e-4


def test_unknown_format_is_refused(tmp_path):
    cfg = compose_train(["ckpt_path=whatever.ckpt", "format=tflite"], tmp_path / "out", "export")
    with pytest.raises(ValueError, match=r"format=tflite.*onnx"):
        export(cfg)


@needs_onnx
def test_command_line_writes_the_named_output(checkpoint, tmp_path):
    output = tmp_path / "model.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uflow_exp.export",
            f"ckpt_path={checkpoint}",
            f"output={output}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=ROOT,
        env={**os.environ, "PROJECT_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert output.is_file() and output.stat().st_size > 1_000_000  # resnet18's two stages + flow weights
