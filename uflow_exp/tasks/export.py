"""Export a trained checkpoint's backbone + flow + anomaly map to a deployable graph (ONNX).

The graph takes RGB images in [0, 1] (B, 3, H, W) at the checkpoint's ``input_size`` (the ImageNet
normalisation is inside it, as in the model) and returns the anomaly map (B, 1, h, w) at its ``eval_size``
that metrics and thresholds see, then the latents ``z0``, ``z1``, ... (finest scale first) that the NFA
thresholds take; the batch axis is dynamic. Thresholds and the NFA stay in Python
(``predict``/``evaluate`` with ``backend=onnxruntime`` run the graph and threshold its outputs).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from uflow_exp.models.uflow.lightning_module import UFlowModule
from uflow_exp.models.uflow.model import UFlow
from uflow_exp.onnx_names import INPUT_NAME, OUTPUT_NAME, latent_names
from uflow_exp.utils import print_config, require_checkpoint
from uflow_exp.utils.shapes import size_key

log = logging.getLogger(__name__)

FORMATS = ("onnx",)


class AnomalyMapNet(nn.Module):
    """Images -> (anomaly map, latents per scale), the inference path of ``UFlowModule`` as one module."""

    def __init__(self, model: UFlow, eval_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.eval_size = eval_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z, _ = self.model.encode(self.model.normalize(self.model.extract(images)), jac=False)
        return (self.model.anomaly_map(z, self.eval_size), *z)


def reference_flow_copy(module: UFlowModule) -> UFlow:
    """The module's model rebuilt with FrEIA's reference blocks and the same weights (same numbers)."""
    hp = module.hparams
    model = UFlow.from_config(hp.backbone, hp.flow, pretrained=False, weights=None, fast_flow=False)
    model.load_state_dict(module.model.state_dict())
    return model.eval()


def _export_onnx_graph(net: AnomalyMapNet, example: torch.Tensor, output: Path, opset: int) -> None:
    outputs = [OUTPUT_NAME, *latent_names(len(net.model.feature_extractor.channels))]
    with warnings.catch_warnings():
        # The fast block checks once whether w_perm is a permutation (a Python bool of a tensor); the
        # tracer warns that it becomes a constant, which is right: the weights are frozen in the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (example,),
            str(output),
            # The TorchScript exporter handles FrEIA's graph (Python control flow over dict-of-node
            # outputs) where the dynamo exporter is still fragile.
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
        )


def _tiling_metadata(module: UFlowModule) -> dict[str, str]:
    """How a tiled model's graph is run: on each tile of the whole image, the tile maps blended where
    tiles overlap (``Tiler.blend``: what ``predict`` and ``backend=onnxruntime`` do)."""
    if module.tiler is None:
        return {}
    tiler = module.tiler
    return {
        "tiling": json.dumps(
            {
                "image_size": list(tiler.shape),
                "tile_origins": [list(origin) for origin in tiler.origins],
                "maps": "one graph call per tile at input_size; overlapping tile maps fade linearly",
            }
        )
    }


def export_onnx(module: UFlowModule, output: str | Path, opset: int = 17, fast_flow: bool = True) -> Path:
    """Write ``module``'s images -> anomaly-map graph to ``output`` and check it with ``onnx.checker``.

    The fast flow block (a channel gather instead of FrEIA's permutation convolution) is tried first; if
    the exporter cannot take it, or ``fast_flow`` is False, a copy with FrEIA's reference blocks and the
    same weights is exported instead.
    """
    import onnx

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    shape = module.model.input_shape
    example = torch.zeros(2, 3, *shape)
    builders = [("fast", lambda: module.model)] if fast_flow else []
    builders.append(("reference", lambda: reference_flow_copy(module)))
    for attempt, (kind, build) in enumerate(builders, 1):
        try:
            _export_onnx_graph(AnomalyMapNet(build(), module.eval_size).eval(), example, output, opset)
            flow_kind = kind
            break
        except Exception as error:
            if attempt == len(builders):
                raise
            log.warning("ONNX export of the fast flow block failed (%s); exporting FrEIA's blocks", error)
    graph = onnx.load(str(output))
    onnx.checker.check_model(graph)
    # Consumers need the input side and the map's meaning without the checkpoint.
    for key, value in {
        "input_size": size_key(shape),
        "eval_size": size_key(module.eval_size),
        "input_normalisation": "none: RGB in [0, 1]; the graph applies the ImageNet mean/std itself",
        "backbone": str(module.hparams.backbone["name"]),
        "flow_blocks": flow_kind,
        "latents": str(len(module.model.feature_extractor.channels)),
        **_tiling_metadata(module),
    }.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(output))
    log.info("Exported %s (%s flow blocks, opset %d)", output, flow_kind, opset)
    return output


def onnx_max_abs_difference(
    module: UFlowModule, path: str | Path, batch_size: int = 2, seed: int = 0
) -> float:
    """Largest |onnxruntime map - torch map| on a random batch."""
    import onnxruntime as ort

    shape = module.model.input_shape
    images = torch.randn(batch_size, 3, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = AnomalyMapNet(module.model.eval().cpu(), module.eval_size)(images)[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())


def export(cfg: DictConfig) -> dict[str, float]:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format}: unknown export format; choose one of {', '.join(FORMATS)}")
    ckpt = require_checkpoint(cfg.ckpt_path)
    output = Path(cfg.output) if cfg.get("output") else ckpt.with_suffix(f".{cfg.format}")
    print_config(cfg, Path(cfg.paths.output_dir) / "config_resolved.yaml")

    module = UFlowModule.from_checkpoint(str(ckpt))
    export_onnx(module, output, opset=int(cfg.get("opset", 17)))
    if not cfg.get("verify", True):
        return {}
    try:
        difference = onnx_max_abs_difference(module, output)
    except ImportError:
        log.warning("onnxruntime is not installed; the exported graph was not run")
        return {}
    log.info("onnxruntime vs torch on a random batch: max |difference| %.3g", difference)
    return {"max_abs_diff": difference}
