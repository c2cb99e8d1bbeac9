"""`python -m uflow_exp.summarize`: tables, means, the paper column and the chart from fake run folders."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from uflow_exp.summarize import PAPER_PIXEL_AUROC, collect, summarize, summary_rows

TRACEBACK = """Traceback (most recent call last):
  File "uflow_exp/tasks/train.py", line 40, in train
    datamodule.prepare_data()
FileNotFoundError: no MVTec images under data/mvtec/grid | check dataset.root
"""


def write_job(
    folder: Path,
    dataset: str,
    category: str,
    backbone: str,
    metrics: dict | None,
    error: str = "",
    overrides: tuple[str, ...] = (),
) -> None:
    """A job folder as train.py leaves it: config_resolved.yaml and Hydra's .hydra/overrides.yaml,
    then metrics.json or error.txt."""
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    config = {
        "task_name": "train",
        "dataset": {"layout": dataset, "category": category, "image_size": 256},
        "backbone": {"name": backbone, "input_size": 256},
        "threshold": {"_target_": "uflow_exp.thresholds.NFATreeThreshold", "log_nfa_threshold": 0.0},
    }
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    if metrics is None:
        (folder / "error.txt").write_text(error)
    else:
        (folder / "metrics.json").write_text(json.dumps({"train/loss": -5.0, "val/loss": -4.5, **metrics}))


def metrics(image: float, pixel: float, aupro: float, miou: float | None) -> dict:
    return {
        "test/image_auroc": image,
        "test/pixel_auroc": pixel,
        "test/pixel_aupro": aupro,
        "test/miou": miou,
    }


@pytest.fixture
def mvtec_sweep(tmp_path: Path) -> Path:
    """A multirun of four MVTec jobs: three finished (one with a NaN mIoU, stored as null), one failed.
    Job 10 checks that job folders sort as numbers."""
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    for job, category, result in (
        ("0", "bottle", metrics(0.95, 0.97, 0.90, 0.40)),
        ("1", "carpet", metrics(0.85, 0.99, 0.80, None)),
        ("2", "grid", None),
        ("10", "screw", metrics(0.75, 0.94, 0.70, 0.20)),
    ):
        swept = (
            "logger=csv",
            "experiment=mvtec",
            f"dataset.category={category}",
        )  # logger=csv is the same in every job
        write_job(sweep / job, "mvtec", category, "resnet18", result, error=TRACEBACK, overrides=swept)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["job"]: row for row in csv.DictReader(handle)}


def test_csv_rows_means_and_paper_column(mvtec_sweep: Path, tmp_path: Path):
    out = tmp_path / "summary"
    summarize(mvtec_sweep, out)
    rows = read_csv(out / "summary.csv")
    assert list(rows) == ["0", "1", "2", "10", "mean"]

    bottle = rows["0"]
    assert (bottle["dataset"], bottle["category"], bottle["backbone"], bottle["threshold"]) == (
        "mvtec",
        "bottle",
        "resnet18",
        "nfa_tree",
    )
    assert float(bottle["image AUROC (%)"]) == pytest.approx(95.0)
    assert float(bottle["pixel AUROC (%)"]) == pytest.approx(97.0)
    assert float(bottle["paper pixel AUROC (%)"]) == pytest.approx(97.98)
    assert float(bottle["Δ pixel AUROC (pp)"]) == pytest.approx(-0.98)
    assert bottle["status"] == "ok"
    assert rows["1"]["mIoU (%)"] == ""  # NaN in metrics.json (null) stays empty, not 0
    assert float(rows["10"]["Δ pixel AUROC (pp)"]) == pytest.approx(94.0 - 99.25)

    failed = rows["2"]
    assert failed["category"] == "grid"
    assert failed["pixel AUROC (%)"] == ""
    assert failed["paper pixel AUROC (%)"] == "98.1900"
    assert (
        failed["status"]
        == "failed: FileNotFoundError: no MVTec images under data/mvtec/grid | check dataset.root"
    )

    assert bottle["overrides"] == "dataset.category=bottle" and float(bottle["val/loss"]) == -4.5

    mean = rows["mean"]
    assert mean["category"] == ""  # the categories differ
    assert mean["status"] == "3 of 4 finished"
    assert float(mean["image AUROC (%)"]) == pytest.approx((95 + 85 + 75) / 3, abs=1e-4)
    assert float(mean["pixel AUROC (%)"]) == pytest.approx((97 + 99 + 94) / 3, abs=1e-4)
    assert float(mean["AUPRO (%)"]) == pytest.approx((90 + 80 + 70) / 3, abs=1e-4)
    assert float(mean["mIoU (%)"]) == pytest.approx((40 + 20) / 2, abs=1e-4)  # the NaN job is left out
    # The paper's mean over the same finished categories (bottle, carpet, screw), not over all 15.
    assert float(mean["paper pixel AUROC (%)"]) == pytest.approx((97.98 + 99.45 + 99.25) / 3, abs=1e-4)
    assert float(mean["Δ pixel AUROC (pp)"]) == pytest.approx(290 / 3 - 296.68 / 3, abs=1e-4)


def markdown_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The table's rows by job, each cell under its column header (escaped | kept escaped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]

    header = cells(lines[0])
    assert all(len(cells(line)) == len(header) for line in lines[2:])  # no cell split by an error text
    return {cells(line)[0]: dict(zip(header, cells(line), strict=True)) for line in lines[2:]}


def test_markdown(mvtec_sweep: Path):
    markdown, _ = summarize(mvtec_sweep, mvtec_sweep)
    assert (mvtec_sweep / "summary.md").read_text() == markdown
    rows = markdown_rows(markdown)
    assert list(rows) == ["0", "1", "2", "10", "mean"]
    bottle = rows["0"]
    assert [bottle[k] for k in ("dataset", "category", "backbone", "threshold", "overrides", "val/loss")] == [
        "mvtec", "bottle", "resnet18", "nfa_tree", "dataset.category=bottle", "-4.50"
    ]  # fmt: skip
    assert [bottle[k] for k in ("image AUROC (%)", "pixel AUROC (%)", "AUPRO (%)", "mIoU (%)")] == [
        "95.00", "97.00", "90.00", "40.00"
    ]  # fmt: skip
    assert (bottle["paper pixel AUROC (%)"], bottle["Δ pixel AUROC (pp)"], bottle["status"]) == (
        "97.98", "-0.98", "ok"
    )  # fmt: skip
    assert rows["1"]["mIoU (%)"] == ""  # NaN stays empty
    assert rows["2"]["status"] == (
        "failed: FileNotFoundError: no MVTec images under data/mvtec/grid \\| check dataset.root"
    )
    mean = rows["mean"]
    assert (mean["category"], mean["pixel AUROC (%)"], mean["mIoU (%)"], mean["status"]) == (
        "", "96.67", "30.00", "3 of 4 finished"
    )  # fmt: skip
    assert "the paper states a mean of 98.74, while its 15 category values average 98.34" in markdown


def test_mixed_sweep_gets_group_means_and_no_paper_mean(tmp_path: Path):
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", "mvtec", "bottle", "resnet18", metrics(0.9, 0.96, 0.8, 0.3))
    write_job(sweep / "1", "mvtec", "bottle", "wide_resnet50_2", metrics(1.0, 0.98, 0.9, 0.5))
    write_job(sweep / "2", "textures", "brick", "efficientnet_lite0", metrics(0.8, 0.90, 0.7, 0.1))
    rows = summary_rows(collect(sweep))
    by_job = {row.job: row for row in rows}
    assert list(by_job) == [
        "0",
        "1",
        "2",
        "mean mvtec/resnet18",
        "mean mvtec/wide_resnet50_2",
        "mean textures/efficientnet_lite0",
        "mean",
    ]
    assert by_job["2"].paper is None  # only MVTec categories have a published value
    assert by_job["mean mvtec/resnet18"].paper == pytest.approx(97.98)
    assert by_job["mean"].metrics["test/pixel_auroc"] == pytest.approx((96 + 98 + 90) / 3)
    # textures has no paper value, so an overall paper mean would compare different jobs: none.
    assert by_job["mean"].paper is None
    assert (by_job["mean"].dataset, by_job["mean"].backbone) == ("", "")


def test_single_run_folder(tmp_path: Path):
    run = tmp_path / "runs" / "2026-01-01_00-00-00"
    write_job(run, "textures", "brick", "efficientnet_lite0", metrics(0.98, 0.9756, 0.9469, 0.2403))
    markdown, _ = summarize(run, run)
    row = markdown_rows(markdown)["."]
    assert (row["category"], row["overrides"], row["pixel AUROC (%)"], row["status"]) == (
        "brick", "", "97.56", "ok"
    )  # fmt: skip
    assert "Paper:" not in markdown


def test_chart_is_a_png(mvtec_sweep: Path, tmp_path: Path):
    _, written = summarize(mvtec_sweep, tmp_path)
    png = tmp_path / "summary_auroc.png"
    assert png in written
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    height, width, channels = pixels.shape
    assert channels in (3, 4) and width >= 600 and height >= 400
    assert pixels[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_paper_table_matches_method_doc():
    assert len(PAPER_PIXEL_AUROC) == 15
    assert PAPER_PIXEL_AUROC["metal_nut"] == 98.19 and PAPER_PIXEL_AUROC["transistor"] == 96.70


def test_cli(mvtec_sweep: Path, tmp_path: Path):
    out = tmp_path / "cli_out"
    result = subprocess.run(
        [sys.executable, "-m", "uflow_exp.summarize", str(mvtec_sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert markdown_rows(result.stdout)["mean"]["status"] == "3 of 4 finished"
    assert f"wrote {out / 'summary.csv'}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.md", "summary_auroc.png"]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "uflow_exp.summarize", str(empty)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "no metrics.json or error.txt below" in result.stderr


def test_wandb_table_offline(mvtec_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline: no server here
    monkeypatch.setenv("WANDB_SILENT", "true")
    summarize(mvtec_sweep, tmp_path, use_wandb=True)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))


def test_chart_labels_name_the_swept_value_of_each_job():
    from uflow_exp.summarize import Row, _chart_labels

    rows = [
        Row(job="0", dataset="textures", category="brick", overrides="model.optimizer.lr=0.001"),
        Row(job="1", dataset="textures", category="brick", overrides="model.optimizer.lr=0.002"),
        Row(job="2", dataset="textures", category="brick"),  # the same settings twice (a seed sweep)
        Row(job="3", dataset="textures", category="brick"),
        Row(job="mean", is_mean=True),
    ]
    assert _chart_labels(rows) == ["brick lr=0.001", "brick lr=0.002", "brick #2", "brick #3", "mean"]


def test_an_image_label_only_sweep_charts_image_auroc_without_warnings(tmp_path):
    import warnings

    from uflow_exp.summarize import chart_metric, collect, summarize, summary_rows

    sweep = tmp_path / "sweep"
    for job, value in (("0", 0.9), ("1", 0.8)):
        write_job(sweep / job, "folder", "", "resnet18", {"test/image_auroc": value},
                  overrides=(f"model.optimizer.lr={job}e-3",))  # fmt: skip
    rows = summary_rows(collect(sweep))
    assert chart_metric(rows) == "test/image_auroc"
    assert [r.job for r in rows if r.is_mean] == ["mean"]  # one mean row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        markdown, paths = summarize(sweep, tmp_path / "out")
    assert paths[-1].name == "summary_auroc.png" and paths[-1].stat().st_size > 0
    assert sum(line.startswith("| mean") for line in markdown.splitlines()) == 1
