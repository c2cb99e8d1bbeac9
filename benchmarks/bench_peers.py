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
so are our test panels), peak RSS of the process tree (`measured`), and the ratios ours / anomalib's. A
last column tests our best checkpoint again the production way, exported to ONNX and run with
onnxruntime (`python -m uflow_exp.evaluate backend=onnxruntime`, its own process: its peak RSS is the
test's alone). `--test-images` sets the size of the generated test set: anomalib's metrics keep every
test pixel, ours are binned. Only ratios from one run mean anything on a shared machine.

A second table gives floors, measured on our trained model alone in processes of their own (random
images, no data loading, no framework, no threshold, no metrics): the peak RSS of `import torch`
and of three training steps at the run's batch (backbone without gradient, flow with it, Adam), and
the images/s of the anomaly map at that batch with torch and with onnxruntime (the median of
interleaved calls after a warm-up, what a test loop sees, not the best call). Beside them, anomalib's
own model timed the same way in the peers' environment, alternating with ours for three rounds: the
two maps are the same network (resnet18 levels 1-3, 4 flow steps per scale), so their ratio is what
the test loop can gain without changing the arithmetic. A ratio target past its floor cannot be met
by any change outside the model's own arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 448  # anomalib's Uflow resizes every image to 448 px, whatever it is given
PEERS = ROOT / ".venv-peers"
PEER_PYTHON = PEERS / "bin" / "python"
MAP_CALLS = 5  # timed calls of each map per process, after a warm-up
PEER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.*"]


def ensure_peers() -> None:
    """The peers' virtual environment, made once."""
    probe = [str(PEER_PYTHON), "-c", "import anomalib"]
    if PEER_PYTHON.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return
    print(f"installing {' '.join(PEER_PACKAGES)} into {PEERS} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)


# Linux starts a child's peak RSS at the peak of the process that spawned it (exec keeps the larger
# of the two), so a command spawned from this process, which may hold torch, could not report less
# than this process's own peak. A bare interpreter spawns it instead and reports the peak of its
# descendants alone (RUSAGE_CHILDREN: the tree below it, the launcher's few MB not counted).
LAUNCHER = """import resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stderr=subprocess.DEVNULL).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def measured(command: list[str]) -> tuple[str, float]:
    """Runs ``command``; returns its stdout and the peak RSS (MB) of its process tree."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_rss_kb"
        launcher = [sys.executable, "-I", "-c", LAUNCHER, str(peak)]
        run = subprocess.run([*launcher, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if run.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed with exit code {run.returncode}:\n{run.stdout[-3000:]}"
            )
        return run.stdout, int(peak.read_text()) / 1024


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
    return our_metrics(command, out, "fit_s", "train_images_per_s", "test_images_per_s")


def our_metrics(command: list[str], out: Path, *times: str) -> dict:
    """Runs one of our commands; its ``time/`` metrics named in ``times``, pixel AUROC, peak RSS."""
    _, rss = measured(command)
    metrics = json.loads((out / "metrics.json").read_text())
    return {name: metrics[f"time/{name}"] for name in times} | {
        "pixel_auroc": metrics["test/pixel_auroc"],
        "peak_rss_mb": rss,
    }


def best_checkpoint(args) -> Path:
    return next((args.work / "ours" / "checkpoints").glob("epoch_*.ckpt"))


def run_ours_onnxruntime(category_dir: Path, args) -> dict:
    """The production path: our best checkpoint exported to ONNX and tested with onnxruntime
    (`python -m uflow_exp.evaluate backend=onnxruntime`), in a process of its own."""
    checkpoint = best_checkpoint(args)
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
    return our_metrics(command, out, "test_images_per_s")


def floor_child(kind: str, checkpoint: Path, batch: int) -> None:
    """One floor (see the module docstring), printed as JSON; runs in a process of its own."""
    if kind == "import":
        import torch  # noqa: F401

        print(json.dumps({}))
        return
    import torch

    from uflow_exp.models.uflow.lightning_module import UFlowModule
    from uflow_exp.models.uflow.loss import nll_loss

    module = UFlowModule.from_checkpoint(str(checkpoint))
    model = module.model
    model.train(kind == "train")  # as Lightning sets it: training adds the feature noise, tests do not
    images = torch.rand(batch, 3, *model.input_shape, generator=torch.Generator().manual_seed(0))
    if kind == "train":
        optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-4)
        for _ in range(3):
            with torch.no_grad():
                features = model.normalize(model.extract(images))
            loss = nll_loss(*model.encode(features))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(json.dumps({}))
        return
    import onnxruntime as ort
    from timing import seconds

    from uflow_exp.onnx_names import INPUT_NAME, OUTPUT_NAME
    from uflow_exp.tasks.export import AnomalyMapNet

    session = ort.InferenceSession(str(checkpoint.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    network = AnomalyMapNet(model, module.eval_size)  # the module the ONNX graph was exported from

    def torch_map():
        with torch.inference_mode():
            network(images)

    def onnx_map():
        session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})

    seconds_of = {"map_seconds": torch_map, "onnx_map_seconds": onnx_map}
    for run in seconds_of.values():
        run()  # warm-up: allocator, oneDNN primitives
    times = {name: [] for name in seconds_of}
    for _ in range(MAP_CALLS):  # interleaved, so that load from elsewhere hits both alike
        for name, run in seconds_of.items():
            times[name].append(seconds(run, torch.device("cpu")))
    print(json.dumps(times))


def run_floors(args, peer: bool = False, rounds: int = 1) -> dict:
    """The floors of the module docstring, each in its own process, on our best checkpoint; with
    ``peer`` also anomalib's model alone. The map floors alternate between the tools for ``rounds``
    rounds and take the median call of all of them: a process started a minute later on a shared
    machine can run 1.2x slower, so one process per tool would measure the machine as much as the
    tools."""
    checkpoint = best_checkpoint(args)
    child = [sys.executable, __file__, f"--floor-ckpt={checkpoint}", f"--batch={args.batch}", "--floor"]
    peer_child = [str(PEER_PYTHON), str(ROOT / "benchmarks" / "peer_anomalib.py"), f"--batch={args.batch}",
                  f"--map-floor={MAP_CALLS}"]  # fmt: skip
    floors = {}
    for kind in ("import", "train"):
        _, rss = measured([*child, kind])
        floors[f"{kind}_peak_rss_mb"] = rss
    calls: dict[str, list[float]] = {}
    for _ in range(rounds):
        for tool, command in ([("peer_", peer_child)] if peer else []) + [("", [*child, "map"])]:
            text, _ = measured(command)
            for name, times in json.loads(text.strip().splitlines()[-1]).items():
                calls.setdefault(tool + name, []).extend(times)
    rates = {name.replace("_seconds", "_images_per_s"): args.batch / statistics.median(times)
             for name, times in calls.items()}  # fmt: skip
    return floors | rates | {"batch": args.batch}


def floor_table(peer: dict, ours: dict, onnx: dict, floors: dict) -> str:
    """Each floor against anomalib's whole run, our whole run and, for the maps, anomalib's map
    alone (measured where ``floors`` has ``peer_map_images_per_s``)."""
    batch = floors["batch"]
    peer_map = floors.get("peer_map_images_per_s")
    rows = [
        ("peak RSS MB: `import torch`", floors["import_peak_rss_mb"], peer["peak_rss_mb"],
         ours["peak_rss_mb"], None),
        (f"peak RSS MB: 3 training steps at batch {batch}", floors["train_peak_rss_mb"],
         peer["peak_rss_mb"], ours["peak_rss_mb"], None),
        (f"map images/s at batch {batch}, torch", floors["map_images_per_s"],
         peer["test_images_per_s"], ours["test_images_per_s"], peer_map),
        (f"map images/s at batch {batch}, onnxruntime", floors["onnx_map_images_per_s"],
         peer["test_images_per_s"], onnx["test_images_per_s"], peer_map),
    ]  # fmt: skip
    if peer_map:
        rows.append((f"anomalib's map alone, images/s at batch {batch}, torch", peer_map,
                     peer["test_images_per_s"], None, None))  # fmt: skip
    lines = [
        "| floor: the model alone | value | / anomalib's whole run | / ours, whole run (test: same "
        "backend) | / anomalib's map alone |",
        "|---|---|---|---|---|",
    ]

    def ratio(value: float, other: float | None) -> str:
        return "-" if not other else f"{value / other:.2f}x"

    for name, value, theirs, whole, theirs_alone in rows:
        cells = [ratio(value, other) for other in (theirs, whole, theirs_alone)]
        lines.append(f"| {name} | {value:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--floor", choices=["import", "train", "map"], help=argparse.SUPPRESS)
    parser.add_argument("--floor-ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor_child(args.floor, args.floor_ckpt, args.batch)
        return
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
        floors = run_floors(args, peer=True, rounds=3)
        print(f"floors: {floors}", flush=True)
    print(table(peer, ours, onnx))
    print()
    print(floor_table(peer, ours, onnx, floors))


if __name__ == "__main__":
    main()
