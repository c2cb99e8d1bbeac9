"""Accuracy of the default recipe on real and embedded data: one table, one training run per case.

Run: .venv/bin/python benchmarks/bench_accuracy.py [--cases lgg brick ...] [--keep DIR]
[-- extra overrides] (`make bench-accuracy`). Each case is the command a user types
(`python -m uflow_exp dataset=...`), run in its own process with `logger=csv`; the row is read from
that run's `metrics.json`. Cases:

- `lgg`: ../shared/data/lgg_mri_dev (20 LGG MRI patients, split by patient: 16 train / 4 test).
- `brick`, `grass`, `gravel`: the embedded textures.

A second table re-thresholds each case's best checkpoint with every threshold mode
(`python -m uflow_exp.evaluate ckpt_path=... threshold=...`, `--thresholds` picks them) and prints the
operating point of each: mIoU at the threshold beside the oracle, the mIoU of anomalous images alone,
the share of normal test images with any detection (false alarms) and of anomalous ones (recall).

`--keep DIR` keeps each case's runs (test panels, checkpoints) in DIR/<case>/: look at the maps
before believing a row.

These are development numbers: the recipe was chosen on them, so they are not held-out results.
"""

from __future__ import annotations

import argparse
import contextlib
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
    ("train s", "time/fit_s", "{:.0f}"),
    ("test img/s", "time/test_images_per_s", "{:.1f}"),
]
# threshold modes of the second table: name -> overrides of `python -m uflow_exp.evaluate`
THRESHOLDS = {
    "nfa_tree": ["threshold=nfa_tree"],  # the default
    "nfa_tree_paper": [
        "threshold=nfa_tree",
        "threshold.clip_lower_tail=false",
        "threshold.tests_by_size=false",
        "threshold.calibrate_on_normal=false",
        "threshold.scales=null",
    ],
    "nfa_block": ["threshold=nfa_block"],
    "normal_quantile": ["threshold=normal_quantile"],
}
OPERATING_COLUMNS = [
    ("mIoU", "test/miou", "{:.3f}"),
    ("oracle mIoU", "test/best_miou", "{:.3f}"),
    ("mIoU anomalous", "test/miou_anomalous", "{:.3f}"),
    ("false alarms", "test/false_alarm_rate", "{:.2f}"),
    ("detection recall", "test/detection_recall", "{:.2f}"),
    ("detection precision", "test/detection_precision", "{:.2f}"),
]


def run_cli(module: str, overrides: list[str], log_dir: Path, name: str) -> dict[str, float]:
    """One run of the project's CLI (``uflow_exp`` trains and tests; ``uflow_exp.evaluate`` tests a
    checkpoint) in ``log_dir / name``; returns its metrics.json."""
    out = log_dir / name
    command = [
        sys.executable,
        "-m",
        module,
        *overrides,
        "logger=csv",
        f"paths.log_dir={log_dir}",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that training tested: the one kept for the best ``val/loss``."""
    (best,) = (p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return best


@contextlib.contextmanager
def run_folder(keep: Path | None, case: str):
    """Where a case's runs go: ``keep / case`` (left in place) or a temporary folder."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=f"bench-accuracy-{case}-") as tmp:
            yield tmp
    else:
        (keep / case).mkdir(parents=True, exist_ok=True)
        yield str(keep / case)


def row(name: str, metrics: dict[str, float | None], columns=COLUMNS) -> str:
    cells = [name]
    for _, key, fmt in columns:
        value = metrics.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--thresholds", nargs="*", default=list(THRESHOLDS), choices=list(THRESHOLDS))
    parser.add_argument(
        "--keep", type=Path, help="keep each case's runs (test panels, checkpoints) in KEEP/<case>/"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case (after --)")
    args = parser.parse_args()
    lines = [
        "| case | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    operating = [
        "| case | threshold | " + " | ".join(name for name, _, _ in OPERATING_COLUMNS) + " |",
        "|---" * (len(OPERATING_COLUMNS) + 2) + "|",
    ]
    print(f"overrides: {' '.join(args.overrides) or '(none: the default recipe)'}", flush=True)
    for case in args.cases:
        with run_folder(args.keep, case) as tmp:
            overrides = CASES[case] + args.overrides
            lines.append(row(case, run_cli("uflow_exp", overrides, Path(tmp), "run")))
            print(lines[-1], flush=True)
            ckpt = best_checkpoint(Path(tmp) / "run")
            for mode in args.thresholds:
                metrics = run_cli(
                    "uflow_exp.evaluate",
                    [*overrides, f"ckpt_path={ckpt}", *THRESHOLDS[mode]],
                    Path(tmp),
                    mode,
                )
                operating.append(row(f"{case} | {mode}", metrics, OPERATING_COLUMNS))
                print(operating[-1], flush=True)
    print("\n".join(lines))
    if args.thresholds:
        print("\n" + "\n".join(operating))


if __name__ == "__main__":
    main()
