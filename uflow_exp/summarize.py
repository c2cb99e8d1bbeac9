"""`python -m uflow_exp.summarize RUN_OR_MULTIRUN_DIR [--out DIR] [--wandb]`: a results table of the
runs below a folder (one row per job, failed jobs included), with the paper's MVTec pixel AUROC beside
each MVTec category, as Markdown + CSV and a bar chart of pixel AUROC (image AUROC when no job has
pixel masks)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from uflow_exp.utils.runs import last_line, natural_key

# Pixel AUROC (%) per MVTec AD category from the paper (mcait backbone at 448; docs: uflow-method.md).
PAPER_PIXEL_AUROC = {
    "bottle": 97.98,
    "cable": 98.17,
    "capsule": 98.95,
    "carpet": 99.45,
    "grid": 98.19,
    "hazelnut": 99.01,
    "leather": 99.41,
    "metal_nut": 98.19,
    "pill": 99.15,
    "screw": 99.25,
    "tile": 96.93,
    "toothbrush": 98.97,
    "transistor": 96.70,
    "wood": 96.87,
    "zipper": 97.92,
}
PAPER_MEAN_PIXEL_AUROC = 98.74

# metrics.json key -> column header; values are fractions in the file and percent in the table.
METRICS = {
    "test/image_auroc": "image AUROC (%)",
    "test/pixel_auroc": "pixel AUROC (%)",
    "test/pixel_aupro": "AUPRO (%)",
    "test/miou": "mIoU (%)",
    "test/best_miou": "best single-threshold mIoU (%)",
    "test/false_alarm_rate": "false alarms (%)",
    "test/detection_recall": "detection recall (%)",
    "test/oracle_recall_at_false_alarms": "oracle recall, as many false alarms (%)",
}
COLUMNS = [
    "job",
    "dataset",
    "category",
    "backbone",
    "threshold",
    "overrides",
    "val/loss",
    *METRICS.values(),
    "paper pixel AUROC (%)",
    "Δ pixel AUROC (pp)",
    "status",
]
OUTPUT_NAMES = ("summary.md", "summary.csv", "summary_auroc.png")


@dataclass
class Row:
    job: str
    dataset: str = ""
    category: str = ""
    backbone: str = ""
    threshold: str = ""
    overrides: str = ""  # the job's command-line overrides that differ between the jobs
    val_loss: float | None = None
    metrics: dict[str, float | None] | None = None  # percent; None for a failed job
    paper: float | None = None
    error: str = ""
    is_mean: bool = False
    mean_of: str = ""  # a mean row: "3 of 4 finished"
    job_overrides: tuple[str, ...] = ()  # every override of the job, as Hydra recorded it

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def delta(self) -> float | None:
        pixel = (self.metrics or {}).get("test/pixel_auroc")
        return None if pixel is None or self.paper is None else pixel - self.paper

    @property
    def status(self) -> str:
        if self.is_mean:
            return self.mean_of
        return f"failed: {self.error}" if self.error else "ok"


def _threshold_name(cfg: dict) -> str:
    # uflow_exp.thresholds.NFATreeThreshold -> nfa_tree, the config group option's name.
    target = str((cfg.get("threshold") or {}).get("_target_", ""))
    name = target.rsplit(".", 1)[-1].removesuffix("Threshold")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _read_job(job_dir: Path, root: Path) -> Row:
    config_path = job_dir / "config_resolved.yaml"
    cfg = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    dataset_cfg = cfg.get("dataset") or {}
    row = Row(
        job=job_dir.relative_to(root).as_posix(),
        dataset=str(dataset_cfg.get("layout", dataset_cfg.get("name", ""))),
        category=str(dataset_cfg.get("category") or ""),
        backbone=str((cfg.get("backbone") or {}).get("name", "")),
        threshold=_threshold_name(cfg),
        job_overrides=tuple(_overrides_of(job_dir)),
    )
    if row.dataset == "mvtec":
        row.paper = PAPER_PIXEL_AUROC.get(row.category)
    metrics_path = job_dir / "metrics.json"
    # metrics.json is the job's last act, so its presence means the job finished.
    if metrics_path.is_file():
        raw = json.loads(metrics_path.read_text())
        row.metrics = {key: None if raw.get(key) is None else 100.0 * raw[key] for key in METRICS}
        row.val_loss = raw.get("val/loss")
    else:
        row.error = last_line(job_dir / "error.txt") or "error.txt is empty"
    return row


def _overrides_of(job_dir: Path) -> list[str]:
    """The job's command-line overrides, from the ``.hydra/overrides.yaml`` Hydra writes beside it."""
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def collect(root: Path) -> list[Row]:
    """One row per job folder below ``root`` (or ``root`` itself) holding metrics.json or error.txt;
    each row's ``overrides`` are those of its overrides whose value is not the same in every job."""
    job_dirs = {path.parent for name in ("metrics.json", "error.txt") for path in root.rglob(name)}
    rows = [
        _read_job(d, root)
        for d in sorted(job_dirs, key=lambda d: natural_key(d.relative_to(root).as_posix()))
    ]
    everywhere = set.intersection(*(set(r.job_overrides) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row.overrides = " ".join(o for o in row.job_overrides if o not in everywhere)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def mean_row(rows: Sequence[Row], label: str) -> Row:
    """Means over the finished jobs, each metric over the jobs that have it (NaN metrics are null).

    The paper column is the paper's mean over the same categories, and only when every pixel AUROC in
    the mean has a paper value: otherwise the two means would cover different jobs."""
    finished = [r for r in rows if r.finished]
    metrics = {key: _mean([r.metrics[key] for r in finished]) for key in METRICS}
    with_pixel = [r for r in finished if r.metrics["test/pixel_auroc"] is not None]
    paper = None
    if with_pixel and all(r.paper is not None for r in with_pixel):
        paper = statistics.fmean(r.paper for r in with_pixel)

    def common(attr: str) -> str:
        values = {getattr(r, attr) for r in finished}
        return values.pop() if len(values) == 1 else ""

    return Row(
        job=label,
        dataset=common("dataset"),
        backbone=common("backbone"),
        threshold=common("threshold"),
        category=common("category"),
        mean_of=f"{len(finished)} of {len(rows)} finished",
        val_loss=_mean([r.val_loss for r in finished]),
        metrics=metrics,
        paper=paper,
        is_mean=True,
    )


def summary_rows(rows: Sequence[Row]) -> list[Row]:
    """The job rows, then a mean per (data set, backbone) when a sweep mixes them, then the overall mean."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.backbone), []).append(row)
    means = []
    if len(groups) > 1:
        means = [
            mean_row(group, f"mean {d}/{b}")
            for (d, b), group in groups.items()
            if any(r.finished for r in group)
        ]
    return [*rows, *means, mean_row(rows, "mean")]


def _values(row: Row) -> list[str | float | None]:
    """The row's value of each of ``COLUMNS``, in order (numbers as numbers, None where absent)."""
    metrics = row.metrics or {}
    return [
        row.job,
        row.dataset,
        row.category,
        row.backbone,
        row.threshold,
        row.overrides,
        row.val_loss,
        *(metrics.get(key) for key in METRICS),
        row.paper,
        row.delta,
        row.status,
    ]


def _cells(row: Row, decimals: int) -> list[str]:
    return [
        "" if value is None else f"{value:.{decimals}f}" if isinstance(value, float) else value
        for value in _values(row)
    ]


def to_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        # A literal | in an error message would split the cell.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row, 2)) + " |")
    if any(row.paper is not None for row in rows):
        # The doc's per-category values do not average to the paper's stated mean: say which is which.
        lines += [
            "",
            f"Paper: U-Flow (mcait, 448) per-category MVTec pixel AUROC; the paper states a mean of "
            f"{PAPER_MEAN_PIXEL_AUROC:.2f}, while its 15 category values average "
            f"{statistics.fmean(PAPER_PIXEL_AUROC.values()):.2f}. A mean row's paper value averages the "
            "same categories as its pixel AUROC.",
        ]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(_cells(row, 4) for row in rows)


def _chart_labels(rows: Sequence[Row]) -> list[str]:
    jobs = [r for r in rows if not r.is_mean]
    many_datasets = len({r.dataset for r in jobs}) > 1
    many_backbones = len({r.backbone for r in jobs}) > 1
    labels = []
    for row in rows:
        if row.is_mean:
            labels.append(row.job)
            continue
        parts = [row.dataset] if many_datasets else []
        parts.append(row.category or row.dataset or row.job)
        if many_backbones:
            parts.append(row.backbone)
        labels.append("/".join(parts))
    # Jobs of one category differ by their overrides: the swept values tell them apart (lr=0.001), and
    # the job folder where even those repeat.
    labels = [
        f"{label} {_short(row.overrides)}"
        if labels.count(label) > 1 and row.overrides and not row.is_mean
        else label
        for label, row in zip(labels, rows, strict=True)
    ]
    return [
        f"{label} #{row.job}" if labels.count(label) > 1 and not row.is_mean else label
        for label, row in zip(labels, rows, strict=True)
    ]


def _short(overrides: str) -> str:
    """``model.optimizer.lr=0.001 flow.flow_steps=8`` -> ``lr=0.001 flow_steps=8``."""
    return " ".join(
        o.partition("=")[0].rsplit(".", 1)[-1] + "=" + o.partition("=")[2] for o in overrides.split()
    )


def chart_metric(rows: Sequence[Row]) -> str:
    """What the chart shows: pixel AUROC, or image AUROC when no job has pixel truth (image labels only)."""
    pixel = any((r.metrics or {}).get("test/pixel_auroc") is not None for r in rows)
    return "test/pixel_auroc" if pixel else "test/image_auroc"


def plot_auroc(rows: Sequence[Row], path: Path, title: str) -> None:
    """Bars of `chart_metric` per job and per mean, the paper's pixel AUROC as a marker, failed jobs
    and NaN results marked on the axis instead of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _chart_labels(rows)
    metric = chart_metric(rows)
    pixel = [(r.metrics or {}).get(metric) for r in rows]
    known = [v for v in pixel if v is not None] + [r.paper for r in rows if r.paper is not None]
    # AUROCs crowd near 100: a zero baseline would hide every difference, so the axis starts below the data.
    bottom = max(0.0, 5 * (min(known) // 5) - 5) if known else 0.0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.0), 5.0), layout="constrained")
    legend_done = set()
    for i, (row, value) in enumerate(zip(rows, pixel, strict=True)):
        if value is None:
            note = "failed" if row.error else "n/a"
            ax.text(i, bottom + 0.5, note, rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8)
            continue
        kind = "mean" if row.is_mean else "job"
        ax.bar(
            i,
            value - bottom,
            bottom=bottom,
            width=0.7,
            color="dimgray" if row.is_mean else "tab:blue",
            label=None if kind in legend_done else kind,
        )
        legend_done.add(kind)
        # Inside the bar's foot: the paper's marker sits near the bar's top and would cover a label there.
        ax.annotate(
            f"{value:.1f}",
            (i, bottom),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            color="white",
            fontsize=7,
        )
    paper = [(i, r.paper) for i, r in enumerate(rows) if r.paper is not None and metric == "test/pixel_auroc"]
    if paper:
        ax.scatter(
            *zip(*paper, strict=True), marker="D", color="tab:orange", zorder=3, label="paper (mcait, 448)"
        )
    if legend_done or paper:  # an empty legend makes matplotlib warn
        fig.legend(loc="outside upper right", ncols=3, frameon=False)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(bottom, 101)
    ax.set_ylabel(f"{metric.removeprefix('test/').replace('_', ' ').replace('auroc', 'AUROC')} (%)")
    ax.set_title(title, loc="left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(rows: Sequence[Row], root: Path, out: Path, chart: Path) -> None:
    """Log the table (and chart) as a W&B run; offline unless WANDB_MODE says otherwise, like training."""
    import wandb

    # A multirun's training jobs share a group named after the sweep folder (utils/config.py): join it.
    name = root.resolve().name
    group = name if (root / "multirun.yaml").is_file() else None
    run = wandb.init(
        project="uflow_exp",
        job_type="summarize",
        name=f"summary-{name}",
        group=group,
        dir=str(out),
        mode=os.environ.get("WANDB_MODE", "offline"),
    )
    table = wandb.Table(columns=COLUMNS)
    for row in rows:
        table.add_data(*_values(row))
    run.log({"summary/table": table, "summary/auroc": wandb.Image(str(chart))})
    run.finish()


def summarize(root: Path, out: Path, use_wandb: bool = False) -> tuple[str, list[Path]]:
    """Write the Markdown, CSV and chart of the jobs below ``root`` into ``out``; return the Markdown
    and the paths written."""
    jobs = collect(root)
    if not jobs:
        raise FileNotFoundError(f"no metrics.json or error.txt below {root}: not a run or multirun folder")
    rows = summary_rows(jobs)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path, png_path = (out / name for name in OUTPUT_NAMES)
    markdown = to_markdown(rows)
    md_path.write_text(markdown)
    write_csv(rows, csv_path)
    name = "Pixel" if chart_metric(rows) == "test/pixel_auroc" else "Image (no pixel masks)"
    plot_auroc(rows, png_path, f"{name} AUROC per job: {root.resolve().name}")
    if use_wandb:
        log_wandb(rows, root, out, png_path)
    return markdown, [md_path, csv_path, png_path]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m uflow_exp.summarize", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder or a multirun sweep folder")
    parser.add_argument("--out", type=Path, help="where to write the summary files (default: RUN_DIR)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table to W&B (offline unless WANDB_MODE says)"
    )
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir} is not a folder")
    try:
        markdown, written = summarize(args.run_dir, args.out or args.run_dir, use_wandb=args.wandb)
    except FileNotFoundError as err:
        parser.error(str(err))
    sys.stdout.write(markdown)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
