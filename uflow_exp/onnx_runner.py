"""Run an exported U-Flow graph (``python -m uflow_exp.export``) with onnxruntime on the CPU.

A production line that cannot ship torch's training stack, or wants onnxruntime's CPU kernels, runs
``predict`` or ``evaluate`` with ``backend=onnxruntime``: the graph gives the anomaly map and the
latents, and the checkpoint's threshold (NFA or calibrated value) segments them in Python as usual.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uflow_exp.onnx_names import INPUT_NAME, OUTPUT_NAME, latent_names
from uflow_exp.utils.shapes import Shape, size_key

BACKENDS = ("torch", "onnxruntime")


class OnnxRunError(ValueError):
    """An exported graph that does not fit the checkpoint it is run with."""


class OnnxAnomalyModel:
    """``images`` (B, 3, H, W) RGB in [0, 1] -> (anomaly map (B, 1, h, w), latents per scale).

    Refuses a graph exported from another configuration (input size, eval size, number of scales),
    naming the file and what differs.
    """

    def __init__(
        self, path: str | Path, input_size: Shape | int, eval_size: Shape | int, n_scales: int
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxRunError(
                f"backend=onnxruntime: no graph {self.path}; export it first with "
                "`python -m uflow_exp.export ckpt_path=<the checkpoint>` (or set onnx_path=)"
            )
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        found = self.session.get_modelmeta().custom_metadata_map
        expected = {
            "input_size": size_key(input_size),
            "eval_size": size_key(eval_size),
            "latents": str(n_scales),
        }
        wrong = {k: found.get(k) for k, v in expected.items() if found.get(k) != v}
        if wrong:
            raise OnnxRunError(
                f"{self.path} was exported from another configuration: it has {wrong}, the checkpoint "
                f"needs {expected}; export the checkpoint again"
            )
        self.outputs = [OUTPUT_NAME, *latent_names(n_scales)]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        results = self.session.run(self.outputs, {INPUT_NAME: images.detach().float().cpu().numpy()})
        amap, *z = (torch.from_numpy(r).to(images.device) for r in results)
        return amap, z


def apply_backend(module, backend: str, onnx_path: str | None, ckpt: Path) -> None:
    """Have ``module`` (a ``UFlowModule``) infer with ``backend``: ``torch`` (as trained) or
    ``onnxruntime`` (the graph at ``onnx_path``, by default the export beside the checkpoint)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        module.use_onnx(str(onnx_path or Path(ckpt).with_suffix(".onnx")))
