"""This project against anomalib's Uflow, side by side: one table of speed and memory.

Run: .venv/bin/python benchmarks/bench_peers.py [--data ROOT/CATEGORY] [--epochs 5 --batches 24]
(`make bench-peers`). On first use it makes `.venv-peers` and installs anomalib 2.7 there (torch
2.14.1 from this disk, the rest from PyPI): anomalib is never a dependency of this project.

Both tools train on the same images with the same configuration, one after the other, each in its
own process: anomalib's default Uflow (resnet18 at 448 px, 4 flow steps, batch 8; random weights, as
the hub is unreachable) against `python -m uflow_exp backbone=resnet18 backbone.pretrained=false
backbone.input_size=448 ...`. Data: the embedded brick texture generated at 448 px (MVTec layout), or
any MVTec-layout category folder given with `--data`. There is no EfficientNet-Lite0 case: anomalib's
Uflow builds its extractor only for `mcait`, `resnet18` and `wide_resnet50_2` (any other `backbone`
is refused by its `get_feature_extractor`), so its public API cannot take Lite0's weights.

Columns: train images/s of the training loop (data loading and steps, no validation;
`uflow_exp.callbacks.TrainLoopTimer` times both), fit wall time (ours includes filling the feature
cache and a validation per epoch; anomalib's runs no validation), test images/s (decoding, model and
each tool's metrics; ours also the tree NFA; neither writes images: anomalib's visualiser is off and
so are our test panels), peak RSS of the process tree (`wait4`), and the ratios ours / anomalib's. A
last column tests our best checkpoint again the production way, exported to ONNX and run with
onnxruntime (`python -m uflow_exp.evaluate backend=onnxruntime`, its own process: its peak RSS is the
test's alone). `--test-images` sets the size of the generated test set: anomalib's metrics keep every
test pixel, ours are binned. Only ratios from one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 448  # anomalib's Uflow resizes every image to 448 px, whatever it is given
PEERS = ROOT / ".venv-peers"
PEER_PYTHON = PEERS / "bin" / "python"
PEER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.*"]


def ensure_peers() -> None:
    """The peers' virtual environment, made once."""
    probe = [str(PEER_PYTHON), "-c", "import anomalib"]
    if PEER_PYTHON.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return
    print(f"installing {' '.join(PEER_PACKAGES)} into {PEERS} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)


def measured(command: list[str]) -> tuple[str, float]:
    """Runs ``command``; returns its stdout and the peak RSS (MB) of its process tree."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own usage, which Popen.wait drops
        out.seek(0)
        text = out.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}:\n{text[-3000:]}")
    return text, usage.ru_maxrss / 1024


def make_textures(folder: Path, size: int, n_train: int, n_test: int) -> Path:
    """Brick at ``size`` px: ``n_train`` training images, ``n_test`` test images (a third normal)."""
    from uflow_exp.data.textures import generate

    good = n_test // 3
    generate(
        folder, "brick", seed=0, n_train=n_train, n_test_good=good, n_test_defect=n_test - good, size=size
    )
    return folder / "brick"


def run_peer(category_dir: Path, args) -> dict:
    command = [
        str(PEER_PYTHON),
        str(ROOT / "benchmarks" / "peer_anomalib.py"),
        str(category_dir.parent),
        category_dir.name,
        f"--batch={args.batch}",
        f"--epochs={args.epochs}",
        f"--batches={args.batches}",
        f"--out={args.work / 'peer'}",
    ]
    text, rss = measured(command)
    return {**json.loads(text.strip().splitlines()[-1]), "peak_rss_mb": rss}


def run_ours(category_dir: Path, args) -> dict:
    out = args.work / "ours"
    command = [
        sys.executable, "-m", "uflow_exp",
        "dataset=mvtec", f"dataset.root={category_dir.parent}", f"dataset.category={category_dir.name}",
        "backbone=resnet18", "backbone.pretrained=false", f"backbone.input_size={SIZE}",
        f"dataset.batch_size={args.batch}", f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.batches}", "logger=csv",
        f"paths.log_dir={args.work}", f"hydra.run.dir={out}",
        "~callbacks.test_images",  # anomalib's visualiser is off too: neither tool writes images
    ]  # fmt: skip
    _, rss = measured(command)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "fit_s": metrics["time/fit_s"],
        "train_images_per_s": metrics["time/train_images_per_s"],
        "test_images_per_s": metrics["time/test_images_per_s"],
        "pixel_auroc": metrics["test/pixel_auroc"],
        "peak_rss_mb": rss,
    }


def run_ours_onnxruntime(category_dir: Path, args) -> dict:
    """The production path: our best checkpoint exported to ONNX and tested with onnxruntime
    (`python -m uflow_exp.evaluate backend=onnxruntime`), in a process of its own."""
    checkpoint = next((args.work / "ours" / "checkpoints").glob("epoch_*.ckpt"))
    export = [sys.executable, "-m", "uflow_exp.export", f"ckpt_path={checkpoint}", "format=onnx",
              f"hydra.run.dir={args.work / 'export'}"]  # fmt: skip
    subprocess.run(export, cwd=ROOT, check=True, capture_output=True)
    out = args.work / "ours_onnxruntime"
    command = [
        sys.executable, "-m", "uflow_exp.evaluate", f"ckpt_path={checkpoint}", "backend=onnxruntime",
        "dataset=mvtec", f"dataset.root={category_dir.parent}", f"dataset.category={category_dir.name}",
        f"dataset.batch_size={args.batch}", "logger=csv", f"paths.log_dir={args.work}",
        f"hydra.run.dir={out}",
    ]  # fmt: skip
    _, rss = measured(command)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "test_images_per_s": metrics["time/test_images_per_s"],
        "pixel_auroc": metrics["test/pixel_auroc"],
        "peak_rss_mb": rss,
    }


def table(peer: dict, ours: dict, onnx: dict) -> str:
    rows = [
        ("train images/s (training loop)", "train_images_per_s", "{:.2f}", False),
        ("fit wall s", "fit_s", "{:.0f}", True),
        ("test images/s", "test_images_per_s", "{:.2f}", False),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}", True),
        ("pixel AUROC (random weights: a sanity check only)", "pixel_auroc", "{:.3f}", False),
    ]
    lines = [
        "| | anomalib 2.7 Uflow | uflow_exp | ours / anomalib | uflow_exp, test with onnxruntime | "
        "that / anomalib |",
        "|---|---|---|---|---|---|",
    ]

    def ratio(a, b, lower_is_better: bool) -> str:
        if not a or b is None:
            return "-"
        return f"{b / a:.2f}x" + (" (lower is better)" if lower_is_better else "")

    for name, key, fmt, lower_is_better in rows:
        a, b, c = peer.get(key), ours.get(key), onnx.get(key)
        cells = ["-" if v is None else fmt.format(v) for v in (a, b, c)]
        lines.append(
            f"| {name} | {cells[0]} | {cells[1]} | {ratio(a, b, lower_is_better)} | {cells[2]} | "
            f"{ratio(a, c, lower_is_better)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--data", type=Path, help="an MVTec-layout category folder (default: brick at 448 px)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=24, help="training batches per epoch")
    parser.add_argument("--test-images", type=int, default=30, help="generated test images (without --data)")
    args = parser.parse_args()
    ensure_peers()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        args.work = Path(tmp)
        category_dir = args.data or make_textures(
            args.work / "data", SIZE, args.batch * args.batches, args.test_images
        )
        print(f"data: {category_dir}; resnet18 @ {SIZE}, batch {args.batch}, "
              f"{args.epochs} epochs of {args.batches} batches", flush=True)  # fmt: skip
        peer = run_peer(category_dir, args)
        print(f"anomalib: {peer}", flush=True)
        ours = run_ours(category_dir, args)
        print(f"uflow_exp: {ours}", flush=True)
        onnx = run_ours_onnxruntime(category_dir, args)
        print(f"uflow_exp, onnxruntime test: {onnx}", flush=True)
    print(table(peer, ours, onnx))


if __name__ == "__main__":
    main()
