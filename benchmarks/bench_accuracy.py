"""Accuracy of the default recipe on real and embedded data: one table, one training run per case.

Run: .venv/bin/python benchmarks/bench_accuracy.py [--cases lgg brick ...] [-- extra overrides]
(`make bench-accuracy`). Each case is the command a user types (`python -m uflow_exp dataset=...`),
run in its own process with `logger=csv`; the row is read from that run's `metrics.json`. Cases:

- `lgg`: ../shared/data/lgg_mri_dev (20 LGG MRI patients, split by patient: 16 train / 4 test).
- `brick`, `grass`, `gravel`: the embedded textures.

These are development numbers: the recipe was chosen on them, so they are not held-out results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LGG_DEV = ROOT.parent / "shared" / "data" / "lgg_mri_dev"
CASES = {
    "lgg": ["dataset=lgg_mri", f"dataset.root={LGG_DEV}"],
    "brick": ["dataset=textures", "dataset.category=brick"],
    "grass": ["dataset=textures", "dataset.category=grass"],
    "gravel": ["dataset=textures", "dataset.category=gravel"],
}
COLUMNS = [
    ("pixel AUROC", "test/pixel_auroc", "{:.3f}"),
    ("AUPRO@0.3", "test/pixel_aupro", "{:.3f}"),
    ("image AUROC", "test/image_auroc", "{:.3f}"),
    ("mIoU (threshold)", "test/miou", "{:.3f}"),
    ("oracle mIoU", "test/best_miou", "{:.3f}"),
    ("mIoU anomalous", "test/miou_anomalous", "{:.3f}"),
    ("false alarms", "test/false_alarm_rate", "{:.2f}"),
    ("detection recall", "test/detection_recall", "{:.2f}"),
    ("train s", "time/fit_s", "{:.0f}"),
    ("test img/s", "time/test_images_per_s", "{:.1f}"),
]


def run_case(overrides: list[str], log_dir: Path) -> dict[str, float]:
    """Train + test one case with the project's CLI and return its metrics.json."""
    out = log_dir / "run"
    command = [
        sys.executable,
        "-m",
        "uflow_exp",
        *overrides,
        "logger=csv",
        f"paths.log_dir={log_dir}",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def row(name: str, metrics: dict[str, float | None]) -> str:
    cells = [name]
    for _, key, fmt in COLUMNS:
        value = metrics.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case (after --)")
    args = parser.parse_args()
    lines = [
        "| case | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    print(f"overrides: {' '.join(args.overrides) or '(none: the default recipe)'}", flush=True)
    for case in args.cases:
        with tempfile.TemporaryDirectory(prefix=f"bench-accuracy-{case}-") as tmp:
            lines.append(row(case, run_case(CASES[case] + args.overrides, Path(tmp))))
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
