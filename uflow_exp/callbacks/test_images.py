"""Saves (and logs to W&B) a few test images beside their ground truth, anomaly map and mask."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger


def render_panel(image, mask, amap, segmentation, title: str, path: Path, map_range=(0.0, 1.0)) -> None:
    """Save `panel_figure` as ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    panel_figure(image, mask, amap, segmentation, title, map_range).savefig(path, dpi=80)


def panel_figure(image, mask, amap, segmentation, title: str, map_range=(0.0, 1.0)):
    """One row: image | ground truth | anomaly map (with colour bar) | automatic segmentation. ``mask``
    None: an anomalous image labelled without a mask, drawn grey and said so (black would read "no
    defect"). The map's colours span ``map_range`` (low, high)."""
    # A bare Figure (no pyplot): rendering must not switch the backend of a notebook or GUI session.
    from matplotlib.figure import Figure

    # Fixed margins: constrained layout took over 40 % of each panel's rendering time (a test of 30
    # images spent more time drawing 9 figures than running the model).
    fig = Figure(figsize=(13, 3.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.2)
    axes = fig.subplots(1, 4)
    panels = [
        (image.permute(1, 2, 0).numpy(), "image", {}),
        (
            amap.new_full(amap.shape, 0.5).numpy(),
            "no mask (labelled anomalous)",
            {"cmap": "gray", "vmin": 0, "vmax": 1},
        )
        if mask is None
        else (mask.numpy(), "ground truth", {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (amap.numpy(), "anomaly map", {"cmap": "jet", "vmin": map_range[0], "vmax": map_range[1]}),
        (segmentation.numpy(), "automatic mask", {"cmap": "gray", "vmin": 0, "vmax": 1}),
    ]
    for ax, (array, name, kwargs) in zip(axes, panels, strict=True):
        shown = ax.imshow(array, **kwargs)
        ax.set_title(name)
        ax.axis("off")
        if name == "anomaly map":
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).set_label(
                "same scale in all panels", fontsize=7
            )
    fig.suptitle(title, fontsize=9)
    return fig


class TestImageLogger(L.Callback):
    """Renders up to ``max_images`` test samples at test end into ``output_dir`` (a quarter of them
    normal, the rest anomalous, in test order) and logs them to W&B when a W&B logger is attached.

    What it draws comes from each test step's outputs (``anomaly_map``, ``mask``, ``segmentation``)
    and, at the end, the module's ``test_curves`` (pixel ROC and PRO), which the module publishes once
    its test epoch has ended."""

    def __init__(self, max_images: int = 8, output_dir: str = "test_images") -> None:
        self.max_images = max_images
        self.output_dir = Path(output_dir)
        self._kept: dict[bool, list[dict]] = {False: [], True: []}

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._kept = {False: [], True: []}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs:
            return
        size = tuple(outputs["anomaly_map"].shape[-2:])
        images = F.interpolate(batch["image"], size=size, mode="bilinear", align_corners=False)
        for i in range(len(images)):
            kept = self._kept[bool(batch["label"][i])]
            if len(kept) >= self.max_images:
                continue
            kept.append(
                {
                    "image": images[i].clamp(0, 1).cpu(),
                    "mask": outputs["mask"][i, 0].float().cpu() if batch["has_mask"][i] else None,
                    "amap": outputs["anomaly_map"][i, 0].float().cpu(),
                    "segmentation": outputs["segmentation"][i, 0].float().cpu(),
                    "path": batch["path"][i],
                }
            )

    def _chosen(self) -> list[dict]:
        normal, anomalous = self._kept[False], self._kept[True]
        n_normal = min(len(normal), max(self.max_images // 4, self.max_images - len(anomalous)))
        return normal[:n_normal] + anomalous[: self.max_images - n_normal]

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._render(trainer, getattr(pl_module, "test_curves", {}))
        self._kept = {False: [], True: []}

    def _render(self, trainer, curves: dict) -> None:
        chosen = self._chosen()
        map_range = shared_map_range([sample["amap"] for sample in chosen])
        panels = []
        for index, sample in enumerate(chosen):
            path = self.output_dir / f"{index:03d}_{Path(sample['path']).stem}.png"
            render_panel(
                sample["image"], sample["mask"], sample["amap"], sample["segmentation"], sample["path"], path,
                map_range,
            )  # fmt: skip
            panels.append(path)
        curve_plot = render_curves(curves, self.output_dir / "curves.png") if curves else None
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            # one key per kind of image: W&B shows the images of a key at one size
            if panels:
                logger.log_image(
                    key="test/examples", images=[str(p) for p in panels], caption=[s["path"] for s in chosen]
                )
            if curve_plot is not None:
                logger.log_image(
                    key="test/curves", images=[str(curve_plot)], caption=["pixel ROC and PRO curves"]
                )


def shared_map_range(maps: list) -> tuple[float, float]:
    """One colour range for all panels of a run, from the lowest to the highest value of their maps:
    the maps live in [0, 1], but the relative map spends most of its pixels near 0.5, so a fixed [0, 1]
    scale drew every panel the same flat colour; a range per panel would make a clean image's noise look
    as hot as a defect. Shared, the colours compare across panels and still span what the maps hold."""
    if not maps:
        return 0.0, 1.0
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def render_curves(curves: dict, path: Path, max_fpr: float = 0.3) -> Path:
    """Pixel ROC (full range) and PRO (the AUPRO range up to ``max_fpr`` marked) side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    titles = {"roc": ("pixel ROC", "true positive rate"), "pro": ("per-region overlap", "PRO")}
    for ax, (name, (title, ylabel)) in zip(axes, titles.items(), strict=True):
        ax.set_title(title)
        ax.set_xlabel("false positive rate (normal pixels)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if name not in curves:
            ax.text(0.5, 0.5, "undefined: no anomalous pixels", ha="center")
            continue
        x, y = (t.cpu().numpy() for t in curves[name])
        ax.plot(x, y, color="tab:red")
        if name == "pro":
            ax.axvline(max_fpr, color="gray", linestyle="--", label=f"AUPRO limit (FPR {max_fpr})")
            ax.legend(loc="lower right")
        else:
            ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
            ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
