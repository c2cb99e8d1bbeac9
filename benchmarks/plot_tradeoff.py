"""What a false-alarm budget buys: detection recall against false-alarm rate for one trained run.

Run: .venv/bin/python benchmarks/plot_tradeoff.py RUN_DIR --out FIGURE.png, where RUN_DIR is a
training run's folder (`config_resolved.yaml`, `checkpoints/`) with a calibrated NFA threshold. Its
best checkpoint scores the validation split's normal images (each image's largest -log10 NFA: the
calibration scores) and the test images once; then every level the calibration can take (the k-th of
the n normal scores, k = 1..n, i.e. `threshold.false_alarm_rate` from (n + 1 - k) / (n + 1)) is
applied to the test images. The figure plots, against the test false-alarm rate: the recall at each
of those levels (the default, the largest score, marked), and the oracle ROC of a threshold on each
image's score (`predict`'s image score, as `test/oracle_recall_at_false_alarms` uses; reads the test
labels). The table printed beside it lists the same points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch
from bench_maps import load_run

from uflow_exp.models.uflow.lightning_module import UFlowModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def image_scores(module: UFlowModule, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the largest -log10 NFA, the image score and the label."""
    significance, maxima, labels = [], [], []
    with torch.inference_mode():
        for batch in loader:
            out = module.predict_step(batch)
            significance.append(out["significance"].flatten(1).amax(dim=1))
            maxima.append(out["image_score"])
            labels.append(batch["label"])
    return torch.cat(significance), torch.cat(maxima), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run", type=Path, help="a training run's folder")
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    args = parser.parse_args()
    module, datamodule = load_run(args.run, "fit", "test")
    val_sig, _, val_labels = image_scores(module, datamodule.val_dataloader())
    normal_scores = val_sig[val_labels == 0].sort().values
    test_sig, test_max, labels = image_scores(module, datamodule.test_dataloader())
    normal, anomalous = labels == 0, labels == 1
    n = len(normal_scores)
    floor = float(module.threshold.log_nfa_threshold)
    rows = []
    for k in range(1, n + 1):
        level = max(floor, float(normal_scores[k - 1]))
        flagged = test_sig > level
        rows.append(((n + 1 - k) / (n + 1), flagged[normal].double().mean().item(),
                     flagged[anomalous].double().mean().item()))  # fmt: skip
    print(f"{args.run}: {n} normal validation images, {int(normal.sum())} / {int(anomalous.sum())} test\n")
    print("| promised rate | test false alarms | detection recall |\n|---|---|---|")
    for promised, fa, recall in rows[::-1]:
        print(f"| {promised:.3f} | {fa:.3f} | {recall:.3f} |")
    order = test_max.argsort(descending=True)
    oracle_fa = torch.cumsum(normal[order].double(), 0) / normal.sum()
    oracle_recall = torch.cumsum(anomalous[order].double(), 0) / anomalous.sum()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.step([0, *oracle_fa.tolist()], [0, *oracle_recall.tolist()], where="post", color="grey",
              label="oracle: threshold on the image score (test labels)")  # fmt: skip
    axes.plot(
        [r[1] for r in rows], [r[2] for r in rows], "o-", ms=3, label="tree-NFA level at a false-alarm rate"
    )
    axes.plot([rows[-1][1]], [rows[-1][2]], "r*", ms=14, label="default (the strictest level)")
    axes.set(
        xlabel="false-alarm rate on normal test images",
        ylabel="detection recall",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axes.set_title(f"{datamodule.category or datamodule.layout}: n = {n} normal validation images")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    main()
