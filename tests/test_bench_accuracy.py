"""bench_accuracy's arithmetic, without running it (its end-to-end test is slow: test_benchmarks)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy  # noqa: E402


def test_the_mean_over_seeds_skips_metrics_a_run_left_undefined():
    """metrics.json writes an undefined metric as null (detection precision of a run that flagged
    nothing): the row is the mean of the seeds where it is defined, NaN where none is."""
    runs = [
        {"test/pixel_auroc": 0.9, "test/detection_precision": None, "test/miou": None},
        {"test/pixel_auroc": 0.8, "test/detection_precision": 0.5, "test/miou": None},
    ]
    row = bench_accuracy.mean(runs)
    assert row["test/pixel_auroc"] == pytest.approx(0.85)
    assert row["test/detection_precision"] == 0.5
    assert math.isnan(row["test/miou"])
