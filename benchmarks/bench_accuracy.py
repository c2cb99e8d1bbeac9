"""Accuracy of the default recipe on real and embedded data: one table, one training run per case.

Run: .venv/bin/python benchmarks/bench_accuracy.py [--cases lgg brick ...] [--seeds 42 1] [--keep DIR
[--reuse]] [--no-baseline] [-- extra overrides] (`make bench-accuracy`). Each case is the command a user
types (`python -m uflow_exp dataset=... seed=S`), run in its own process with `logger=csv` once per
seed; its row is the mean over the seeds of those runs' `metrics.json`. Cases:

- `lgg`: ../shared/data/lgg_mri_dev (20 LGG MRI patients, split by patient: 16 train / 4 test).
- `kolektor`: ../shared/data/kolektor_dev (commutator surfaces with thin cracks, MVTec layout).
- `tire`: ../shared/data/tire_dev (a tyre on a dark background, four defect types, MVTec layout).
- `brick`, `grass`, `gravel`: the embedded textures.

Beside each case, in its own process on the same images, splits, backbone and weights, the
nearest-neighbour baseline of `knn_baseline.py` (PatchCore's features and map, searching its full
memory bank, scored by the same metrics; once: it is deterministic), and a table of ours against it.

A second table re-thresholds each case's best checkpoint with every threshold mode
(`python -m uflow_exp.evaluate ckpt_path=... threshold=...`, `--thresholds` picks them) and prints the
operating point of each: mIoU at the threshold beside the best single-threshold mIoU, the mIoU of
anomalous images alone, the share of normal test images with any detection (false alarms) and of
anomalous ones (recall).

`--keep DIR` keeps each case's runs (test panels, checkpoints) in DIR/<case>/: look at the maps
before believing a row. `--reuse` (with `--keep`) reads the runs and baseline already kept there
instead of training again, e.g. to re-threshold them with other `--thresholds`.

These are development numbers: the recipe was chosen on them, so they are not held-out results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CASES = {
    "lgg": ["dataset=lgg_mri", f"dataset.root={DATA / 'lgg_mri_dev'}"],
    "kolektor": ["dataset=mvtec", f"dataset.root={DATA / 'kolektor_dev'}", "dataset.category=kolektor"],
    "tire": ["dataset=mvtec", f"dataset.root={DATA / 'tire_dev'}", "dataset.category=tire"],
    "brick": ["dataset=textures", "dataset.category=brick"],
    "grass": ["dataset=textures", "dataset.category=grass"],
    "gravel": ["dataset=textures", "dataset.category=gravel"],
}
COLUMNS = [
    ("pixel AUROC", "test/pixel_auroc", "{:.3f}"),
    ("AUPRO@0.3", "test/pixel_aupro", "{:.3f}"),
    ("image AUROC", "test/image_auroc", "{:.3f}"),
    ("mIoU (threshold)", "test/miou", "{:.3f}"),
    ("best single-threshold mIoU", "test/best_miou", "{:.3f}"),
    ("train s", "time/fit_s", "{:.0f}"),
    ("test img/s", "time/test_images_per_s", "{:.1f}"),
]
# ours against the baseline: (name, metrics key, ours minus baseline (True) or ours / baseline)
VERSUS = [
    ("pixel AUROC", "test/pixel_auroc", True),
    ("AUPRO@0.3", "test/pixel_aupro", True),
    ("image AUROC", "test/image_auroc", True),
    ("fit s", "time/fit_s", False),
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
        "threshold.refine_fraction=null",
    ],
    "nfa_block": ["threshold=nfa_block"],
    "normal_quantile": ["threshold=normal_quantile"],
    # the default mode at a false-alarm budget (images per image), recalibrated on the validation split
    "nfa_tree@0.1": ["threshold.false_alarm_rate=0.1"],
    "nfa_tree@0.05": ["threshold.false_alarm_rate=0.05"],
    "nfa_tree@0.02": ["threshold.false_alarm_rate=0.02"],
    # the default mode with its flagged regions as the max-tree finds them (threshold.refine_fraction null)
    "nfa_tree_unrefined": ["threshold=nfa_tree", "threshold.refine_fraction=null"],
}
# the default mode with its flagged regions shrunk to where the map rises this share of the way from the
# image's median to the region's peak (the sweep behind the default, 0.7); not run unless named
REFINE_SWEEP = {
    f"nfa_tree+refine{f:g}": ["threshold=nfa_tree", f"threshold.refine_fraction={f:g}"]
    for f in (0.3, 0.5, 0.65, 0.75, 0.8, 0.9)
}
# the default mode testing every latent scale or the 2 finest (default: the 3 finest); not run unless named
SCALES_SWEEP = {
    "nfa_tree_all_scales": ["threshold=nfa_tree", "threshold.scales=null"],
    "nfa_tree_2scales": ["threshold=nfa_tree", "threshold.scales=2"],
}
NAMED_ONLY = REFINE_SWEEP | SCALES_SWEEP
OPERATING_COLUMNS = [
    ("mIoU", "test/miou", "{:.3f}"),
    ("best single-threshold mIoU", "test/best_miou", "{:.3f}"),
    ("mIoU anomalous", "test/miou_anomalous", "{:.3f}"),
    ("false alarms", "test/false_alarm_rate", "{:.2f}"),
    ("detection recall", "test/detection_recall", "{:.2f}"),
    ("detection precision", "test/detection_precision", "{:.2f}"),
    ("promised false alarms", "test/promised_false_alarm_rate", "{:.3f}"),
    ("false alarms, 95 % interval high", "test/false_alarm_rate_ci_high", "{:.2f}"),
    ("oracle recall, as many false alarms", "test/oracle_recall_at_false_alarms", "{:.2f}"),
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


def run_baseline(overrides: list[str], log_dir: Path, seed: int) -> dict[str, float]:
    """The nearest-neighbour baseline (``knn_baseline.py``) on the run's data and backbone."""
    out = log_dir / "baseline.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "knn_baseline.py"), "--json", str(out), "--seed",
               str(seed), "--", *overrides]  # fmt: skip
    # this checkout's package first, as `python -m uflow_exp` from ROOT has it (a script's path is its folder)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the baseline failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def mean(runs: list[dict[str, float | None]]) -> dict[str, float]:
    """Per key, the mean over the runs where it is defined (metrics.json writes an undefined metric,
    e.g. detection precision without any detection, as null); NaN where it is defined in none."""
    keys = {k for run in runs for k in run}
    defined = {k: [run[k] for run in runs if run.get(k) is not None] for k in keys}
    return {k: statistics.fmean(values) if values else math.nan for k, values in defined.items()}


def versus_row(case: str, ours: dict[str, float], baseline: dict[str, float]) -> str:
    cells = [case]
    for _, key, difference in VERSUS:
        a, b = ours.get(key), baseline.get(key)
        if a is None or b is None:
            cells += ["-", "-", "-"]
            continue
        fmt = "{:.3f}" if difference else "{:.0f}"
        cells += [fmt.format(a), fmt.format(b), f"{a - b:+.3f}" if difference else f"{a / b:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that training tested: the one kept for the best ``val/loss``."""
    best = [p for p in sorted((run_dir / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt"]
    if len(best) != 1:
        raise FileNotFoundError(
            f"{run_dir / 'checkpoints'}: expected one best checkpoint (epoch_*.ckpt), got {best}"
        )
    return best[0]


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1], help="training seeds (rows: means)")
    parser.add_argument(
        "--thresholds", nargs="*", default=list(THRESHOLDS), choices=[*THRESHOLDS, *NAMED_ONLY],
        help="re-threshold the first seed's best checkpoint with these modes (none: skip the table)",
    )  # fmt: skip
    parser.add_argument("--no-baseline", action="store_true", help="skip the nearest-neighbour baseline")
    parser.add_argument(
        "--keep", type=Path, help="keep each case's runs (test panels, checkpoints) in KEEP/<case>/"
    )
    parser.add_argument(
        "--reuse", action="store_true",
        help="with --keep: read the runs (and baseline) already kept there instead of training again",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case (after --)")
    args = parser.parse_args()
    if args.reuse and not args.keep:
        parser.error("--reuse reads the runs of --keep DIR: give both")
    return args


def run_case(case: str, args: argparse.Namespace, folder: Path) -> tuple[str, str | None, list[str]]:
    """One case: its row (the mean over the seeds), its row against the baseline (None without one)
    and its operating points; each printed as soon as it is known."""
    overrides = CASES[case] + args.overrides
    runs = []
    for seed in args.seeds:
        kept = folder / f"run_seed{seed}" / "metrics.json"
        if args.reuse and kept.is_file():
            runs.append(json.loads(kept.read_text()))
        else:
            runs.append(run_cli("uflow_exp", [*overrides, f"seed={seed}"], folder, f"run_seed{seed}"))
        print(row(f"{case} seed {seed}", runs[-1]), flush=True)
    ours = mean(runs)
    line = row(case, ours)
    print(line, flush=True)
    versus = None
    if not args.no_baseline:
        kept = folder / "baseline.json"
        baseline = json.loads(kept.read_text()) if args.reuse and kept.is_file() else None
        versus = versus_row(case, ours, baseline or run_baseline(overrides, folder, args.seeds[0]))
        print(versus, flush=True)
    ckpt = best_checkpoint(folder / f"run_seed{args.seeds[0]}")
    operating = []
    for mode in args.thresholds:
        metrics = run_cli(
            "uflow_exp.evaluate",
            [*overrides, f"ckpt_path={ckpt}", *(THRESHOLDS | NAMED_ONLY)[mode]],
            folder,
            mode,
        )
        operating.append(row(f"{case} | {mode}", metrics, OPERATING_COLUMNS))
        print(operating[-1], flush=True)
    return line, versus, operating


def main() -> None:
    args = parse_args()
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"| case (mean of seeds {seeds}) | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    versus = [
        "| case | "
        + " | ".join(
            f"{n} ours | {n} baseline | {'ours - baseline' if d else 'ours / baseline'}" for n, _, d in VERSUS
        )
        + " |",  # fmt: skip
        "|---" * (3 * len(VERSUS) + 1) + "|",
    ]
    operating = [
        "| case | threshold | " + " | ".join(name for name, _, _ in OPERATING_COLUMNS) + " |",
        "|---" * (len(OPERATING_COLUMNS) + 2) + "|",
    ]
    print(f"overrides: {' '.join(args.overrides) or '(none: the default recipe)'}", flush=True)
    for case in args.cases:
        with run_folder(args.keep, case) as tmp:
            line, against, points = run_case(case, args, Path(tmp))
        lines.append(line)
        versus += [against] if against else []
        operating += points
    print("\n".join(lines))
    if not args.no_baseline:
        print("\n" + "\n".join(versus))
    if args.thresholds:
        print("\n" + "\n".join(operating))


if __name__ == "__main__":
    main()
