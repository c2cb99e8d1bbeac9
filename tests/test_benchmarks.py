"""The benchmark scripts run and print their tables (tiny sizes; the numbers are not checked here:
speed is measured by `make bench`, never in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*command: str, env: dict | None = None) -> str:
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_pipeline_benchmark_prints_every_column():
    out = run(
        sys.executable, "benchmarks/bench_pipeline.py", "--cases", "resnet18@64", "--images", "2",
        "--repeats", "1", "--bf16",
    )  # fmt: skip
    main, bf16_table = out.split("bf16 autocast")
    header = table_rows(main, "case")[0]  # the end-to-end table comes first
    (row,) = table_rows(main, "resnet18@64")
    assert len(header) == len(row) == 18 and row[1] == "2 (2)"
    assert header[-4:] == ["backbone img/s: NCHW", "channels-last", "channels-last / NCHW", "peak RSS MB"]
    assert all(float(cell.rstrip("x")) > 0 for cell in row[2:])
    (bf16,) = table_rows(bf16_table, "resnet18@64")
    assert 0 < float(bf16[-1]) < 0.1  # bf16 maps differ from fp32's, by a little
    assert [row[0] for row in table_rows(out, "") if row[0] in ("memory", "disk")] == ["memory", "disk"]
    # cached epochs of large PNG files: decoded every epoch vs features served
    data_path = out.split("PNG files through AnomalyDataset")[1]
    served = next(row for row in table_rows(data_path, "") if row[-1].endswith("x"))
    assert len(served) == 3 and all(float(cell.rstrip("x")) > 0 for cell in served)
    sizes = [row[0] for row in table_rows(out, "") if row[0].isdigit()]
    assert sizes == ["256", "256", "256", "128", "384"]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = run(
        "bash", "benchmarks/gpu_check.sh", env={"DEVICE": "cpu", "PY": sys.executable, "OUT": str(tmp_path)}
    )
    assert "resnet18@128" in (tmp_path / "pipeline.md").read_text()
    variants = [row[3] for row in table_rows((tmp_path / "flow.md").read_text(), "resnet18@256")]
    assert variants == ["reference", "fast", "fast+compile", "convolutions only"]
    assert "CUDA device" not in out


def test_accuracy_benchmark_prints_a_row_per_case_and_threshold(tmp_path):
    from uflow_exp.models.uflow.lightning_module import UFlowModule

    tiny = [
        "--", "trainer.max_epochs=1", "dataset.n_train=6", "dataset.n_test_good=2", "dataset.n_test_defect=2",
        "backbone.input_size=96", "model.eval_size=64", "dataset.generated_size=64",
    ]  # fmt: skip
    out = run(
        sys.executable, "benchmarks/bench_accuracy.py", "--cases", "brick", "--keep", str(tmp_path),
        "--seeds", "42", "1", "--thresholds", "nfa_tree", "nfa_block", *tiny,
    )  # fmt: skip
    seeds = [table_rows(out, f"brick seed {seed} |")[0] for seed in (42, 1)]
    rows = [r for r in table_rows(out, "brick |") if not r[1][0].isalpha() and len(r) == 8]  # accuracy
    assert len(rows) == 2 and rows[0] == rows[1]  # printed as it runs, then in the table
    assert all(0 <= float(cell) <= 1 for cell in rows[0][1:6])
    assert float(rows[0][6]) >= 0 and float(rows[0][7]) > 0  # train seconds, rounded; test images/s
    assert seeds[0][1] != seeds[1][1]  # two trainings ...
    mean_auroc = (float(seeds[0][1]) + float(seeds[1][1])) / 2
    assert abs(float(rows[0][1]) - mean_auroc) <= 0.0006  # ... and the row is their mean
    versus = [r for r in table_rows(out, "brick |") if len(r) == 13]  # ours against the baseline
    assert len(versus) == 2 and versus[0] == versus[1]
    assert versus[0][1] == rows[0][1]  # ours: the mean of the seeds
    assert 0.5 < float(versus[0][2]) <= 1  # the baseline finds the synthetic defects
    assert float(versus[0][3]) == pytest.approx(float(versus[0][1]) - float(versus[0][2]), abs=0.0015)
    tree, block = (table_rows(out, f"brick | {mode} |") for mode in ("nfa_tree", "nfa_block"))
    assert len(block) == len(tree) == 2 and len(block[0]) == 11
    # re-thresholding the first seed's model gives what its training tested with (the default threshold)
    assert tree[0][2:4] == [seeds[0][4], seeds[0][5]]  # mIoU and best single-threshold mIoU
    assert block[0][3] == seeds[0][5]  # the best single threshold does not depend on the threshold
    # --keep: the runs stay, with the test panels to look at
    assert len(list((tmp_path / "brick" / "run_seed42" / "test_images").glob("*.png"))) >= 4
    assert {p.name for p in (tmp_path / "brick").iterdir()} == {
        "run_seed42", "run_seed1", "baseline.json", "nfa_tree", "nfa_block"
    }  # fmt: skip
    # --reuse: the kept runs and baseline are read, not redone; only the re-thresholding runs
    trained = (tmp_path / "brick" / "run_seed42" / "metrics.json").stat().st_mtime_ns
    again = run(
        sys.executable, "benchmarks/bench_accuracy.py", "--cases", "brick", "--keep", str(tmp_path),
        "--reuse", "--seeds", "42", "1", "--thresholds", "nfa_tree@0.1", *tiny,
    )  # fmt: skip
    assert (tmp_path / "brick" / "run_seed42" / "metrics.json").stat().st_mtime_ns == trained
    assert [r for r in table_rows(again, "brick |") if len(r) == 13][0] == versus[0]
    printed, rate = table_rows(again, "brick | nfa_tree@0.1 |")  # as it runs, then in the table
    assert printed == rate
    (ckpt,) = (tmp_path / "brick" / "run_seed42" / "checkpoints").glob("epoch_*.ckpt")
    n = UFlowModule.from_checkpoint(str(ckpt)).threshold.normal_scores.numel()
    assert 0 < n < 9 and float(rate[8]) == pytest.approx(1 / (n + 1), abs=0.001)  # too few for 0.1


def test_fit_benchmark_accounts_for_the_whole_fit():
    out = run(
        sys.executable, "benchmarks/bench_fit.py", "--images", "20", "--epochs", "2",
        "--", "backbone.input_size=64", "model.eval_size=64", "dataset.generated_size=64",
        "dataset.n_test_good=2", "dataset.n_test_defect=2",
    )  # fmt: skip
    rows = {row[0]: float(row[1]) for row in table_rows(out, "") if row[0] not in ("stage", "---")}
    assert len(rows) == 11 and all(seconds >= 0 for seconds in rows.values())
    fit = rows.pop("fit (time/fit_s)")
    assert sum(rows.values()) == pytest.approx(fit, abs=0.06)  # each row rounded to 0.01 s
    for stage in (
        "feature cache fill (backbone, once)",
        "training backward",
        "validation tree-NFA level (once, after the fit)",
    ):
        assert rows[stage] > 0
    peak = out.split("peak RSS of the run: ")[1].split(" MB")[0]
    assert 200 < float(peak) < 20_000  # torch alone is about 300 MB


def test_peer_floors_measure_our_trained_model_alone(tmp_path, bench_peers):
    """bench_peers' floors on a tiny checkpoint where its run leaves one (work/ours/checkpoints, the
    ONNX export beside it); anomalib itself is not needed for them."""
    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.models.uflow.lightning_module import UFlowModule
    from uflow_exp.tasks.export import export_onnx
    from uflow_exp.tasks.train import train

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=6, size=64)
    train(compose_train([*TINY, "dataset=mvtec", f"dataset.root={root}", "test=false"], tmp_path / "ours"))
    (checkpoint,) = (tmp_path / "ours" / "checkpoints").glob("epoch_*.ckpt")
    export_onnx(UFlowModule.from_checkpoint(str(checkpoint)), checkpoint.with_suffix(".onnx"))

    floors = bench_peers.run_floors(SimpleNamespace(work=tmp_path, batch=2))
    assert 0 < floors["import_peak_rss_mb"] < floors["train_peak_rss_mb"]
    assert floors["map_images_per_s"] > 0 and floors["onnx_map_images_per_s"] > 0
    peer = {"peak_rss_mb": 4000.0, "test_images_per_s": 2.0}
    ours = {"peak_rss_mb": 2000.0, "test_images_per_s": 1.0}
    floors["peer_map_images_per_s"] = 4.0  # anomalib's map alone, measured only beside anomalib
    rows = table_rows(bench_peers.floor_table(peer, ours, {"test_images_per_s": 0.5}, floors), "")
    by_name = {row[0]: row[1:] for row in rows}
    value, to_peer, to_ours, to_peer_map = by_name["map images/s at batch 2, onnxruntime"]
    assert float(to_peer.rstrip("x")) == pytest.approx(float(value) / 2.0, abs=0.01)
    assert float(to_ours.rstrip("x")) == pytest.approx(float(value) / 0.5, abs=0.01)
    assert float(to_peer_map.rstrip("x")) == pytest.approx(float(value) / 4.0, abs=0.01)
    assert by_name["anomalib's map alone, images/s at batch 2, torch"] == ["4.00", "2.00x", "-", "-"]
    value, to_peer, _, to_peer_map = by_name["peak RSS MB: 3 training steps at batch 2"]
    assert float(to_peer.rstrip("x")) == pytest.approx(float(value) / 4000, abs=0.01)
    assert to_peer_map == "-"


def test_peak_rss_is_the_commands_own_not_the_benchmarks(bench_peers):
    """Linux starts a spawned child's peak RSS at its parent's; the benchmark's measure must not."""
    held = bytearray(1 << 30)  # this process: over 1 GB resident
    held[:: 1 << 12] = b"x" * len(held[:: 1 << 12])
    out, rss = bench_peers.measured([sys.executable, "-c", "print('small')"])
    assert out == "small\n" and 0 < rss < 100
    _, rss = bench_peers.measured(
        [sys.executable, "-c", "b = bytearray(300 << 20); b[:: 4096] = b'x' * len(b[:: 4096])"]
    )
    assert 300 < rss < 400
    with pytest.raises(RuntimeError, match="exit code 3"):
        bench_peers.measured([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A two-epoch tiny run with the default map (base mixture, relative level, coarse-scale score)."""
    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.tasks.train import train

    tmp = tmp_path_factory.mktemp("trained")
    root = fake_layouts.make_mvtec(tmp / "data", n_train=8, size=64)
    train(
        compose_train([*TINY, "dataset=mvtec", f"dataset.root={root}", "trainer.max_epochs=2"], tmp / "run")
    )
    return tmp / "run"


def test_map_variants_start_from_what_the_run_tested(trained_run):
    """bench_maps on a trained run (its base mixture included): its `relative 0.8` row (the default map,
    `model.map_relative_quantile: 0.8`) and its `mean p, scales 2-3` row (the map the default image
    score, `model.image_score_scales: 2`, is the maximum of) are the run's own test result, from the
    same best checkpoint; the other variants are other maps of it."""
    tested = json.loads((trained_run / "metrics.json").read_text())
    out = run(sys.executable, "benchmarks/bench_maps.py", str(trained_run))
    rows = {
        r[0]: [float(c) for c in r[1:]]
        for r in table_rows(out, "")
        if r[0][0].isalnum() and r[0] != "variant"
    }
    # mean p, product p, 5 relative, one per latent scale (3: resnet18), scales 2-3, blurs
    assert len(rows) == 2 + 5 + 3 + 1 + 4
    default = rows["relative 0.8"]
    assert default[0] == pytest.approx(tested["test/pixel_auroc"], abs=1e-3)
    assert default[1] == pytest.approx(tested["test/pixel_aupro"], abs=1e-3)
    mean_p = rows["mean p"]
    assert rows["mean p, scales 2-3"][2] == pytest.approx(tested["test/image_auroc"], abs=1e-3)
    assert rows["product p + blur 4"] != mean_p and all(0 <= v <= 1 for r in rows.values() for v in r)


def test_a_refitted_mixture_of_the_runs_own_size_is_the_runs_own_result(trained_run):
    tested = json.loads((trained_run / "metrics.json").read_text())
    out = run(sys.executable, "benchmarks/bench_mixture.py", str(trained_run), "--components", "32", "2")
    rows = {int(r[1]): [float(c) for c in r[2:]] for r in table_rows(out, str(trained_run))}
    own = [tested[f"test/{key}"] for key in ("pixel_auroc", "pixel_aupro", "image_auroc")]
    assert rows[32] == pytest.approx(own, abs=1e-3)
    assert rows[2] != rows[32]  # another mixture: another map


def test_tradeoff_figure_lists_every_level_the_calibration_can_take(tmp_path):
    from tests import fake_layouts
    from tests.framework_helpers import TINY, compose_train
    from uflow_exp.tasks.train import train

    root = fake_layouts.make_mvtec(tmp_path / "data", n_train=20, n_test_good=4, size=64)
    published = [
        "threshold.clip_lower_tail=false",
        "threshold.tests_by_size=false",
        "threshold.log_nfa_threshold=-1e6",
    ]
    overrides = [*TINY, "dataset=mvtec", f"dataset.root={root}", "dataset.num_workers=0", *published]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    out = run(
        sys.executable, "benchmarks/plot_tradeoff.py", str(tmp_path / "run"), "--out", str(tmp_path / "t.png")
    )
    rows = [[float(c) for c in row] for row in table_rows(out, "") if row[0][0].isdigit()]
    assert [round(r[0], 3) for r in rows] == [round(k / 5, 3) for k in range(1, 5)]  # n = 4: 1/5 .. 4/5
    strictest = rows[0]  # the default level: what the run's own test measured
    assert strictest[1] == pytest.approx(metrics["test/false_alarm_rate"])
    assert strictest[2] == pytest.approx(metrics["test/detection_recall"])
    assert all(
        a[1] <= b[1] and a[2] <= b[2] for a, b in zip(rows, rows[1:], strict=False)
    )  # lower levels flag more
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_predict_memory_benchmark_prints_a_row_per_size_and_batch():
    out = run(
        sys.executable, "benchmarks/bench_predict_memory.py", "--sizes", "320x256", "--batches", "1", "2"
    )
    rows = table_rows(out, "320x256")
    assert [row[3] for row in rows] == ["1", "2"] and all(row[2] == "2" for row in rows)  # two 256 px tiles
    assert all(float(row[4]) > 100 and float(row[5]) > 0 for row in rows)
