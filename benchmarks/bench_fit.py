"""Where a fit's time goes: the real command (`python -m uflow_exp`, training only) on a large embedded
data set, under Lightning's SimpleProfiler, as a table of seconds and shares of `time/fit_s`.

Run: .venv/bin/python benchmarks/bench_fit.py [--images 2000] [--epochs N] [-- extra overrides] (`make
bench-fit`). The images are generated brick crops (`dataset=textures dataset.n_train=N`: 80 % train, 20
% validation); the rows are the feature cache's fill (the backbone, once), the training steps' forward
(NLL), backward and Adam update, the batches' loading, validation's forward (loss and maps) and its
tree-NFA level (`threshold_calibration`), checkpointing, and the rest (start-up, logging, callbacks);
below the table, the run's peak resident memory. Without `--epochs` the run has the recipe's own
schedule (300 optimizer steps); `--epochs N` trains N whole epochs instead (no step limit). Run it twice
with other overrides (e.g. `-- trainer.precision=32-true`) to compare recipes; the per-step rows scale
with the number of steps, the cache fill does not.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profiled_fit(
    images: int, epochs: int | None, overrides: list[str], folder: Path
) -> tuple[dict, float, float]:
    """Action -> total seconds of the profiler, the fit's seconds and the cache fill's seconds."""
    schedule = [] if epochs is None else [f"trainer.max_epochs={epochs}", "trainer.max_steps=-1"]
    command = [
        sys.executable, "-m", "uflow_exp", "dataset=textures", f"dataset.n_train={images}",
        f"dataset.cache_dir={folder / 'data'}", *schedule, "test=false", "logger=csv",
        "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
        f"+trainer.profiler.dirpath={folder}", "+trainer.profiler.filename=profile",
        f"paths.log_dir={folder / 'logs'}", f"hydra.run.dir={folder / 'run'}", *overrides,
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    totals = {}
    # Lightning's SimpleProfiler writes one file per stage, each with the totals so far: the last one
    # (the validation passes after the fit that calibrate the kept checkpoints' threshold, which
    # time/fit_s counts) holds the fit's actions too
    profile = next(
        folder / name for name in ("validate-profile.txt", "fit-profile.txt") if (folder / name).is_file()
    )
    for line in profile.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[\d.e+-]+", cells[3]):
            totals[cells[0]] = float(cells[3])
    fit_s = json.loads((folder / "run" / "metrics.json").read_text())["time/fit_s"]
    log = (folder / "run" / "train.log").read_text()
    filled = re.search(r"computed the features of \d+ images in ([\d.]+) s", log)
    return totals, fit_s, float(filled.group(1)) if filled else 0.0


def stages(totals: dict, fit_s: float, cache_s: float) -> list[tuple[str, float]]:
    def total(prefix: str) -> float:
        return sum(seconds for action, seconds in totals.items() if action.startswith(prefix))

    forward, backward = (
        total("[Strategy]SingleDeviceStrategy.training_step"),
        total("[Strategy]SingleDeviceStrategy.backward"),
    )
    nfa = total("threshold_calibration")
    rows = [
        ("feature cache fill (backbone, once)", cache_s),
        ("training forward (NLL)", forward),
        ("training backward", backward),
        ("optimizer update", total("[LightningModule]UFlowModule.optimizer_step") - forward - backward),
        ("training batches (loading)", total("[_TrainingEpochLoop].train_dataloader_next")),
        ("validation forward (loss, maps)", total("[Strategy]SingleDeviceStrategy.validation_step") - nfa),
        ("validation tree-NFA level (once, after the fit)", nfa),
        ("validation batches (loading)", total("[_EvaluationLoop].val_next")),
        ("checkpointing", total("[Callback]ModelCheckpoint")),
    ]
    return [*rows, ("other (start-up, logging, callbacks)", fit_s - sum(s for _, s in rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="generated training + validation images")
    parser.add_argument("--epochs", type=int, help="whole epochs instead of the recipe's schedule")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        totals, fit_s, cache_s = profiled_fit(args.images, args.epochs, args.overrides, Path(tmp))
    schedule = "the recipe's schedule" if args.epochs is None else f"{args.epochs} epochs"
    print(f"{args.images} images, {schedule}, overrides: {' '.join(args.overrides) or '(none)'}\n")
    print("| stage | seconds | share of fit |\n|---|---|---|")
    for name, seconds in stages(totals, fit_s, cache_s):
        print(f"| {name} | {seconds:.2f} | {seconds / fit_s:.0%} |")
    print(f"| fit (time/fit_s) | {fit_s:.2f} | 100% |")
    # the largest resident set of any finished child: the one training process
    print(f"\npeak RSS of the run: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
